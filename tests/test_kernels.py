"""memlm.kernels: the C++ int4/int8 linear ops against their PyTorch references.

The kernels quantize activations to int8 (blocks of 32) before integer dot products, so they
are compared tightly with references that do the same, and the references loosely (within the
bound that rounding implies) with the plain float product of the dequantized weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from memlm import kernels
from memlm.compress.quantize import (
    dequantize_groups,
    dequantize_int8,
    module_from_codes,
    pack_int4,
    quantize_groups,
    quantize_int8,
)
from memlm.kernels import choose

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"memlm kernels unavailable: {kernels._failure}")

ROOT = Path(__file__).resolve().parents[1]


def int4_weight(out: int, inp: int, group: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    codes, scales, mins = quantize_groups(w, 4, group)
    return pack_int4(codes), scales, mins, dequantize_groups(codes, scales, mins)


def int8_weight(out: int, inp: int, group: int | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, scales = quantize_int8(torch.randn(out, inp, generator=g) * 0.05, group_size=group)
    return q, scales, dequantize_int8(q, scales)


def activations(rows: int, inp: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inp, generator=g)
    x[:, :32] *= 20  # an outlier block, as real activations have
    return x


def assert_tight(y: torch.Tensor, ref: torch.Tensor) -> None:
    """Same integers, same products: only the order of float additions may differ."""
    scale = ref.abs().max().item() or 1.0
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)


# ------------------------------------------------------------------------------ int4

# 64: no quad of blocks (pairs only); 576: 4 quads and a pair; 384 with groups of 192: quads
# that straddle two groups.
INT4_SHAPES = [(inp, g) for inp in (64, 576, 1536) for g in (32, 64, 128) if inp % g == 0] + [(384, 192)]
# 1: the one-row kernels; 2, 5, 8: one pass of the many-row kernels; 17: two full passes and one row.
ROWS = (1, 2, 5, 8, 17)


@pytest.mark.parametrize("inp,group", INT4_SHAPES)
def test_int4_matches_reference(isa, inp, group):
    packed, scales, mins, _ = int4_weight(37, inp, group)  # 37: not a multiple of the 4-row tile
    for rows in ROWS:
        x = activations(rows, inp)
        y = kernels.int4_linear(x, packed, scales, mins, group)
        assert y.shape == (rows, 37) and y.dtype == torch.float32
        assert_tight(y, kernels.int4_linear_reference(x, packed, scales, mins, group))


@pytest.mark.parametrize("inp,group", [(576, 32), (576, 64), (1536, 128), (96, 32)])
def test_int4_reference_within_activation_rounding(inp, group):
    """The float product of the dequantized weights differs by at most what rounding x to int8 does."""
    packed, scales, mins, w = int4_weight(64, inp, group)
    x = activations(5, inp)
    ref = kernels.int4_linear_reference(x, packed, scales, mins, group)
    dense = x @ w.t()
    bound = kernels.activation_error_bound(x, w)
    assert ((ref - dense).abs() <= bound * 1.001 + 1e-4).all()
    assert (ref - dense).abs().max() > 0  # the bound is not vacuous: the kernel does round


def test_int4_odd_block_count(isa):
    """in = 96: three blocks of 32, the last one not in a pair."""
    packed, scales, mins, _ = int4_weight(9, 96, 32)
    x = activations(3, 96)
    assert_tight(kernels.int4_linear(x, packed, scales, mins, 32), kernels.int4_linear_reference(x, packed, scales, mins, 32))


def test_int4_leading_dims_and_bf16(isa):
    packed, scales, mins, _ = int4_weight(20, 576, 32)
    x = activations(6, 576).view(2, 3, 576)
    y = kernels.int4_linear(x, packed, scales, mins, 32)
    assert y.shape == (2, 3, 20)
    assert_tight(y, kernels.int4_linear_reference(x, packed, scales, mins, 32))
    xb = x.bfloat16()
    yb = kernels.int4_linear(xb, packed, scales, mins, 32)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, kernels.int4_linear_reference(xb, packed, scales, mins, 32), rtol=1 / 128, atol=0)


def test_non_finite_activations_give_nan_not_a_wrong_number(isa):
    packed, scales, mins, _ = int4_weight(8, 64, 32)
    q, s8, _ = int8_weight(8, 64, 32)
    x = activations(3, 64)
    x[0, 5], x[1, 40] = float("inf"), float("nan")
    for y in (kernels.int4_linear(x, packed, scales, mins, 32), kernels.int8_linear(x, q, s8)):
        assert y[:2].isnan().all() and y[2].isfinite().all()
    assert kernels.int4_linear_reference(x, packed, scales, mins, 32)[:2].isnan().all()


def test_empty_input():
    packed, scales, mins, _ = int4_weight(8, 64, 32)
    assert kernels.int4_linear(torch.empty(0, 64), packed, scales, mins, 32).shape == (0, 8)


# ------------------------------------------------------------------------------ int8


# 96: three blocks, an odd count (AMX pairs blocks up to 8 rows); 576 in groups of 96: quads
# that straddle two groups.
@pytest.mark.parametrize("group,inp", [(g, i) for g in (None, 32, 64) for i in (64, 576, 1536)]
                         + [(None, 96), (32, 96), (96, 576)])
def test_int8_matches_reference(isa, group, inp):
    q, scales, _ = int8_weight(37, inp, group)
    for rows in ROWS:
        x = activations(rows, inp)
        y = kernels.int8_linear(x, q, scales)
        assert y.shape == (rows, 37)
        assert_tight(y, kernels.int8_linear_reference(x, q, scales))


@pytest.mark.parametrize("group", [None, 32])
def test_int8_reference_within_activation_rounding(group):
    q, scales, w = int8_weight(64, 576, group)
    x = activations(5, 576)
    ref = kernels.int8_linear_reference(x, q, scales)
    bound = kernels.activation_error_bound(x, w)
    assert ((ref - x @ w.t()).abs() <= bound * 1.001 + 1e-4).all()


def test_int8_codes_at_minus_128(isa):
    """GGUF files may hold -128; the sign trick must still multiply it right."""
    q, scales, _ = int8_weight(8, 64, 32)
    q[:, ::3] = -128
    x = activations(2, 64)
    assert_tight(kernels.int8_linear(x, q, scales), kernels.int8_linear_reference(x, q, scales))


# ------------------------------------------------------------------------------ many rows: dequantize + matmul


def test_prefill_switches_to_float_matmul_at_the_threshold(isa):
    packed, scales, mins, w4 = int4_weight(40, 576, 64)
    q, s8, w8 = int8_weight(40, 576, None)
    for rows, threshold in ((48, 48), (32, 32)):
        x = activations(rows, 576)
        below, at = x[:-1], x
        # one row short: the integer kernel (its reference quantizes x); at the threshold: x @ W^T
        assert_tight(kernels.int4_linear(below, packed, scales, mins, 64, threshold),
                     kernels.int4_linear_reference(below, packed, scales, mins, 64, threshold))
        torch.testing.assert_close(kernels.int4_linear(at, packed, scales, mins, 64, threshold), at @ w4.t())
        torch.testing.assert_close(kernels.int8_linear(at, q, s8, threshold), at @ w8.t())
        assert_tight(kernels.int8_linear(below, q, s8, threshold), kernels.int8_linear_reference(below, q, s8, threshold))


def test_float_path_converts_a_large_head_in_chunks():
    """More than 2^20 weights: converted a slice of rows at a time, same result."""
    packed, scales, mins, w = int4_weight(2100, 576, 32)
    x = activations(3, 576)
    torch.testing.assert_close(kernels.int4_linear(x, packed, scales, mins, 32, 1), x @ w.t())


# ------------------------------------------------------------------------------ threads, compile, errors


# ------------------------------------------------------------------------------ float32


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 17, 64, 65, 130])
@pytest.mark.parametrize("out_f,in_f", [(960, 576), (576, 1536), (13, 40), (6, 8)])
def test_float_linear_matches_a_float64_matmul(isa, rows, out_f, in_f):
    """Every tile shape (1 row, 2-7, 8+ in tiles of 3, past a 64-row pass), layer widths that are
    not multiples of 4 and inputs that are not multiples of 8 (the scalar tails)."""
    torch.manual_seed(rows + out_f)
    x, w = torch.randn(rows, in_f), torch.randn(out_f, in_f)
    expected = (x.double() @ w.double().T).float()
    torch.testing.assert_close(kernels.float_linear(x, w), expected, atol=1e-4 * in_f ** 0.5, rtol=1e-5)


def test_float_linear_keeps_leading_dims_and_refuses_bad_inputs():
    w = torch.randn(24, 16)
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(kernels.float_linear(x, w), x @ w.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.float_linear(x.transpose(0, 1), w), x.transpose(0, 1) @ w.T, atol=1e-5,
                               rtol=1e-5)
    with pytest.raises(RuntimeError, match="x's last dimension must be in_features = 16"):
        kernels.float_linear(torch.randn(2, 8), w)
    with pytest.raises(RuntimeError, match="x must be a float32"):
        kernels.float_linear(x.bfloat16(), w)
    with pytest.raises(RuntimeError, match="weight must be a contiguous float32"):
        kernels.float_linear(x, w.t().contiguous().t())


def test_thread_count_does_not_change_the_result():
    packed, scales, mins, _ = int4_weight(1536, 576, 32)
    q, s8, _ = int8_weight(1536, 576, 32)
    x = activations(3, 576)
    w = torch.randn(1536, 576)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append((kernels.int4_linear(x, packed, scales, mins, 32), kernels.int8_linear(x, q, s8),
                            kernels.float_linear(x, w)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_compile_fullgraph_keeps_each_op_whole():
    packed, scales, mins, _ = int4_weight(64, 576, 32)
    q, s8, _ = int8_weight(48, 64, 32)

    def two_layers(x):
        h = torch.relu(kernels.int4_linear(x, packed, scales, mins, 32))
        return kernels.int8_linear(h, q, s8) * 2

    graphs = []

    def capture(gm, example_inputs):  # a backend that records the graph and runs it as it is
        graphs.append(gm)
        return gm.forward

    x = activations(3, 576)
    eager = two_layers(x)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(two_layers, fullgraph=True, backend=capture)(x), eager)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("memlm.int4_linear") for t in targets) == 1, targets
    assert sum(t.startswith("memlm.int8_linear") for t in targets) == 1, targets
    # fake (meta) shapes: what AOT tracing and inductor see
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(two_layers, fullgraph=True, backend="aot_eager")(x), eager)


def test_bad_inputs_raise_clear_errors():
    packed, scales, mins, _ = int4_weight(8, 64, 32)
    x = activations(2, 64)
    cases = [
        (lambda: kernels.int4_linear(x.long(), packed, scales, mins, 32), "x must be float32 or bfloat16"),
        (lambda: kernels.int4_linear(x[:, :32], packed, scales, mins, 32), "last dimension must be in_features"),
        (lambda: kernels.int4_linear(x, packed.to(torch.int8), scales, mins, 32), "packed must be Byte"),
        (lambda: kernels.int4_linear(x, packed, scales.float(), mins, 32), "scales must be Half"),
        (lambda: kernels.int4_linear(x, packed, scales, mins[:, :1], 32), "mins must have shape"),
        (lambda: kernels.int4_linear(x, packed, scales, mins, 48), "group_size must be 32 or a multiple of 64"),
        (lambda: kernels.int4_linear(x, packed.t().contiguous().t(), scales, mins, 32), "packed must be contiguous"),
        (lambda: kernels.int4_linear(x, packed[:, :5].contiguous(), scales, mins, 32), "does not divide in_features"),
        (lambda: kernels.int8_linear(x[:, :48], torch.zeros(8, 48, dtype=torch.int8), torch.ones(8)),
         "in_features must be a positive multiple of 32"),
        (lambda: kernels.int8_linear(x, packed, scales), "w_int8 must be Char"),
        (lambda: kernels.int8_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(8, 3)), "grouped scales"),
        (lambda: kernels.int8_linear(x, torch.zeros(8, 64, dtype=torch.int8), torch.ones(7)), "scales must have shape"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()
    with pytest.raises(RuntimeError, match="unknown path"):
        kernels.set_isa("sse9")


# ------------------------------------------------------------------------------ the choice of path


@pytest.fixture
def choice(monkeypatch):
    """Sets MEMLM_KERNEL_CHOICE for one test; the tables made under it are dropped after."""
    def pick(value: str) -> None:
        monkeypatch.setenv("MEMLM_KERNEL_CHOICE", value)
        choose.forget()

    yield pick
    monkeypatch.undo()
    choose.forget()


def test_choice_is_measured_once_cached_and_logged(choice, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path))
    monkeypatch.setattr(choose, "SHAPES", ((128, 256), (256, 128)))  # small: a test, not a benchmark
    monkeypatch.setattr(choose.os, "getloadavg", lambda: (0.5, 0.5, 0.5))  # a quiet machine
    choice("measure")
    with caplog.at_level("INFO", logger="memlm"):
        table = choose.table(1)
    for fmt in choose.FORMATS:
        assert set(table[fmt]) == set(choose.BUCKETS)
        for b, path in table[fmt].items():
            assert path != "torch-int8" or fmt == "int8-row"
            assert path != "torch-int4" or fmt.startswith("int4")
            timed = choose.record(1)["choices"][fmt][b]["us"]
            # the fastest, or the fixed rule's path when nothing beats it by the margin
            assert timed[path] == min(timed.values()) or path == choose.default_table()[fmt][b]
            assert timed[path] * min(choose.DEFAULT_MARGIN, *choose.MARGIN.values()) <= min(timed.values())
    [line] = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert "cached in" in line and "\n" not in line
    [cached] = (tmp_path / "kernels").glob("choice-*.json")
    assert json.loads(cached.read_text())["key"] == choose.cache_key(1)
    # A second process (here: the tables forgotten) reads the file instead of measuring.
    choose.forget()
    monkeypatch.setattr(choose, "_measure", lambda threads: pytest.fail("measured again"))
    assert choose.table(1) == table
    assert choose.cache_path(2) != cached  # another thread count, another measurement


def test_choice_on_a_busy_machine_is_not_kept(choice, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path))
    monkeypatch.setattr(choose, "SHAPES", ((64, 64),))
    monkeypatch.setattr(choose, "FORMATS", ("int8-row",))
    monkeypatch.setattr(choose.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    choice("measure")
    with caplog.at_level("INFO", logger="memlm"):
        assert set(choose.table(1)) == {"int8-row"}
    assert not list(tmp_path.glob("kernels/choice-*.json"))
    assert any("not cached, the machine was busy (load 9.0)" in r.getMessage() for r in caplog.records)


def test_choice_modes(choice):
    choice("default")
    assert choose.path("int4", 32, 1) == "memlm" and choose.path("int8", None, 17) == "dequantize"
    choice("dequantize")
    assert choose.path("int4", 64, 1) == "dequantize" and choose.path("int8", 32, 3) == "dequantize"
    choice("torch-int8")  # only where it runs: int8 with a scale per row
    assert choose.path("int8", None, 2) == "torch-int8" and choose.path("int4", 32, 2) == "memlm"
    choice("fastest")
    with pytest.raises(ValueError, match="MEMLM_KERNEL_CHOICE='fastest'"):
        choose.path("int4", 32, 1)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_layers_follow_the_chosen_path(choice, scheme):
    """Each path through a quantized layer: the integer kernels match their reference tightly,
    dequantize matches the float product, which the integer kernels do not (they round x)."""
    torch.manual_seed(0)
    w = torch.randn(48, 576) * 0.05
    if scheme == "int4":
        codes, scales, mins = quantize_groups(w, 4, 32)
        state, packed = {"codes": codes, "scales": scales, "mins": mins}, pack_int4(codes)
        reference = lambda x: kernels.int4_linear_reference(x, packed, scales, mins, 32)  # noqa: E731
        dense = dequantize_groups(codes, scales, mins)
    else:
        q, scales = quantize_int8(w)
        state = {"weight_int8": q, "scales": scales}
        reference = lambda x: kernels.int8_linear_reference(x, q, scales)  # noqa: E731
        dense = dequantize_int8(q, scales)
    layer = module_from_codes(scheme, state)
    paths = ["memlm", "dequantize"] + (["memlm-amx"] if kernels.isa() == "amx" else [])
    for rows in (1, 5, 20):
        x = activations(rows, 576)
        for path in paths:
            choice(path)
            with torch.no_grad():
                y = layer(x)
            if path == "dequantize":
                torch.testing.assert_close(y, x @ dense.t(), rtol=1e-4, atol=1e-4)
                assert not torch.allclose(y, reference(x), rtol=1e-5, atol=1e-5)
            else:
                assert_tight(y, reference(x))


def test_compiled_layer_follows_the_choice(choice):
    """Under torch.compile(fullgraph=True) the choice is a constant: no graph break, no timing."""
    codes, scales, mins = quantize_groups(torch.randn(64, 576) * 0.05, 4, 32)
    layer = module_from_codes("int4", {"codes": codes, "scales": scales, "mins": mins})
    choice("default")
    x = activations(3, 576)
    with torch.no_grad():
        eager = layer(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), eager)


# ------------------------------------------------------------------------------ building and loading


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder = kernels.build_directory()
    assert folder.parent == tmp_path / "xdg" / "memlm" / "kernels"
    assert folder.name.startswith(torch.__version__ + "-")
    monkeypatch.setenv("MEMLM_CACHE", str(tmp_path / "mine"))
    assert kernels.build_directory().parent == tmp_path / "mine" / "kernels"


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


PROBE = """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(message)s")
    from memlm import kernels
    print(kernels.available())
"""


def test_disabled_by_environment():
    done = run_python(PROBE, {"MEMLM_KERNELS": "0"})
    assert done.stdout.strip() == "False"
    lines = [line for line in done.stderr.splitlines() if "memlm kernels" in line]
    assert len(lines) == 1 and "MEMLM_KERNELS=0" in lines[0]


def test_failed_build_falls_back_with_one_line(tmp_path):
    """No working compiler: available() is False, one warning says what is used instead."""
    done = run_python(PROBE, {"MEMLM_CACHE": str(tmp_path), "CXX": "/bin/false"})
    assert done.stdout.strip() == "False", done.stderr
    lines = [line for line in done.stderr.splitlines() if "memlm kernels" in line]
    assert len(lines) == 1 and lines[0].startswith("WARNING") and "PyTorch's int4/int8 paths" in lines[0]


@pytest.mark.slow
def test_two_processes_build_at_once(tmp_path):
    """A fresh cache and two processes: one builds (cpp_extension's lock), the other waits; both load."""
    code = textwrap.dedent(PROBE) + (
        "import torch\n"
        "print(kernels.int8_linear(torch.ones(1, 32), torch.ones(2, 32, dtype=torch.int8), torch.ones(2)).tolist())\n")
    env = {**os.environ, "MEMLM_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        assert out.split() == ["True", "[[32.0,", "32.0]]"], (out, err)
    assert len(list((tmp_path / "kernels").glob("*/ready"))) == 1
