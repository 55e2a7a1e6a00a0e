"""LoRALinear over every linear-like layer memlm has, targets, merging, the layer-kind description."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memlm.adapters.lora import LoRALinear, apply_lora, lora_layers, merge_lora
from memlm.compress import kinds
from memlm.compress.lowrank import factorize_linear
from memlm.compress.prune import Sparse24Linear
from memlm.compress.quantize import dequantize_weight, module_from_state, quantize_state
from memlm.config import preset
from memlm.errors import MemlmError
from memlm.model import Decoder

IN, OUT = 128, 192


def _linear(seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


def _bases() -> dict[str, nn.Module]:
    """One layer of every linear-like kind, each from the same float Linear."""
    lin = _linear()
    q8 = quantize_state(lin, "int8")
    int4 = quantize_state(lin, "int4", 32)
    out = {
        "linear": lin,
        "int8": module_from_state(lin, "int8", q8),
        "int4 (memlm kernels)": module_from_state(lin, "int4", int4, use_kernel=None),
        "int4 (torch int4 layout)": module_from_state(lin, "int4", int4, use_kernel=True),
        "int4 (dequantize)": module_from_state(lin, "int4", int4, use_kernel=False),
        "int3": module_from_state(lin, "int3", quantize_state(lin, "int3", 32)),
        "lowrank": factorize_linear(lin, rank=16),
        "sparse_2_4": Sparse24Linear.from_linear(lin),
    }
    for m in out.values():
        m.requires_grad_(False)
    return out


BASES = list(_bases())


def _with_random_update(layer: LoRALinear, seed: int = 1) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return layer


@pytest.mark.parametrize("every", [1, 2])
def test_adapters_under_activation_checkpointing_get_the_same_gradients(tiny, every):
    """Block 0's input (the frozen embedding's output) needs no gradient; its adapters still train."""
    import copy

    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(4))
    models = [copy.deepcopy(tiny), copy.deepcopy(tiny)]
    grads = []
    for model, ckpt in zip(models, (0, every)):
        torch.manual_seed(1)  # the same adapters, and the same dropout draws, in both models
        apply_lora(model, r=4, alpha=8, targets="all-linear")
        for name, p in model.named_parameters():  # B away from zero, so every adapter's A gets a gradient
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        model.train()
        model.checkpoint_every = ckpt
        F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert grads[1][name] is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", BASES)
def test_lora_over_every_kind_matches_a_dense_reference(name, one_thread):
    base = _bases()[name]
    dense = kinds.kind_of(base).dense_weight(base)  # (out, in), what the base computes with
    bias = kinds.kind_of(base).bias(base)
    x = torch.randn(4, 16, IN, generator=torch.Generator().manual_seed(2))  # 64 rows: past the kernels' decode shapes

    layer = LoRALinear(base, r=4, alpha=8)
    with torch.no_grad():  # B = 0: step 0 computes exactly what the base does
        assert torch.equal(layer(x), base(x))
    _with_random_update(layer)

    # the reference: the same math on a float copy of the weight, through autograd
    A = layer.lora_A.weight.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    x_ref = x.clone().requires_grad_(True)
    ref = F.linear(x_ref, dense, None if bias is None else bias.detach()) + (x_ref @ A.T @ B.T) * 2.0
    ref.square().sum().backward()

    x_in = x.clone().requires_grad_(True)
    y = layer(x_in)
    y.square().sum().backward()
    tol = 2e-2 if "torch int4" in name else 1e-4  # PyTorch's int4 kernel computes in bf16
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x_in.grad, x_ref.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(layer.lora_A.weight.grad, A.grad, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad, rtol=tol, atol=tol * 10)
    assert all(p.grad is None for p in layer.base_layer.parameters())  # the base stays frozen


@pytest.mark.parametrize("name", ["int8", "int4 (dequantize)", "int3", "sparse_2_4"])
def test_a_frozen_quantized_base_keeps_no_float_weight_for_backward(name):
    """Autograd would keep every dequantized slice of the weight until backward; the frozen path
    keeps nothing of the base: what is saved is the adapter's own input and hidden state."""
    base = _bases()[name]
    layer = _with_random_update(LoRALinear(base, r=4, alpha=8))
    packed_before = {k: v.clone() for k, v in base.state_dict().items()}
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    x = torch.randn(16, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    # lora_A saves x (and its weight), lora_B saves A's output (and its weight): nothing of size in x out
    assert sum(saved) <= x.numel() * 4 + 16 * 4 * 4 + 2 * (IN + OUT) * 4 * 4
    assert sum(saved) < IN * OUT * 4 / 4
    for k, v in base.state_dict().items():  # still packed, unchanged
        assert torch.equal(v, packed_before[k])


def test_rank_and_kind_are_checked():
    with pytest.raises(MemlmError, match="rank 200 does not fit"):
        LoRALinear(_linear(), r=200)
    with pytest.raises(MemlmError, match="cannot wrap"):
        LoRALinear(nn.Embedding(10, 4))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Decoder(preset("tiny", vocab_size=256, n_layer=2, block_size=64)).eval()


def test_targets_default_all_linear_and_unknown(tiny):
    import copy

    model = copy.deepcopy(tiny)
    names = apply_lora(model)
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.lora_{ab}.weight" for n in names for ab in "AB"]

    model = copy.deepcopy(tiny)
    names = apply_lora(model, targets="all-linear")
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down
    with pytest.raises(MemlmError, match="'c_attn' names no linear layer"):
        apply_lora(copy.deepcopy(tiny), targets="q_proj,c_attn")


def test_step_zero_equals_the_base_and_training_moves_only_the_adapters(tiny):
    import copy

    model = copy.deepcopy(tiny)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = tiny(x)
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    after = model.state_dict()
    for k, v in before.items():  # every base tensor bit for bit, under its wrapped name
        wrapped = k.replace("_proj.", "_proj.base_layer.") if "blocks." in k and "_proj." in k else k
        assert torch.equal(after[wrapped], v), k


@pytest.mark.parametrize("name", BASES)
def test_merge_folds_the_update_into_the_base_kind(name):
    base = _bases()[name]
    layer = _with_random_update(LoRALinear(base, r=4, alpha=8))
    up, down = layer.delta()
    target = kinds.kind_of(base).dense_weight(base) + up @ down
    merged = layer.merged()
    kind = kinds.kind_of(merged)
    assert kind is kinds.kind_of(base)  # the same kind (and, quantized, the same group size)
    assert getattr(merged, "group_size", None) == getattr(base, "group_size", None)
    got = kind.dense_weight(merged)
    if kind.name in ("linear", "lowrank"):  # exact
        torch.testing.assert_close(got, target, rtol=1e-5, atol=1e-6)
    elif kind.name == "sparse_2_4":  # pruned again to 2:4
        assert (got.view(OUT, -1, 4) != 0).sum(-1).max() <= 2
    else:  # rounded again: within half a step of the merged weight
        step = 2 / 127 * target.abs().amax() if kind.name == "int8" else (target.max() - target.min())
        assert (got - target).abs().max() <= step
        torch.testing.assert_close(got, dequantize_weight(module_from_state(
            nn.Linear(IN, OUT), kind.name, quantize_state(_float(target), kind.name, base.group_size or 128))))


def _float(w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_merge_lora_on_a_model_is_exact_for_float(tiny):
    import copy

    model = copy.deepcopy(tiny)
    apply_lora(model, r=4, alpha=8)
    for layer in lora_layers(model).values():
        _with_random_update(layer)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        ref = model(x)
        assert not torch.allclose(ref, tiny(x))
        merged = merge_lora(model)
        assert len(merged) == 4 and not lora_layers(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_every_compressed_layer_class_has_a_kind():
    """A layer class with a spec (what storage records) but no description would be invisible to
    LoRA, GGUF export and the estimator."""
    import memlm.compress as compress

    classes = [getattr(compress, n) for n in compress.__all__ if isinstance(getattr(compress, n), type)]
    with_spec = [c for c in classes if issubclass(c, nn.Module) and callable(getattr(c, "spec", None))]
    assert with_spec and all(c in kinds.KINDS for c in with_spec), [c for c in with_spec if c not in kinds.KINDS]


def test_adapters_gradients_in_one_buffer_are_the_gradients_backward_makes(tiny):
    import copy

    from memlm.train.loop import gradients_in_one_buffer

    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
    grads = []
    for one_buffer in (False, True):
        model = copy.deepcopy(tiny)
        torch.manual_seed(1)
        apply_lora(model, r=4, alpha=8, targets="all-linear", dropout=0.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        trained = [p for p in model.parameters() if p.requires_grad]
        for _ in range(2):  # accumulated over two backwards, as over micro-batches
            if one_buffer and trained[0].grad is None:
                gradients_in_one_buffer(trained)
            F.cross_entropy(model(x[:, :-1]).reshape(-1, 256), x[:, 1:].reshape(-1)).backward()
        if one_buffer:  # still views of the one buffer: backward added into them in place
            assert len({p.grad.untyped_storage().data_ptr() for p in trained}) == 1
        grads.append([p.grad for p in trained])
    for ours, ref in zip(*grads):
        torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)
