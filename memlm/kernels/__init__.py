"""memlm's own CPU operators: block-quantized linear layers (csrc/quant_linear.cpp), a float32
linear for decoding's few rows (csrc/float_linear.cpp) and the fused decode block (decode_block.cpp).

    int4_linear(x, packed, scales, mins, group_size)   int4 codes + float16 scale/min per group
    int8_linear(x, w_int8, scales)                     int8 codes + float32 scale per row or group
    float_linear(x, weight)                            float32, for decoding's few rows

The weights are memlm's portable layouts as saved (memlm/compress/quantize.py), used as they
are; x is float32 or bfloat16 (..., in), y comes back (..., out) in x's dtype. As in llama.cpp's
q4_1 / q8_0 paths, each activation row is first quantized to int8 in blocks of 32 (scale
max|x| / 127) and the dot products are done in integers, so the result differs from the float
product by that rounding (bounded by `activation_error_bound`). Asked to (`dequant_rows`), the
ops instead dequantize a slice of weights at a time and use torch's float matmul.
`int4_linear_reference` / `int8_linear_reference` compute the same as the ops in plain PyTorch,
for tests.

Kernels: one activation row (a decode step) in tiles of 4 weight rows; more rows one weight row
at a time against up to 8 activation rows; from `amx_rows` rows on, AMX's int8 tiles (16 weight
rows x up to 16 activation rows per instruction) where the CPU has them. The code path is picked
from the CPU at run time: AMX, AVX2 + AVX-VNNI, AVX2 (+FMA, F16C), or plain C++ (`set_isa`
chooses one for tests). Which of these (or dequantize + matmul, or PyTorch's int4/int8 kernels)
a layer uses for a given row count is measured once per machine (memlm.kernels.choose).

The extension is compiled on first use (g++ and ninja, about 40 s on 2 cores) into
$MEMLM_CACHE/kernels/<torch>-<hash> (MEMLM_CACHE defaults to $XDG_CACHE_HOME/memlm, or
~/.cache/memlm) and loaded from there afterwards. `available()` says whether that worked;
MEMLM_KERNELS=0 turns the kernels off. The ops are registered as torch.ops.memlm.*, each with a
fake (shape) function, so torch.compile(fullgraph=True) keeps each call as one opaque op. They
have no autograd formula: inference only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from pathlib import Path

import torch

from memlm.errors import MemlmError

log = logging.getLogger("memlm")

BLOCK = 32  # activation quantization block (inputs per int8 scale)
_NAME = "memlm_quant_linear"
_CSRC = Path(__file__).parent / "csrc"
# Translation units that ninja compiles in parallel: the torch ops, the compute, its AMX part, the
# fused decode block, the float32 linear.
_SOURCES = (_CSRC / "quant_linear.cpp", _CSRC / "quant_kernels.cpp", _CSRC / "amx_kernels.cpp",
            _CSRC / "decode_block.cpp", _CSRC / "float_linear.cpp")
# No -mavx2: the AVX2 functions carry their own target attribute and are chosen at run time, so
# the portable fallback in the same file never contains AVX2 instructions. -fopenmp: at::parallel_for
# is a header template that only splits work when the caller is compiled with OpenMP (it then
# runs on torch's own libgomp, already loaded, so torch.set_num_threads applies).
_CFLAGS = ("-O3", "-fopenmp")
_LDFLAGS = ("-fopenmp",)

STALE_LOCK_SECONDS = 600  # a build takes well under a minute; an older lock file is a dead build's
_lock = threading.Lock()
_LOADED: bool | None = None  # None: not tried yet
_failure: str | None = None  # why not, when _LOADED is False
build_seconds: float | None = None  # the compile time, when this process built the extension


# ------------------------------------------------------------------------------ building


def cache_root() -> Path:
    """$MEMLM_CACHE, else $XDG_CACHE_HOME/memlm, else ~/.cache/memlm."""
    if os.environ.get("MEMLM_CACHE"):
        return Path(os.environ["MEMLM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "memlm"


def build_directory() -> Path:
    """One folder per torch version and source/flags hash: an edit or a new torch builds anew."""
    h = hashlib.sha256()
    for src in sorted(_CSRC.glob("*")):  # the .cpp and the header it includes
        h.update(src.name.encode() + src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    return cache_root() / "kernels" / f"{torch.__version__}-{h.hexdigest()[:16]}"


def _build_and_load() -> None:
    """Load the built library, building it first if this folder has none yet (raises on failure)."""
    global build_seconds
    folder = build_directory()
    library = folder / f"{_NAME}.so"
    ready = folder / "ready"  # written after a finished build: a half-linked .so is never loaded
    if ready.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return
    from torch.utils import cpp_extension

    folder.mkdir(parents=True, exist_ok=True)  # racing processes: exist_ok, then cpp_extension's lock file
    lock = folder / "lock"
    if lock.is_file() and time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
        lock.unlink(missing_ok=True)  # left by a build that was killed: cpp_extension would wait forever
    start = time.perf_counter()
    cpp_extension.load(name=_NAME, sources=[str(s) for s in _SOURCES], extra_cflags=list(_CFLAGS),
                       extra_ldflags=list(_LDFLAGS),
                       build_directory=str(folder), is_python_module=False, verbose=False)
    build_seconds = time.perf_counter() - start
    tmp = folder / f"ready.{os.getpid()}"
    tmp.write_text(f"built in {build_seconds:.1f} s\n")
    os.replace(tmp, ready)
    log.info("memlm kernels built in %.1f s in %s", build_seconds, folder)


def _register_fakes() -> None:
    """Output shapes for torch.compile / meta tensors: the ops never run while tracing."""

    @torch.library.register_fake("memlm::int4_linear")
    def _int4_fake(x, packed, scales, mins, group_size, dequant_rows=0, amx_rows=0):
        torch._check(x.shape[-1] == packed.shape[1] * 2, lambda: "x's last dimension must be in_features")
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    @torch.library.register_fake("memlm::int8_linear")
    def _int8_fake(x, w_int8, scales, dequant_rows=0, amx_rows=0):
        torch._check(x.shape[-1] == w_int8.shape[1], lambda: "x's last dimension must be in_features")
        return x.new_empty(*x.shape[:-1], w_int8.shape[0])

    @torch.library.register_fake("memlm::float_linear")
    def _float_fake(x, weight):
        torch._check(x.shape[-1] == weight.shape[1], lambda: "x's last dimension must be in_features")
        return x.new_empty(*x.shape[:-1], weight.shape[0])


def available() -> bool:
    """Whether the kernels can run here: builds/loads them once; on failure logs one line and says False."""
    global _LOADED, _failure
    if _LOADED is not None:
        return _LOADED
    with _lock:
        if _LOADED is None:
            if os.environ.get("MEMLM_KERNELS", "1").strip() == "0":
                _failure = "disabled by MEMLM_KERNELS=0"
                log.info("memlm kernels %s; quantized layers use PyTorch's int4/int8 paths", _failure)
                _LOADED = False
                return False
            try:
                _build_and_load()
                _register_fakes()
                _LOADED = True
            except Exception as e:  # no compiler, no ninja, a build error: all mean "use the fallback"
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
                _failure = f"{type(e).__name__}: {first_line}"[:300]
                log.warning("memlm kernels unavailable (%s); quantized layers use PyTorch's int4/int8 paths",
                            _failure)
                _LOADED = False
    return _LOADED


def _require() -> None:
    if not available():
        raise MemlmError(f"memlm's CPU kernels are not available: {_failure}",
                         "install g++ and ninja, or check memlm.kernels.available() before calling them")


def set_isa(name: str = "best") -> str:
    """Choose the code path: "amx", "avx_vnni", "avx2", "portable" (plain C++) or "best", capped at
    what the CPU has (for tests and benchmarks; the best one is used by default). Returns the one in use."""
    _require()
    from memlm.kernels import choose

    active = torch.ops.memlm.set_isa(name)
    choose.forget()  # its timings were of the path before
    return active


def isa() -> str:
    """The code path in use ("amx", "avx_vnni", "avx2" or "portable")."""
    _require()
    return torch.ops.memlm.isa()


# ------------------------------------------------------------------------------ the ops


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                group_size: int, dequant_rows: int = 0, amx_rows: int = 1) -> torch.Tensor:
    """x (..., in) @ W^T for W = q * scale + min: packed (out, in/2) uint8 (low nibble = even
    column), scales/mins (out, in/group_size) float16, group_size 32 or a multiple of 64.

    Fewer than `dequant_rows` rows of x: the integer kernels; more: dequantize + float matmul
    (0: always the kernels). From `amx_rows` rows on (0: never), AMX's tiles where the path in
    use (`set_isa`) is "amx"."""
    if not _LOADED:
        _require()
    return torch.ops.memlm.int4_linear.default(x, packed, scales, mins, group_size, dequant_rows, amx_rows)


def int8_linear(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                dequant_rows: int = 0, amx_rows: int = 1) -> torch.Tensor:
    """x (..., in) @ W^T for W = q * scale: w_int8 (out, in) int8, scales float32 (out,) per row
    or (out, in/g) per group of g inputs (g a multiple of 32). `dequant_rows`, `amx_rows` as for
    int4_linear."""
    if not _LOADED:
        _require()
    return torch.ops.memlm.int8_linear.default(x, w_int8, scales, dequant_rows, amx_rows)


def float_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ weight^T in float32, weight (out, in) as nn.Linear holds it: memlm's kernel for
    the few rows of decoding (csrc/float_linear.cpp), equal to F.linear to float rounding."""
    if not _LOADED:
        _require()
    return torch.ops.memlm.float_linear.default(x, weight)


# ------------------------------------------------------------------------------ references


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kernels do to x (rows, in) first: (codes (rows, in/32, 32) as float, d (rows, in/32)).

    d = max|x| / 127 per block of 32, codes = round(x * (1/d)) (ties to even), all in float32
    with the kernels' exact operations, so the codes match theirs bit for bit.
    """
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)
    d = blocks.abs().amax(dim=-1) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return torch.round(blocks * inv[..., None]), d


def _block_sums(x: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation codes, their scales, and the integer dot product of every (row, out, block)."""
    q, d = quantize_activations(x)
    out, blocks = codes.shape[0], q.shape[1]
    # All integers below 2^24 (32 * 128 * 127 at most), so float32 sums them exactly.
    isum = torch.einsum("rbj,obj->rob", q, codes.float().view(out, blocks, BLOCK))
    return q, d, isum


def _dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (x.float().reshape(-1, w.shape[1]) @ w.t()).view(*x.shape[:-1], w.shape[0]).to(x.dtype)


def int4_linear_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                          group_size: int, dequant_rows: int = 0) -> torch.Tensor:
    """int4_linear in PyTorch: the same activation codes, integer sums and products; only the
    order of the float additions differs. From `dequant_rows` rows on, the float product."""
    out, inp = packed.shape[0], packed.shape[1] * 2
    xf = x.float().reshape(-1, inp)
    codes = torch.stack([packed & 15, packed >> 4], dim=-1).view(out, inp)  # low nibble = even column
    if 0 < dequant_rows <= xf.shape[0]:
        w = codes.float().view(out, -1, group_size) * scales.float()[..., None] + mins.float()[..., None]
        return _dense(x, w.view(out, inp))
    q, d, isum = _block_sums(xf, codes)
    per_group = group_size // BLOCK
    s = scales.float().repeat_interleave(per_group, dim=1)  # (out, blocks)
    y = (isum * (s[None] * d[:, None, :])).sum(-1)
    # The min term: each group's min times the sum over its blocks of d * sum(codes).
    group_sums = (d * q.sum(-1)).view(xf.shape[0], -1, per_group).sum(-1)  # (rows, groups)
    y = y + group_sums @ mins.float().t()
    return y.view(*x.shape[:-1], out).to(x.dtype)


def int8_linear_reference(x: torch.Tensor, w_int8: torch.Tensor, scales: torch.Tensor,
                          dequant_rows: int = 0) -> torch.Tensor:
    """int8_linear in PyTorch (per-row scales multiply the row's sum; group scales each block)."""
    out, inp = w_int8.shape
    xf = x.float().reshape(-1, inp)
    if 0 < dequant_rows <= xf.shape[0]:
        s = scales.float()
        w = (w_int8.float().view(out, s.shape[1], -1) * s[..., None]).view(out, inp) if s.dim() == 2 \
            else w_int8.float() * s[:, None]
        return _dense(x, w)
    _, d, isum = _block_sums(xf, w_int8)
    if scales.dim() == 2:
        s = scales.float().repeat_interleave(inp // scales.shape[1] // BLOCK, dim=1)
        y = (isum * (s[None] * d[:, None, :])).sum(-1)
    else:
        y = (isum * d[:, None, :]).sum(-1) * scales.float()
    return y.view(*x.shape[:-1], out).to(x.dtype)


def activation_error_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A bound on |reference - x @ w^T| (rows, out) for the float weight w (out, in) the codes
    stand for: every activation moves by at most d/2 of its block, so the output by at most
    sum_j |w_j| d_j / 2 (plus float rounding, left to the caller's tolerance)."""
    xf = x.float().reshape(-1, w.shape[1])
    _, d = quantize_activations(xf)
    return (d.repeat_interleave(BLOCK, dim=1) / 2) @ w.float().abs().t()
