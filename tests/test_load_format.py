"""Loading straight into a weight format: every loader converts tensor by tensor as it reads.

GGUF blocks already on the target's grid are checked against gguf's own reader and dequantizer
(the bits must be the file's); float checkpoints (HF folders, memlm runs, other GGUF types) must
give exactly what loading in float32 and then `quantize_model` gives. The SmolLM2 tests check the
shipped Q4_1 file, and what a fresh process loading it for int4 really holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from memlm.compress import load_compressed, quantize_model, save_compressed
from memlm.compress.quantize import (
    GroupQuantLinear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    Int8TiedHead,
    dequantize_weight,
)
from memlm.compress.storage import model_bytes
from memlm.config import ModelConfig, to_toml
from memlm.errors import MemlmError
from memlm.interop.gguf import load_gguf, save_gguf
from memlm.interop.hf import load_hf, save_hf
from memlm.loading import load, load_model
from memlm.memory.estimate import estimate_for_model, inference_weight_bytes
from memlm.model import Decoder
from tests.test_gguf import random_model  # the one helper for a model whose norms and biases are not at init
from memlm.tokenizer import Tokenizer, train_bpe

VOCAB = 320
LLAMA = ModelConfig(
    name="tiny-llama", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=128,
    ffn_hidden=192, norm="rmsnorm", norm_eps=1e-6, positions="rope", mlp="swiglu", bias=False,
    tied_embeddings=False,
)
GPT2 = ModelConfig(
    name="tiny-gpt2", vocab_size=VOCAB, block_size=64, n_layer=2, n_head=4, n_embd=64, ffn_hidden=256,
    norm="layernorm", positions="learned", mlp="gelu", gelu_approximate="tanh", bias=True, tied_embeddings=True,
)
PROJ = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IDS = torch.tensor([[1, 5, 9, 33, 2, 250, 17, 8, 64, 3]])


def block_linears(model: Decoder) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if n.startswith("blocks.") and n.endswith(PROJ)}


def logits(model: Decoder) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).float()


def plain_path(model: Decoder) -> Decoder:
    """Quantized layers on PyTorch's float paths: float32 arithmetic on exactly the stored grid."""
    for m in model.modules():
        if isinstance(m, GroupQuantLinear):
            m.set_kernel(False)
        elif hasattr(m, "memlm_kernel"):  # memlm.kernels' int8 ops round the activations to int8
            m.memlm_kernel = False
    return model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    base = train_bpe(["some text for a tiny tokenizer, and some more text: 1 2 3. " * 40], vocab_size=300,
                     special_tokens=["<|endoftext|>"])
    return Tokenizer(base.backend, bos_id=0, eos_id=0)


def file_tensors(path) -> dict[str, gguf.ReaderTensor]:
    """The file's tensors through gguf's own reader (independent of memlm's)."""
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (interleaved pairs) back to rotate-half, written out again here."""
    hd = w.shape[0] // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- GGUF: blocks copied as they are --------------------------------------------------------------

def test_q4_1_blocks_become_int4_layers_bit_for_bit(tmp_path, tok):
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q4_1")
    raw = file_tensors(path)
    model, _ = load_gguf(path, weight_format="int4")
    gg = {"attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v", "attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, m in block_linears(model).items():
        assert isinstance(m, Int4Linear) and m.group_size == 32, name
        i, proj = name.split(".")[1], name.split(".", 2)[2]
        t = raw[f"blk.{i}.{gg[proj]}.weight"]
        assert t.tensor_type == QType.Q4_1
        blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        mn = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        w = gguf.quants.dequantize(np.asarray(t.data), QType.Q4_1)
        heads = {"attn.q_proj": LLAMA.n_head, "attn.k_proj": LLAMA.n_kv_heads}.get(proj)
        if heads:  # rows move whole: the reordering applies to d and m as to the values
            d, mn, w = unpermute(d, heads), unpermute(mn, heads), unpermute(w, heads)
        # The file's fp16 d and m, and its values: d*q + m in float32, the same two operations.
        assert np.array_equal(m.scales.numpy(), d) and np.array_equal(m.mins.numpy(), mn), name
        assert torch.equal(dequantize_weight(m), torch.from_numpy(w)), name
    # The Q8_0 embedding and output head (save_gguf keeps them 8-bit under Q4_1) stay int8.
    assert isinstance(model.tok_emb, Int8Embedding) and model.tok_emb.group_size == 32
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.group_size == 32
    emb = raw["token_embd.weight"]
    assert torch.equal(dequantize_weight(model.tok_emb),
                       torch.from_numpy(gguf.quants.dequantize(np.asarray(emb.data), QType.Q8_0)))
    # So the model computes with exactly the float32 load's weights (whose values are the
    # file's dequantization): on the float path the logits agree to float32 rounding (the int8
    # head is a matmul split in row slices, which may sum in another order).
    ref, _ = load_gguf(path)
    assert torch.allclose(logits(plain_path(model)), logits(ref), atol=1e-5, rtol=0)


def test_q8_0_blocks_become_group_32_int8_layers_exactly(tmp_path, tok):
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q8_0")
    raw = file_tensors(path)
    model, _ = load_gguf(path, weight_format="int8")
    ref, _ = load_gguf(path)
    for name, m in block_linears(model).items():
        assert isinstance(m, Int8Linear) and m.group_size == 32 and m.scales.shape == (m.out_features, m.in_features // 32)
        assert torch.equal(dequantize_weight(m), ref.get_submodule(name).weight), name
    v = raw["blk.0.attn_v.weight"]  # codes and scales as stored (a tensor llama.cpp does not reorder)
    blocks = np.asarray(v.data).reshape(v.data.shape[0], -1, 34)
    m = model.blocks[0].attn.v_proj
    assert np.array_equal(m.weight_int8.numpy(), blocks[..., 2:].copy().view(np.int8).reshape(m.weight_int8.shape))
    assert np.array_equal(m.scales.numpy(), blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert torch.allclose(logits(plain_path(model)), logits(ref), atol=1e-5, rtol=0)


def test_gpt2_fused_qkv_splits_into_int4_layers(tmp_path, tok):
    path = save_gguf(random_model(GPT2), tok, tmp_path / "m.gguf", qtype="Q4_1")
    model, _ = load_gguf(path, weight_format="int4")
    ref, _ = load_gguf(path)
    for name, m in block_linears(model).items():
        assert isinstance(m, Int4Linear) and m.group_size == 32, name
        assert torch.equal(dequantize_weight(m), ref.get_submodule(name).weight), name
        assert torch.equal(m.bias, ref.get_submodule(name).bias), name
    assert isinstance(model.lm_head, Int8TiedHead)  # tied: the head computes from the int8 table
    assert torch.allclose(logits(plain_path(model)), logits(ref), atol=1e-5, rtol=0)


def test_other_types_are_dequantized_then_converted_like_a_float_checkpoint(tmp_path, tok):
    """A Q8_0 file loaded for int4 (and an F16 one for int8) is RTN-quantized from the exact
    dequantization, tensor by tensor: the same codes as loading float32, then quantize_model."""
    for qtype, fmt in (("Q8_0", "int4"), ("F16", "int8")):
        path = save_gguf(random_model(LLAMA), tok, tmp_path / f"{qtype}.gguf", qtype=qtype)
        model, _ = load_gguf(path, weight_format=fmt)
        ref = quantize_model(load_gguf(path)[0], fmt, progress=False)
        for name, m in block_linears(model).items():
            theirs = ref.get_submodule(name)
            assert type(m) is type(theirs) and getattr(m, "group_size", None) == getattr(theirs, "group_size", None)
            assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), theirs.state_dict().values())), name
        # The embedding: int8 straight from Q8_0 blocks; an F16 table stays float32.
        assert isinstance(model.tok_emb, Int8Embedding) == (qtype == "Q8_0")


def test_bf16_is_the_float_load_cast_to_bf16(tmp_path, tok):
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q8_0")
    model, _ = load_gguf(path, weight_format="bf16")
    ref = load_gguf(path)[0].to(torch.bfloat16)
    assert {t.dtype for t in [*model.parameters(), *model.buffers()]} == {torch.bfloat16}
    for (name, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(logits(model), logits(ref))


def test_bad_format_requests(tmp_path, tok):
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q8_0")
    with pytest.raises(MemlmError, match="unknown weight format 'int2'"):
        load_model(path, weight_format="int2")
    with pytest.raises(MemlmError, match="contradicts weight_format 'int4'"):
        load_model(path, dtype=torch.bfloat16, weight_format="int4")


# ---- float checkpoints: converted while read, identical to load-then-quantize ---------------------

def test_load_converts_on_one_torch_thread_and_restores_the_count(tmp_path, tok, monkeypatch):
    """The loader's conversions run with one torch thread (see memlm.loading.one_torch_thread);
    the caller's thread count is back afterwards, on success and on error."""
    import memlm.interop.gguf as memlm_gguf

    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q4_1")
    seen = []
    real = memlm_gguf._tokenizer_from
    monkeypatch.setattr(memlm_gguf, "_tokenizer_from", lambda f: (seen.append(torch.get_num_threads()), real(f))[1])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        load(path, weight_format="int4")
        assert seen == [1] and torch.get_num_threads() == 2
        (tmp_path / "bad.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little"))  # cut after the version
        with pytest.raises(MemlmError, match="not a valid GGUF file"):
            load(tmp_path / "bad.gguf")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_in_order_keeps_the_order_bounds_the_lead_and_raises_in_order():
    import threading
    import time

    from memlm.compress.assemble import InOrder

    started, lock = [], threading.Lock()

    def convert(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # later items may finish first
        if i == 7:
            raise ValueError("item 7")
        return i * i

    got = []
    with pytest.raises(ValueError, match="item 7"):
        with InOrder(convert, range(12), workers=2, ahead=2) as results:
            for _ in range(200):  # the first conversions start before anything is taken
                if started:
                    break
                time.sleep(0.005)
            assert started
            for r in results:
                got.append(r)
                with lock:  # at most `ahead` + 1 items past the last one taken
                    assert len(started) <= len(got) + 3
    assert got == [i * i for i in range(7)]
    assert max(started) < 12
    with InOrder(lambda i: i + 1, range(5), workers=0) as results:  # inline, as each item is taken
        assert list(results) == [1, 2, 3, 4, 5]

    def items():  # making an item fails before any `with` block: the threads stop all the same
        yield 1
        raise ValueError("no item 2")

    with pytest.raises(ValueError, match="no item 2"):
        InOrder(lambda i: i, items(), workers=2, ahead=5)
    assert not [t for t in threading.enumerate() if t.name.startswith("memlm-load")]


def same_model(a: Decoder, b: Decoder) -> None:
    """Same module types and bit-identical tensors (codes, scales, mins, floats), same logits."""
    assert [type(m) for m in a.modules()] == [type(m) for m in b.modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert torch.equal(logits(a), logits(b))


def converted(model: Decoder, fmt: str) -> Decoder:
    return model.to(torch.bfloat16) if fmt == "bf16" else quantize_model(model, fmt, progress=False)


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_hf_folder_loads_into_the_format(tmp_path, config, fmt):
    save_hf(random_model(config), tmp_path / "hf")
    same_model(load_hf(tmp_path / "hf", weight_format=fmt), converted(load_hf(tmp_path / "hf"), fmt))


def write_run(folder, model: Decoder, tokenizer: Tokenizer) -> None:
    """A run folder as memlm train leaves it: config.toml, the tokenizer, checkpoints/step-N/."""
    from memlm.train.checkpoint import save_checkpoint

    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml({"model": model.config.to_dict()}), encoding="utf-8")
    tokenizer.save(folder)
    save_checkpoint(folder, 3, model, None, {})


@pytest.mark.parametrize("fmt", ["int8", "int4", "bf16"])
@pytest.mark.parametrize("config", [LLAMA, GPT2], ids=["untied", "tied"])
def test_run_folder_loads_into_the_format(tmp_path, tok, config, fmt):
    write_run(tmp_path / "run", random_model(config), tok)
    lm = load(tmp_path / "run", weight_format=fmt)
    same_model(lm.model, converted(load(tmp_path / "run").model, fmt))
    if config.tied_embeddings:
        assert lm.model.lm_head.weight is lm.model.tok_emb.weight


def test_compressed_folder_keeps_its_format(tmp_path, tok):
    folder = save_compressed(quantize_model(random_model(LLAMA), "int4", progress=False), tok, tmp_path / "c")
    as_is = load_model(folder)[0]
    same_model(load_model(folder, weight_format="int4")[0], as_is)
    with pytest.raises(MemlmError, match="compressed as int4: it cannot be loaded as int8") as e:
        load_model(folder, weight_format="int8")
    assert "weight_format=None" in e.value.hint


# ---- group-wise int8: saved, exported and estimated -------------------------------------------------

def test_group_int8_saves_and_exports_exactly(tmp_path, tok):
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q8_0")
    model, _ = load_gguf(path, weight_format="int8")
    folder = save_compressed(model, tok, tmp_path / "c")
    meta = json.loads((folder / "memlm_model.json").read_text())
    assert meta["version"] == 2 and meta["layers"]["blocks.0.attn.q_proj"] == {"kind": "int8", "group_size": 32}
    back, _ = load_compressed(folder)
    same_model(back, model)
    # Per-row int8 folders are written as before (version 1, no group size).
    per_row = save_compressed(quantize_model(random_model(LLAMA), "int8", progress=False), None, tmp_path / "r")
    meta = json.loads((per_row / "memlm_model.json").read_text())
    assert meta["version"] == 1 and meta["layers"]["blocks.0.attn.q_proj"] == {"kind": "int8"}
    # Back to Q8_0: the codes and fp16 scales are the file's, so every block comes back byte for byte.
    again = save_gguf(model, tok, tmp_path / "again.gguf", qtype="Q8_0")
    first, second = file_tensors(path), file_tensors(again)
    for name, t in first.items():
        assert np.array_equal(np.asarray(t.data), np.asarray(second[name].data)), name


def test_estimate_counts_gguf_grids_exactly(tmp_path, tok):
    """int4 with groups of 32 and a group-32 int8 embedding: the estimator's weight bytes are
    the loaded model's bytes (plus the int4 kernel's (scale, zero) cache, made on first use)."""
    path = save_gguf(random_model(LLAMA), tok, tmp_path / "m.gguf", qtype="Q4_1")
    model, _ = load_gguf(path, weight_format="int4")
    logits(model)  # the kernel's cache
    cache = sum(m._scale_zeros.numel() * 2 for m in model.modules()
                if isinstance(m, GroupQuantLinear) and m._scale_zeros is not None)
    kernel = any(getattr(m, "kernel_layout", False) for m in model.modules())
    est = estimate_for_model(model, 1, 32, 8)
    assert est["weights"] == model_bytes(model) + cache
    assert est["weights"] == inference_weight_bytes(LLAMA, "int4", True, kernel, group_size=32, embedding_group_size=32)
    assert "int4 g32" in next(t.formula for t in est.terms if t.name == "weights")


# ---- SmolLM2 as shipped ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm_int4(smollm2_gguf_path):
    return load_gguf(smollm2_gguf_path, weight_format="int4")[0]


@pytest.mark.slow
def test_smollm2_int4_load_is_the_file(smollm2_gguf_path, smollm_int4):
    """210 Q4_1 tensors -> Int4Linear g32 with the file's d and m; Q8_0 table -> int8 g32.

    Logits: on the dequantizing path the model computes with exactly the float32 load's weights
    (which the GGUF tests check against transformers), so they agree to float32 rounding (1e-4;
    0 was measured). The CPU int4 kernel (the default) rounds each group's scale and zero
    (m + 8d) to bf16 and runs on bf16 activations: measured 0.6% relative (L2) error on these
    logits, max 0.4 with a spread of ~4, about half what casting the whole float32 model to
    bf16 costs (1.2%), so the bound is 2% and 90% of next tokens unchanged.
    """
    model = smollm_int4
    raw = file_tensors(smollm2_gguf_path)
    lins = block_linears(model)
    assert len(lins) == 210 and all(isinstance(m, Int4Linear) and m.group_size == 32 for m in lins.values())
    t = raw["blk.7.ffn_down.weight"]
    m = model.blocks[7].mlp.down_proj
    blocks = np.asarray(t.data).reshape(t.data.shape[0], -1, 20)
    assert np.array_equal(m.scales.numpy(), blocks[..., 0:2].copy().view(np.float16)[..., 0])
    assert np.array_equal(m.mins.numpy(), blocks[..., 2:4].copy().view(np.float16)[..., 0])
    assert torch.equal(dequantize_weight(m), torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), QType.Q4_1)))
    assert isinstance(model.tok_emb, Int8Embedding) and model.tok_emb.group_size == 32
    assert isinstance(model.lm_head, Int8TiedHead)

    ref, _ = load_gguf(smollm2_gguf_path)
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, kernel = ref(ids), model(ids)
        assert (kernel - want).norm() / want.norm() < 0.02
        assert (kernel.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        assert torch.allclose(plain_path(model)(ids), want, atol=1e-4, rtol=0)


FRESH_LOAD = r"""
import json, sys, time
from memlm.loading import load
from memlm.memory.estimate import estimate_for_model
from memlm.memory.measure import process_peak_rss_bytes
t = time.perf_counter()
lm = load(sys.argv[1], weight_format="int4")
load_s = time.perf_counter() - t
loaded = process_peak_rss_bytes()
lm.generate("The with statement", max_new_tokens=8, temperature=0)
b = estimate_for_model(lm.model, 1, 64, 16)
print(json.dumps({"load_s": load_s, "loaded": loaded, "generated": process_peak_rss_bytes(), "prediction": b.total,
                  "weights": b["weights"]}))
"""


@pytest.mark.slow
def test_fresh_process_int4_load_stays_under_the_prediction(smollm2_gguf_path):
    """The issue's "done": a fresh process (the public API, the default environment: no allocator
    variables, torch's own thread count) loading SmolLM2 for int4, and generating with it, peaks
    under the int4 prediction (runtime, tokenizer, the int4 kernels' first-use pages, weights, KV
    cache, workspace). Loading float32 and then quantizing used to peak at ~1.1 GiB."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_NUM_THREADS"))}
    proc = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(smollm2_gguf_path)], capture_output=True,
                          text=True, check=True, env=env)
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    assert m["weights"] < 115 * 2**20  # int4 g32 blocks + the Q8_0 embedding kept as int8
    assert m["loaded"] <= m["generated"] <= m["prediction"], m
