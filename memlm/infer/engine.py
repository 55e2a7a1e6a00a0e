"""How a model runs when it generates: the two steps (prefill a prompt, decode one token per
sequence), the KV cache pool they write, and whether the decode step is compiled.

`prefill` and `decode_step` are plain functions of tensors: positions and cache slots are
tensors, nothing on the Python side changes per token, so `torch.compile` traces the decode step
once per shape and a scheduler can put any sequences of any lengths in one batch. `Engine`
holds what is worth keeping between generations: the fused model, the cache pool, the
compiled step.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from torch import nn

from memlm.config import PREFILL_CHUNK, cache_length
from memlm.infer.fused import decode_step as fused_decode_step
from memlm.infer.fused import fused_blocks, op_fits
from memlm.model import Decoder, KVCache

log = logging.getLogger("memlm")



@torch.no_grad()
def prefill(model: Decoder, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
            slots: torch.Tensor | None = None, chunk: int = PREFILL_CHUNK,
            starts: torch.Tensor | None = None) -> torch.Tensor:
    """Run prompts through the model, filling the cache from position 0 (or each row's `starts`:
    the rest of a prompt whose beginning an earlier call wrote); the logits after each row's last
    token in `ids` (B, V).

    ids (B, T): right-padded prompts, lengths (B,) their real lengths. Padding sits at positions
    after a row's prompt, where its own first new tokens will overwrite it, and no query ever sees
    a key ahead of its own position: a padded row computes what it would alone."""
    B, T = ids.shape
    last = lengths - 1
    offset = torch.zeros(B, 1, dtype=torch.long, device=ids.device) if starts is None else starts[:, None]
    final = None
    for start in range(0, T, chunk):
        piece = ids[:, start:start + chunk]
        positions = offset + torch.arange(start, start + piece.shape[1], device=ids.device)
        h = model.hidden_states(piece, cache, positions, slots)  # (B, t, d)
        if final is None:
            final = h.new_empty(B, h.shape[-1])
        here = (last >= start) & (last < start + piece.shape[1])
        final[here] = h[here, (last - start)[here]]
    return model.lm_head(final)


@torch.no_grad()
def decode_and_prefill(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, decode_cache: KVCache,
                       ids: torch.Tensor, lengths: torch.Tensor, prefill_cache: KVCache, slots: torch.Tensor,
                       starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step (tokens, positions as in decode_step, the cache's first slots) and the next
    piece of some prompts (ids, lengths, slots, starts as in prefill; one chunk) in ONE forward:
    (decode logits (B, V), logits after each piece's last token (B', V)). Each weight is read
    once for both (Block.forward_batches), where two forwards read them twice: a server's
    running sequences wait for one step, not a step and a piece. The decode rows run first, so a
    piece's keys overwrite whatever its slot's parked row wrote (memlm.serve.scheduler)."""
    at = starts[:, None] + torch.arange(ids.shape[1], device=ids.device)
    stepped, pieces = model.hidden_states_batches([(tokens[:, None], decode_cache, positions[:, None], None),
                                                   (ids, prefill_cache, at, slots)])
    last = pieces[torch.arange(ids.shape[0], device=ids.device), lengths - 1]
    logits = model.lm_head(torch.cat([stepped[:, -1], last]))
    return logits[:tokens.shape[0]], logits[tokens.shape[0]:]


@torch.no_grad()
def decode_step(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, blocks: list | None = None) -> torch.Tensor:
    """One new token per sequence: tokens (B,) at positions (B,) -> next-token logits (B, V).
    blocks: compiled forms of model.blocks to run instead (Engine(compile=True))."""
    return model(tokens[:, None], cache, positions[:, None], slots, blocks=blocks)[:, -1]


@torch.no_grad()
def decode_and_prefill_tokens(model: Decoder, tokens: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor,
                              lengths: torch.Tensor, pool: KVCache, slots: torch.Tensor, starts: torch.Tensor,
                              blocks: list) -> tuple[torch.Tensor, torch.Tensor]:
    """decode_and_prefill (its arguments; the decode rows are slots 0..B-1 of `pool`) as one batch
    of single tokens, each at its own position in its own slot: the form the fused block op
    takes (memlm.infer.fused). The op writes every token's key and value before any attends, in
    order, so each piece token sees its piece's earlier tokens, and a piece overwrites what its
    slot's parked row wrote, as in decode_and_prefill (that row's own logits, which the scheduler
    drops, then see the piece's keys)."""
    B, (P, T) = tokens.shape[0], ids.shape
    device = ids.device
    at = starts[:, None] + torch.arange(T, device=device)
    flat = torch.cat([tokens, ids.reshape(-1)])[:, None]
    where = torch.cat([positions, at.reshape(-1)])[:, None]
    rows = torch.cat([torch.arange(B, device=device), slots.repeat_interleave(T)])
    h = model.hidden_states(flat, pool, where, rows, blocks)[:, 0]
    last = B + torch.arange(P, device=device) * T + lengths - 1
    logits = model.lm_head(torch.cat([h[:B], h[last]]))
    return logits[:B], logits[B:]


# ------------------------------------------------------------------------------ fusion


def fuse_projections(model: Decoder) -> Decoder:
    """q/k/v into one `qkv_proj`, gate/up into one `gate_up_proj`, in place, for inference.

    One matmul instead of three reads the activations once and makes one kernel call per token
    instead of three (at batch 1 on a CPU the calls, not the FLOPs, are much of the cost). Only
    layers of one kind and format are fused; anything else (LoRA, low-rank, mixed formats) is
    left as it is.

    Each block's freed parts go back to the system before the next block is fused: the fused
    copies never fit the holes the parts leave in glibc's heap, and without this the model's
    resident memory grew by ~45 MiB (SmolLM2 int8) for the pages of weights no longer used."""
    from memlm.compress.quantize import concat_linears  # the formats know how to concatenate
    from memlm.memory.measure import return_free_heap

    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        if attn.qkv_proj is None:
            fused = concat_linears([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                attn.qkv_proj = fused
                del attn.q_proj, attn.k_proj, attn.v_proj
        if getattr(mlp, "gate_up_proj", False) is None:
            fused = concat_linears([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                mlp.gate_up_proj = fused
                del mlp.gate_proj, mlp.up_proj
        return_free_heap()
    return model


# Up to this many rows a float32 layer runs memlm's own kernel (memlm.kernels.float_linear), from
# here on torch's matmul: on the 2-core AMD EPYC of bench/results (SmolLM2's 30 blocks, 2 threads,
# 2026-12-04) the kernel took 137 ms at 64 rows against MKL's 181, and at 128 rows the two tied.
FLOAT_KERNEL_ROWS = 64


class FloatLinear(nn.Module):
    """A float32 nn.Linear for inference on a CPU: memlm's kernel for the few rows of a decode step
    or a server's batch (memlm/kernels/csrc/float_linear.cpp), torch's matmul for longer inputs
    (prefill). The weight is the layer's own, in nn.Linear's layout (a tied head shares the
    embedding's), read straight from memory each call.

    Why not oneDNN's packed matmul (what inductor's freezing uses): its one-row path is a GEMM's.
    Same machine and blocks as FLOAT_KERNEL_ROWS: one row 33-35 ms in oneDNN's packed layout,
    19-24 ms in memlm's kernel; 16 rows 69 against 57. Inference only: no gradient flows through
    it, and the weight is no longer an nn.Parameter."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", linear.weight.detach(), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features > FLOAT_KERNEL_ROWS or x.dtype != torch.float32:
            return nn.functional.linear(x, self.weight, self.bias)
        y = torch.ops.memlm.float_linear(x, self.weight)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def float_linears(model: Decoder, head_only: bool = False) -> Decoder:
    """Every float32 nn.Linear of the blocks (unless head_only: compiled blocks keep theirs for
    inductor) and the head into a FloatLinear, in place, where memlm's kernels are built. Anything
    else (quantized, LoRA, low-rank layers, other dtypes) is left as it is."""
    from memlm import kernels

    if not kernels.available():
        return model

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if type(child) is nn.Linear and child.weight.dtype == torch.float32:
                setattr(parent, name, FloatLinear(child))
            else:
                convert(child)

    if not head_only:
        for block in model.blocks:
            convert(block)
    head = model.lm_head
    if type(head) is nn.Linear and head.weight.dtype == torch.float32:
        model.lm_head = FloatLinear(head)
    return model


# ------------------------------------------------------------------------------ compile


def inductor_cache_dir() -> Path:
    """Where compiled kernels are kept between runs (~/.cache/memlm/inductor, or $MEMLM_CACHE/inductor)."""
    root = os.environ.get("MEMLM_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "memlm"
    return Path(root) / "inductor"


def compile_blocks(model: Decoder) -> list:
    """The model's blocks compiled with inductor for decoding: static shapes, each block one graph,
    the C++ wrapper on CPU (less Python per call). Kernels are cached on disk, so a second run
    starts warm.

    Regional compilation: every block has the same code and, with the cache handed in per layer,
    the same kinds of arguments, so the first block's compiled code serves all of them (the
    guards check shapes, not which block): a 30-layer model compiles one block's worth of C++
    instead of thirty (SmolLM2 int4: ~5 min cold under load as one whole-step graph). Weights
    stay inputs (no freezing, which would make every block's weights constants of its own
    graph, and measured no faster here). Embedding, mask, final norm and head stay eager: a
    handful of calls per token."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    import torch._inductor.config as inductor_config

    inductor_config.cpp_wrapper = True
    return [torch.compile(block, fullgraph=True, dynamic=False) for block in model.blocks]


class Engine:
    """A model ready to generate: fused projections (when asked; on a CPU the float32 layers then
    run memlm's kernel, `float_linears`), a reusable cache pool, and the decode step eager or
    compiled.

    compile: compile the decode step (the first call of each shape pays the compile time, kept in
    `compile_seconds`); if compiling fails the engine says so in one line and stays eager. Where
    memlm's fused block op takes the model (`fused`: memlm.infer.fused), decode steps run it
    instead, eager, and nothing is compiled."""

    def __init__(self, model: Decoder, compile: bool = False, fuse: bool = False,
                 cache_dtype: torch.dtype | None = None):
        self.model = fuse_projections(model) if fuse else model
        # Where the fused block op fits (memlm.infer.fused), a decode step runs it eager: each
        # block is then one C++ op, and compiling has nothing left to fuse.
        fusable = fuse and op_fits(self.model)
        if fuse and self.device.type == "cpu":
            # Compiled blocks keep nn.Linear for inductor; the op and eager blocks take FloatLinear.
            float_linears(self.model, head_only=compile and not fusable)
        self.cache_dtype = cache_dtype
        self.compiled = False
        self.compile_seconds = 0.0
        self._cache: KVCache | None = None
        self._shapes_seen: set[tuple] = set()
        self._blocks: list | None = None
        self.fused = fused_blocks(self.model) if fusable else None
        if compile and self.fused is not None:
            log.info("memlm: decode runs memlm's fused block op; nothing is compiled")
            compile = False
        if compile:
            try:
                self._blocks = compile_blocks(self.model)
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - any failure to set up compile means eager
                log.warning("memlm: decode runs eager, torch.compile is unavailable (%s)", str(e).splitlines()[0])

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    def cache(self, slots: int, needed: int) -> KVCache:
        """A cache pool of `slots` sequences of at least `needed` tokens, reused when the shape repeats
        (what is left in it is never seen: each query sees only positions its own row wrote)."""
        max_len = cache_length(needed, self.model.config.block_size)
        dtype = self.cache_dtype or self._float_dtype()
        c = self._cache
        if c is None or c.slots != slots or c.max_len != max_len or c.dtype != dtype:
            self._cache = None  # free the old pool before allocating the new one
            c = self._cache = KVCache(self.model.config, slots, max_len, dtype=dtype, device=self.device)
        return c

    def release_cache(self) -> None:
        self._cache = None

    def _float_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            if p.dtype.is_floating_point:
                return p.dtype
        return torch.float32

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, starts: torch.Tensor | None = None) -> torch.Tensor:
        return prefill(self.model, ids, lengths, cache, slots, starts=starts)

    @property
    def mixes(self) -> bool:
        """Whether `decode_and_prefill` runs as one forward (eager; a compiled step has its own shapes)."""
        return not self.compiled

    def decode_and_prefill(self, tokens, positions, decode_cache, ids, lengths, prefill_cache, slots, starts):
        if self.fused is not None and self.fused[0].takes(tokens.shape[0] + ids.numel()):
            pool = getattr(prefill_cache, "pool", prefill_cache)  # windows of one pool: the op reads to each position
            return decode_and_prefill_tokens(self.model, tokens, positions, ids, lengths, pool, slots, starts,
                                             self.fused)
        return decode_and_prefill(self.model, tokens, positions, decode_cache, ids, lengths, prefill_cache, slots,
                                  starts)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        if not self.compiled:
            if self.fused is not None:
                logits = fused_decode_step(self.model, self.fused, tokens, positions, cache, slots)
                if logits is not None:
                    return logits
            return decode_step(self.model, tokens, positions, cache, slots, self.fused)
        shape = (tokens.shape[0], cache.slots, cache.max_len, slots is None)
        if shape in self._shapes_seen:
            return decode_step(self.model, tokens, positions, cache, slots, self._blocks)
        t0 = time.perf_counter()
        try:
            out = decode_step(self.model, tokens, positions, cache, slots, self._blocks)
        except Exception as e:  # noqa: BLE001 - a compiler failure must not stop generation
            log.warning("memlm: compiling the decode step failed, running eager (%s)", str(e).splitlines()[0])
            self.compiled, self._blocks = False, None
            return decode_step(self.model, tokens, positions, cache, slots)
        self.compile_seconds += time.perf_counter() - t0
        self._shapes_seen.add(shape)
        return out


class StateEngine:
    """Generation for a kind that carries its own state from token to token (memlm.model.build:
    new_state / prefill / decode_step): an RNN's hidden state, a convolution's rolling buffer,
    an encoder-decoder's caches. The same three calls as Engine, so memlm.infer.generate drives
    both. Each kind's state is its own business, kept beside its model: no kind is forced into
    the decoder's KV cache, and the decoder's engine stays what it is (fusion, regional
    compilation, a server's slot pool). No compiled step and no slots here."""

    compiled = False
    fused = None  # no fused block op
    compile_seconds = 0.0
    mixes = False  # a decode step and a prefill are two calls

    def __init__(self, model: nn.Module, cache_dtype: torch.dtype | None = None):
        self.model = model
        self.cache_dtype = cache_dtype

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.tok_emb.weight.device

    def cache(self, slots: int, needed: int):
        """A fresh decoding state for `slots` sequences of up to `needed` tokens."""
        dtype = self.cache_dtype or self.model.tok_emb.weight.dtype
        return self.model.new_state(slots, needed, dtype, self.device)

    def release_cache(self) -> None:
        pass  # each generation makes its own state

    def prefill(self, ids: torch.Tensor, lengths: torch.Tensor, cache, slots: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model.prefill(ids, lengths, cache)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, cache,
               slots: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.model.decode_step(tokens, cache)


def make_engine(model: nn.Module, compile: bool = False, fuse: bool = False,
                cache_dtype: torch.dtype | None = None) -> Engine | StateEngine:
    """How `model` generates: the KV-cache Engine for a decoder, its own state for other kinds
    (which have no compiled step: `compile` is then said to be ignored, in one line)."""
    if isinstance(model, Decoder):
        return Engine(model, compile=compile, fuse=fuse, cache_dtype=cache_dtype)
    if compile:
        log.warning("memlm: --compile is for decoder models; a %s model decodes eager", model.config.kind)
    return StateEngine(model, cache_dtype)


def as_engine(model_or_engine: nn.Module | Engine | StateEngine,
              cache_dtype: torch.dtype | None = None) -> Engine | StateEngine:
    """An engine for a bare model: eager, unfused (the model is not changed)."""
    if isinstance(model_or_engine, (Engine, StateEngine)):
        return model_or_engine
    if not isinstance(model_or_engine, nn.Module):
        raise TypeError(f"expected a model or an Engine, got {type(model_or_engine).__name__}")
    return make_engine(model_or_engine, cache_dtype=cache_dtype)
