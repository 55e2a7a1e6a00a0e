"""memlm.kernels' fused decode block (csrc/decode_block.cpp, memlm.infer.fused) against the
model's own Block: the same logits and the same cache writes, per row at its own position and
slot, in every quantized format and code path; and which models it runs for."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memlm import kernels
from memlm.compress.quantize import module_from_codes, quantize_int8, quantize_model
from memlm.config import ModelConfig
from memlm.infer.engine import (Engine, decode_and_prefill, decode_step, float_linears, fuse_projections,
                                prefill)
from memlm.infer.fused import decode_step as fused_decode_step
from memlm.infer.fused import FusedBlock, fused_blocks
from memlm.infer.generate import generate_ids
from memlm.infer.sampling import SamplingSettings
from memlm.model import Decoder, KVCache
from memlm.model.kv_cache import CacheWindow

# The kernels round each activation row to int8 codes (memlm.kernels): a norm computed in another
# order differs in its last bit, now and then moves a code by one step, and so an output by about
# d * |w| (1e-4 here). Hence 1e-3, not the 1e-5 of float arithmetic alone, for the logits and for
# the cached keys and values of the layers after the first.
TOL = dict(atol=1e-3, rtol=1e-3)

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"memlm kernels unavailable: {kernels._failure}")

LLAMA = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False)
PROMPTS = [[5, 17, 99], [200, 3, 3, 41, 7, 120, 64, 9, 250], [11, 12, 13, 14, 15]]


def llama(n_embd: int = 64, n_head: int = 4, n_kv_heads: int = 2, **extra) -> Decoder:
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=259, block_size=64, n_layer=2, n_head=n_head, n_kv_heads=n_kv_heads,
                      n_embd=n_embd, **{**LLAMA, **extra})
    return Decoder(cfg).eval()


def int8_grouped(model: Decoder, group: int = 32) -> Decoder:
    """Every block Linear as int8 with a scale per group of inputs (GGUF Q8_0's layout)."""
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    q, scales = quantize_int8(child.weight.detach(), group_size=group)
                    setattr(parent, name, module_from_codes("int8", {"weight_int8": q, "scales": scales}))
    return model


def quantized(fmt: str, **shape) -> Decoder:
    model = llama(**shape)
    if fmt == "fp32":
        return float_linears(fuse_projections(model))
    if fmt == "int8-g32":
        return fuse_projections(int8_grouped(model))
    quantize_model(model, fmt.split("-g")[0], group_size=int(fmt.split("-g")[1]) if "-g" in fmt else 128,
                   progress=False)
    return fuse_projections(model)


def _run_both(model: Decoder, window: bool = False, steps: int = 4):
    """Prompts prefilled into slots 3, 0, 1 of two identical pools, then decode steps at each
    row's own position: through the blocks in one pool, the fused op in the other. Yields the
    two steps' logits and the two pools. A third pool runs the engine's whole-step path
    (memlm.infer.fused.decode_step), which must give exactly what the op gives block by block."""
    fused = fused_blocks(model)
    assert fused is not None
    pools = [KVCache(model.config, slots=4, max_len=40) for _ in range(3)]
    slots = torch.tensor([3, 0, 1])
    longest = max(map(len, PROMPTS))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in PROMPTS])
    lengths = torch.tensor([len(p) for p in PROMPTS])
    for pool in pools:
        prefill(model, ids, lengths, pool, slots)
    caches = [CacheWindow(pool, 4, 24) for pool in pools] if window else pools
    tokens, positions = torch.tensor([4, 8, 15]), lengths.clone()
    for _ in range(steps):
        plain = decode_step(model, tokens, positions, caches[0], slots)
        through_op = decode_step(model, tokens, positions, caches[1], slots, fused)
        assert torch.equal(fused_decode_step(model, fused, tokens, positions, caches[2], slots), through_op)
        yield plain, through_op, pools[:2]
        tokens, positions = plain.argmax(-1), positions + 1


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int8", "int8-g32", "fp32"])
def test_fused_decode_steps_equal_the_blocks(fmt, isa):
    model = quantized(fmt, n_embd=128)
    for plain, through_op, pools in _run_both(model):
        torch.testing.assert_close(through_op, plain, **TOL)
        for a, b in zip(pools[0].layers, pools[1].layers):  # the same keys and values, where they belong
            torch.testing.assert_close(b.k, a.k, **TOL)
            torch.testing.assert_close(b.v, a.v, **TOL)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (8, 2)])
def test_fused_decode_of_a_cache_window_and_any_head_grouping(heads):
    """A server's window of its pool is a strided view: the op writes and reads it in place."""
    model = quantized("int4-g32", n_head=heads[0], n_kv_heads=heads[1])
    for plain, through_op, _ in _run_both(model, window=True):
        torch.testing.assert_close(through_op, plain, **TOL)


def test_an_engine_decodes_through_the_op_with_the_blocks_greedy_ids():
    model = quantized("int4-g32")
    reference = copy.deepcopy(model)
    engine = Engine(model, fuse=True, compile=True)
    assert engine.fused is not None and not engine.compiled  # the op, and nothing left to compile
    greedy = SamplingSettings(max_new_tokens=12, temperature=0)
    for p in PROMPTS:
        assert list(generate_ids(engine, p, greedy)) == list(generate_ids(reference, p, greedy))


def test_what_the_op_does_not_take_runs_the_block(monkeypatch):
    assert fused_blocks(fuse_projections(llama())) is None  # float layers not FloatLinear
    gpt2 = llama(norm="layernorm", positions="learned", mlp="gelu", bias=True)
    quantize_model(gpt2, "int8", progress=False)
    assert fused_blocks(fuse_projections(gpt2)) is None
    assert fused_blocks(quantize_model(llama(), "int8", progress=False)) is None  # not fused
    monkeypatch.setenv("MEMLM_DECODE_BLOCK", "0")
    assert fused_blocks(quantized("int8")) is None
    monkeypatch.delenv("MEMLM_DECODE_BLOCK")
    model = quantized("int8")
    fused = fused_blocks(model)
    assert all(isinstance(f, FusedBlock) for f in fused)
    # A bfloat16 cache: the block itself runs (and gives what the block gives).
    caches = [KVCache(model.config, slots=1, max_len=16, dtype=torch.bfloat16) for _ in range(2)]
    for cache in caches:
        prefill(model, torch.tensor([PROMPTS[0]]), torch.tensor([3]), cache)
    a = decode_step(model, torch.tensor([7]), torch.tensor([3]), caches[0])
    b = decode_step(model, torch.tensor([7]), torch.tensor([3]), caches[1], blocks=fused)
    assert torch.equal(a, b)


def test_a_position_outside_the_cache_is_refused():
    model = quantized("int8")
    fused = fused_blocks(model)
    cache = KVCache(model.config, slots=2, max_len=16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        decode_step(model, torch.tensor([1, 2]), torch.tensor([3, 16]), cache, blocks=fused)
    with pytest.raises(RuntimeError, match="outside the cache"):
        decode_step(model, torch.tensor([1]), torch.tensor([3]), cache, torch.tensor([2]), blocks=fused)


def test_float_rows_beyond_the_float_kernel_run_the_block():
    """Past FLOAT_KERNEL_ROWS rows torch's matmul beats memlm's float kernel: such a batch runs
    the block, whose FloatLinear layers take it there."""
    from memlm.infer.engine import FLOAT_KERNEL_ROWS

    model = quantized("fp32")
    fused = fused_blocks(model)
    rows = FLOAT_KERNEL_ROWS + 1
    caches = [KVCache(model.config, slots=rows, max_len=8) for _ in range(2)]
    tokens, positions = torch.arange(rows) % 250, torch.zeros(rows, dtype=torch.long)
    a = decode_step(model, tokens, positions, caches[0])
    b = decode_step(model, tokens, positions, caches[1], blocks=fused)
    assert not fused[0].takes(rows) and torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["int4-g32", "fp32"])
def test_a_mixed_step_through_the_op_equals_the_blocks(fmt):
    """A server's mixed step (memlm.serve.scheduler): a decode step of the pool's first slots, one
    of them parked where its prompt's next piece goes, and the pieces of two prompts, one in that
    parked slot, as one batch of single tokens through the op; against Block.forward_batches on a
    copy of the pool, then a decode step continuing every sequence from each pool."""
    engine = Engine(llama(), fuse=True) if fmt == "fp32" else Engine(quantized(fmt), fuse=True)
    model = engine.model
    assert engine.fused is not None
    pools = [KVCache(model.config, slots=4, max_len=40) for _ in range(2)]
    running, prompt, late = PROMPTS[0] + [42], PROMPTS[1], [31, 32, 33, 34]
    for pool in pools:
        prefill(model, torch.tensor([running]), torch.tensor([len(running)]), pool, torch.tensor([0]))
        prefill(model, torch.tensor([prompt[:4]]), torch.tensor([4]), pool, torch.tensor([1]))
    rest = prompt[4:]
    args = (torch.tensor([8, 0]), torch.tensor([len(running), 4]))
    pieces = (torch.tensor([rest, late + [late[0]] * (len(rest) - len(late))]), torch.tensor([len(rest), len(late)]))
    where = (torch.tensor([1, 3]), torch.tensor([4, 0]))
    reference = decode_and_prefill(model, *args, CacheWindow(pools[0], 2, 40), *pieces, pools[0], *where)
    through_op = engine.decode_and_prefill(*args, CacheWindow(pools[1], 2, 24), *pieces, CacheWindow(pools[1], 4, 32),
                                           *where)
    # Row 1 is the parked row, whose logits the scheduler drops: what it sees differs by design
    # (the op writes its piece's keys over its dummy one before any token attends).
    torch.testing.assert_close(through_op[0][0], reference[0][0], **TOL)
    torch.testing.assert_close(through_op[1], reference[1], **TOL)
    nxt = [decode_step(model, torch.tensor([5, 6, 7]), torch.tensor([len(running) + 1, len(prompt), len(late)]),
                       pool, torch.tensor([0, 1, 3])) for pool in pools]
    torch.testing.assert_close(nxt[1], nxt[0], **TOL)
