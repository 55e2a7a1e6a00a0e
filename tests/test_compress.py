"""Compression: quantization formats and bounds, GPTQ vs RTN on real text, pruning, low-rank, storage."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memlm.compress import (
    Int4Linear,
    Int8Linear,
    LowRankLinear,
    Sparse24Linear,
    choose_group_size,
    config_has_head_dim,
    dequantize_weight,
    factorize_linear,
    folder_bytes,
    gptq_quantize_model,
    gptq_quantize_weight,
    int4_kernel_available,
    load_compressed,
    lowrank_model,
    model_bytes,
    nm_mask,
    prune_2_4,
    prune_ffn,
    prune_heads,
    prune_magnitude,
    quantize_model,
    quantize_state,
    rank_for_energy,
    save_compressed,
)
from memlm.compress import quantize as Q
from memlm.config import ModelConfig
from memlm.data import default_split
from memlm.errors import MemlmError
from memlm.model import Decoder
from memlm.tokenizer import train_bpe

LLAMA = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=128, ffn_hidden=256,
             norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
GPT2 = dict(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, ffn_hidden=256, bias=True)


def kernels_built() -> bool:
    from memlm import kernels

    return kernels.available()


def tiny(flavour=LLAMA, seed=0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(**flavour)).eval()


@pytest.fixture(scope="module")
def text_tokens():
    """Real text: (train ids, eval ids) of the default corpus under a small BPE trained on it."""
    train, evals = default_split()
    tok = train_bpe([train[:200_000]], vocab_size=512)
    return tok, torch.tensor(tok.encode(train[:60_000])), torch.tensor(tok.encode(evals[:20_000]))


def windows(ids: torch.Tensor, n: int, length: int) -> list[torch.Tensor]:
    starts = torch.linspace(0, len(ids) - length - 1, n).long()
    return [ids[s : s + length][None] for s in starts]


# ------------------------------------------------------------------------------ formats


def test_choose_group_size():
    assert choose_group_size(576, 128) == 64  # SmolLM2's width: 128 does not divide it
    assert choose_group_size(576, 32) == 32
    assert choose_group_size(1536, 128) == 128
    with pytest.raises(MemlmError):
        choose_group_size(48, 128)


def test_int8_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.rand(64, 1) * 3
    w[3, 5] = 40.0  # an outlier only widens its own row's scale
    q, scales = Q.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (64,)
    err = (w - q.float() * scales[:, None]).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_group_error_bound(bits, group):
    torch.manual_seed(bits * group)
    w = torch.randn(48, 256) * 0.05 + torch.randn(48, 1) * 0.01
    w[:, 7] += 1.0  # a wide group next to narrow ones
    codes, scales, mins = Q.quantize_groups(w, bits, group)
    assert codes.max() <= 2**bits - 1 and scales.dtype == torch.float16 and scales.shape == (48, 256 // group)
    deq = Q.dequantize_groups(codes, scales, mins)
    err = (w - deq).abs().view(48, -1, group)
    assert (err <= scales.float()[..., None] / 2 * (1 + 1e-3) + 1e-7).all()


def test_pack_roundtrips_exact():
    torch.manual_seed(0)
    c4 = torch.randint(0, 16, (128, 96), dtype=torch.uint8)
    p4 = Q.pack_int4(c4)
    assert p4.shape == (128, 48) and p4.dtype == torch.uint8
    assert torch.equal(p4[0, 0], c4[0, 0] | (c4[0, 1] << 4))  # low nibble first
    assert torch.equal(Q.unpack_int4(p4), c4)
    c3 = torch.randint(0, 8, (16, 64), dtype=torch.uint8)
    p3 = Q.pack_int3(c3)
    assert p3.shape == (16, 24)  # 3 bits per code
    assert torch.equal(Q.unpack_int3(p3), c3)
    assert torch.equal(Q._from_cpu_int4_layout(Q._to_cpu_int4_layout(c4)), c4)


def test_q4_1_grid_is_reproduced_exactly():
    """Weights already on a Q4_1 grid (fp16 scale/min, every 32-group spanning 0..15) come back bit-exact."""
    torch.manual_seed(0)
    rows, cols = 16, 128
    d = (torch.rand(rows, cols // 32) * 0.01 + 1e-3).half()
    m = (-torch.rand(rows, cols // 32) * 0.1).half()
    q = torch.randint(0, 16, (rows, cols // 32, 32))
    q[..., 0], q[..., 1] = 0, 15  # Q4_1 maps each group's min to 0 and max to 15
    w = (q.float() * d.float()[..., None] + m.float()[..., None]).view(rows, cols)
    codes, scales, mins = Q.quantize_groups(w, 4, 32)
    assert torch.equal(scales, d) and torch.equal(mins, m)
    assert torch.equal(codes.view_as(q).long(), q)
    assert torch.equal(Q.dequantize_groups(codes, scales, mins), w)
    holder = nn.Module()  # and through the module path, with the group size a model would pick
    holder.blocks = nn.ModuleList([nn.Linear(cols, rows, bias=False)])
    holder.blocks[0].weight.data.copy_(w)
    quantize_model(holder, "int4", group_size=32, progress=False)
    assert torch.equal(dequantize_weight(holder.blocks[0]), w)


def test_int8_linear_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    m = Q.module_from_state(lin, "int8", quantize_state(lin, "int8"))
    assert isinstance(m, Int8Linear) and m.weight_int8.dtype == torch.int8
    for rows in (1, 5, 40):  # decode and prefill paths
        x = torch.randn(rows, 128)
        ref = lin(x)
        y = m(x)
        assert torch.allclose(y, F.linear(x, dequantize_weight(m), lin.bias), atol=1e-5)
        assert (y - ref).norm() / ref.norm() < 0.01
        yb = m(x.bfloat16())
        assert yb.dtype == torch.bfloat16 and (yb.float() - ref).norm() / ref.norm() < 0.02


@pytest.mark.parametrize("bits", [4, 3])
def test_group_linear_every_compute_path(bits):
    """Dequantize (use_kernel=False), PyTorch's int4 kernel (True) and the default (memlm's own
    kernel where it is built): the same weights, the same state dict, outputs close to the float
    product (the kernels round activations: bf16 for PyTorch's, int8 blocks for memlm's)."""
    from memlm import kernels

    torch.manual_seed(0)
    lin = nn.Linear(192, 128)
    state = quantize_state(lin, f"int{bits}", 64)
    dense = Q.module_from_state(lin, f"int{bits}", state, use_kernel=False)
    torch_kernel = Q.module_from_state(lin, f"int{bits}", state, use_kernel=True)
    default = Q.module_from_state(lin, f"int{bits}", state)
    assert dense.compute_path() == "dequantize"
    assert torch_kernel.compute_path() == ("torch-int4" if bits == 4 and int4_kernel_available() else "dequantize")
    best = "memlm" if kernels.available() else "torch-int4" if int4_kernel_available() else "dequantize"
    assert default.compute_path() == (best if bits == 4 else "dequantize")
    x = torch.randn(7, 192)
    ref = F.linear(x, dequantize_weight(dense), lin.bias)
    with torch.no_grad():
        assert torch.allclose(dense(x), ref, atol=1e-5)
        for fast in (torch_kernel, default):
            assert (fast(x) - ref).norm() / ref.norm() < 0.01
            assert torch.equal(dequantize_weight(fast), dequantize_weight(dense))
            sd_fast, sd_dense = fast.state_dict(), dense.state_dict()
            assert sd_fast.keys() == sd_dense.keys() and all(torch.equal(sd_fast[k], sd_dense[k]) for k in sd_fast)


def test_casting_the_model_keeps_the_stored_scales():
    model = quantize_model(tiny(), "int4", progress=False)
    layer = model.blocks[0].mlp.up_proj
    before = dequantize_weight(layer)
    model.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.bias is None
    assert torch.equal(dequantize_weight(layer), before)
    assert model(torch.randint(0, 512, (1, 4))).dtype == torch.bfloat16


def test_quantize_model_shrinks_and_runs():
    model = tiny()
    ids = torch.randint(0, 512, (2, 16))
    ref = model(ids)
    before = model_bytes(model)
    quantize_model(model, "int8", quantize_embedding="int8", progress=False)
    assert isinstance(model.blocks[0].attn.q_proj, Int8Linear)
    assert not any(type(m) is nn.Linear for m in model.modules())
    after = model_bytes(model)
    assert after < 0.3 * before
    out = model(ids)
    assert (out - ref).norm() / ref.norm() < 0.02
    model4 = quantize_model(tiny(), "int4", group_size=128, progress=False)
    assert all(m.group_size == 128 for m in model4.modules() if isinstance(m, Int4Linear))
    assert (model4(ids) - ref).norm() / ref.norm() < 0.2


# ------------------------------------------------------------------------------ GPTQ


def test_gptq_beats_rtn_on_real_text(text_tokens):
    """Reconstruction error ||W X - Q X|| on held-out real text, for a layer fed real activations."""
    _, train_ids, eval_ids = text_tokens
    model = tiny()
    captured = []
    hook = model.blocks[1].mlp.up_proj.register_forward_hook(lambda m, a, o: captured.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        for w in windows(train_ids, 16, 64) + windows(eval_ids, 8, 64):
            model(w)
    hook.remove()
    X, X_eval = torch.cat(captured[:16]), torch.cat(captured[16:])
    W = model.blocks[1].mlp.up_proj.weight.detach()
    H = 2 * X.t() @ X / len(X)
    for bits in (4, 3):
        rtn = Q.dequantize_groups(*Q.quantize_groups(W, bits, 32))
        for act_order in (False, True):
            gptq = Q.dequantize_groups(*gptq_quantize_weight(W, H, bits, 32, act_order=act_order))
            err = lambda Wq: ((W - Wq) @ X_eval.t()).norm().item()  # noqa: E731
            assert err(gptq) < 0.9 * err(rtn), (bits, act_order, err(gptq), err(rtn))


@pytest.mark.parametrize("flavour, want", [
    (LLAMA, [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    (GPT2, [["attn.q_proj", "attn.k_proj", "attn.v_proj"], ["attn.o_proj"], ["mlp.up_proj"], ["mlp.down_proj"]]),
])
def test_gptq_quantizes_a_block_in_call_order_stages(flavour, want):
    """True-sequential GPTQ: Linears reading the same tensor form one stage, stages in call order."""
    from memlm.compress.gptq import _block_args, _block_inputs, _stages

    model = tiny(flavour)
    xs, rests = _block_inputs(model, [torch.randint(0, 512, (1, 8))])
    block = model.blocks[0]
    linears = {n: m for n, m in block.named_modules() if type(m) is nn.Linear}
    assert _stages(block, linears, xs[0], _block_args(rests[0])) == want


def test_gptq_model_end_to_end(text_tokens):
    _, train_ids, eval_ids = text_tokens
    calib, held_out = windows(train_ids, 8, 64), torch.cat(windows(eval_ids, 4, 64))
    ref = tiny()
    with torch.no_grad():
        ref_logits = ref(held_out)
        rtn = quantize_model(tiny(), "int3", group_size=32, progress=False)(held_out)
        model = gptq_quantize_model(tiny(), calib, bits=3, group_size=32, act_order=True, progress=False)
        gptq = model(held_out)
    assert not any(type(m) is nn.Linear for m in model.blocks.modules())
    assert (gptq - ref_logits).norm() < (rtn - ref_logits).norm()


# ------------------------------------------------------------------------------ pruning


def test_magnitude_pruning():
    model = tiny()
    report = prune_magnitude(model, 0.5, "layerwise")
    assert all(abs(s - 0.5) < 0.01 for s in report["layers"].values())
    model = tiny()
    report = prune_magnitude(model, 0.3, "global")
    assert abs(report["sparsity"] - 0.3) < 0.01
    model(torch.randint(0, 512, (1, 8)))


def test_2_4_pattern_exact():
    model = tiny()
    x = torch.randint(0, 512, (1, 12))
    prune_2_4(model)
    for name, m in model.blocks.named_modules():
        if isinstance(m, nn.Linear):
            zeros = (m.weight.view(m.out_features, -1, 4) == 0).sum(dim=-1)
            assert (zeros >= 2).all(), name
    dense_logits = model(x)
    # the compact form holds the same weights in half the values plus 2-bit positions
    report = prune_2_4(model, compact=True)
    assert report["compact"] and isinstance(model.blocks[0].mlp.down_proj, Sparse24Linear)
    assert torch.allclose(model(x), dense_logits, atol=1e-5)
    w = torch.randn(8, 16)
    assert nm_mask(w).view(8, 4, 4).sum(dim=-1).eq(2).all()


@pytest.mark.parametrize("flavour", [LLAMA, GPT2])
@pytest.mark.parametrize("calibrated", [False, True])
def test_prune_ffn(flavour, calibrated, text_tokens):
    _, train_ids, _ = text_tokens
    model = tiny(flavour)
    before = model.num_params()
    prune_ffn(model, 0.5, calib_batches=windows(train_ids, 2, 32) if calibrated else None)
    assert model.config.ffn_hidden == 128
    assert model.num_params() < before
    assert model.config.num_params() == model.num_params()  # the config matches the shapes
    fresh = Decoder(model.config)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert model(torch.randint(0, 512, (1, 8))).shape == (1, 8, 512)


@pytest.mark.skipif(not config_has_head_dim(), reason="needs ModelConfig.head_dim (asked of the lead)")
def test_prune_heads(text_tokens):
    _, train_ids, _ = text_tokens
    model = tiny()
    prune_heads(model, 1, calib_batches=windows(train_ids, 2, 32))
    c = model.config
    assert (c.n_kv_heads, c.n_head, c.head_dim) == (1, 2, 32)
    assert model.blocks[0].attn.q_proj.out_features == 64
    assert c.num_params() == model.num_params()
    assert model(torch.randint(0, 512, (1, 8))).shape == (1, 8, 512)


def test_prune_heads_explains_missing_config_field():
    if config_has_head_dim():
        pytest.skip("ModelConfig has head_dim")
    with pytest.raises(MemlmError, match="head_dim"):
        prune_heads(tiny(), 1)


# ------------------------------------------------------------------------------ low-rank


def test_lowrank_full_rank_reproduces_layer():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32)
    full = factorize_linear(lin, rank=32)
    x = torch.randn(5, 48)
    assert torch.allclose(full(x), lin(x), atol=1e-5)
    assert torch.allclose(dequantize_weight(full), lin.weight, atol=1e-5)


def test_lowrank_energy_and_size_rule():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(S, 9 / 14) == 1 and rank_for_energy(S, 0.9) == 2 and rank_for_energy(S, 1.0) == 3
    model = tiny()
    before = model.num_params()
    chosen = lowrank_model(model, rank=16, progress=False)
    assert all(r == 16 for r in chosen.values())
    assert isinstance(model.blocks[0].attn.q_proj, LowRankLinear) and model.num_params() < before
    model = tiny()
    chosen = lowrank_model(model, rank=100, progress=False)  # would not save space: left dense
    assert all(r is None for r in chosen.values()) and model.num_params() == before


# ------------------------------------------------------------------------------ storage


def _compressed(kind: str, text_tokens) -> Decoder:
    _, train_ids, _ = text_tokens
    if kind == "int8+emb":
        return quantize_model(tiny(), "int8", quantize_embedding="int8", progress=False)
    if kind == "int4":
        return quantize_model(tiny(), "int4", progress=False)
    if kind == "int4-dequant":
        return quantize_model(tiny(GPT2), "int4", group_size=32, use_kernel=False, progress=False)
    if kind == "gptq3":
        return gptq_quantize_model(tiny(), windows(train_ids, 2, 32), bits=3, group_size=32, progress=False)
    if kind == "gptq4":
        model = gptq_quantize_model(tiny(), windows(train_ids, 2, 32), bits=4, group_size=64, progress=False)
        paths = [m.compute_path() for m in model.modules() if isinstance(m, Int4Linear)]
        assert paths and all(p != "dequantize" for p in paths) == (int4_kernel_available() or kernels_built())
        # a kernel switched on after calibration
        return model
    if kind == "lowrank+int4":
        model = tiny()
        lowrank_model(model, rank=32, progress=False)
        return quantize_model(model, "int4", group_size=32, progress=False)
    if kind == "sparse24":
        model = tiny(GPT2)
        prune_2_4(model, compact=True)
        return model
    if kind == "ffn-pruned+int8":
        model = prune_ffn(tiny(GPT2), 0.5)
        return quantize_model(model, "int8", quantize_embedding="int8", progress=False)
    if kind == "bf16-int4+emb":
        model = tiny().to(torch.bfloat16)
        return quantize_model(model, "int4", quantize_embedding="int8", progress=False)
    if kind == "dense-tied":
        return tiny()
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["int8+emb", "int4", "int4-dequant", "gptq3", "gptq4", "lowrank+int4", "sparse24", "ffn-pruned+int8", "bf16-int4+emb", "dense-tied"]
)
def test_save_load_identical_logits(kind, text_tokens, tmp_path):
    tok = text_tokens[0]
    model = _compressed(kind, text_tokens)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        before = model(ids)
    folder = save_compressed(model, tok, tmp_path / "m")
    loaded, tok2 = load_compressed(folder, use_kernel=False if kind == "int4-dequant" else None)
    with torch.no_grad():
        after = loaded(ids)
    assert torch.equal(before, after)
    assert tok2 is not None and tok2.encode("def f(x):") == tok.encode("def f(x):")
    assert {type(m) for m in loaded.modules()} == {type(m) for m in model.modules()}
    if kind != "dense-tied":
        dense = save_compressed(tiny(), None, tmp_path / "dense")
        assert folder_bytes(folder) < folder_bytes(dense)


def test_save_is_atomic_overwrite(tmp_path):
    folder = tmp_path / "m"
    save_compressed(quantize_model(tiny(), "int8", progress=False), None, folder)
    model = quantize_model(tiny(seed=1), "int4", progress=False)
    save_compressed(model, None, folder)
    loaded, tok = load_compressed(folder)
    assert tok is None and isinstance(loaded.blocks[0].attn.q_proj, Int4Linear)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind
    with pytest.raises(MemlmError):
        load_compressed(tmp_path / "nothing")


def test_int4_bytes_on_disk(tmp_path):
    """int4-g64 blocks cost ~4.5 bits per weight: the packed tensors are what is stored."""
    model = tiny()
    n_block_weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, nn.Linear))
    quantize_model(model, "int4", group_size=64, progress=False)
    stored = sum(
        b.numel() * b.element_size()
        for m in model.blocks.modules() if isinstance(m, Int4Linear)
        for b in (m.weight_packed, m.scales, m.mins)
    )
    assert stored * 8 / n_block_weights == pytest.approx(4.5)
    assert dataclasses.asdict(model.config) == dataclasses.asdict(load_compressed(save_compressed(model, None, tmp_path / "q"))[0].config)


def test_tensor_file_reads_what_safetensors_wrote(tmp_path):
    from safetensors.torch import load_file, save_file

    from memlm.compress.storage import TensorFile

    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
        "f16": torch.randn(2, 2, 2, generator=g).half(), "i8": torch.randint(-128, 127, (4, 9), dtype=torch.int8),
        "u8": torch.randint(0, 255, (33,), dtype=torch.uint8), "i64": torch.arange(6).view(2, 3),
        "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    reference = load_file(str(tmp_path / "t.safetensors"))
    with TensorFile(tmp_path / "t.safetensors") as f:
        assert sorted(f.keys()) == sorted(tensors)
        for key in tensors:
            got = f.read(key)
            assert got.dtype == reference[key].dtype and torch.equal(got, reference[key]), key
    raw = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) - 20])  # data shorter than the header says
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for bad in ("cut", "junk"):
        with pytest.raises(MemlmError, match="not a readable safetensors file"):
            TensorFile(tmp_path / f"{bad}.safetensors")


def test_int8_float_path_converts_a_slice_at_a_time(monkeypatch):
    """A tied int8 head (vocab x d) is converted in row slices: same result as all at once."""
    torch.manual_seed(0)
    w, scales = Q.quantize_int8(torch.randn(1000, 64))
    x = torch.randn(2, 3, 64)
    whole = F.linear(x, w.float()) * scales
    monkeypatch.setattr(Q, "INT8_CHUNK_ELEMENTS", 64 * 97)  # 97 rows per slice: the last one is partial
    assert torch.allclose(Q._int8_matmul(x, w, scales), whole, atol=1e-5, rtol=1e-5)


def test_loading_holds_one_copy_of_the_weights(tmp_path):
    """In a fresh process, loading an int4 folder raises the peak resident set by about the model's
    own bytes: no mapped second copy of the file, no float copy, no import of dynamo/sympy."""
    import json
    import subprocess
    import sys

    cfg = dict(LLAMA, vocab_size=4096, n_layer=6, n_embd=512, ffn_hidden=2048, n_head=8, n_kv_heads=4)
    model = quantize_model(tiny(cfg), "int4", group_size=64, quantize_embedding="int8", progress=False)
    folder = save_compressed(model, None, tmp_path / "m")
    script = (
        "import json, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from memlm.compress import load_compressed\n"
        "from memlm.compress.storage import model_bytes\n"
        "from memlm.compress.quantize import int4_kernel_available\n"
        "from memlm.memory.measure import current_rss_bytes, peak_rss_bytes\n"
        "int4_kernel_available()  # maps the kernel library's code: the runtime's, not the model's\n"
        "before = current_rss_bytes()\n"
        "model, _ = load_compressed(sys.argv[1])\n"
        "print(json.dumps({'added': peak_rss_bytes() - before, 'model': model_bytes(model),\n"
        "                  'sympy': 'sympy' in sys.modules}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(folder)], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert not m["sympy"]
    assert m["model"] > 10 * 2**20
    assert m["added"] <= 1.25 * m["model"] + 8 * 2**20, m
