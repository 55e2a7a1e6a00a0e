"""`memlm compress` end to end, the pipeline's rules, and GGUF export of compressed models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

import memlm
from memlm.compress import dequantize_weight, quantize_model
from memlm.compress.pipeline import CompressOptions, check_methods, compress
from memlm.config import ModelConfig
from memlm.data import default_split
from memlm.errors import MemlmError
from memlm.interop.gguf import load_gguf, save_gguf
from memlm.interop.hf import load_hf, save_hf
from memlm.model import Decoder
from memlm.tokenizer import train_bpe

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(block_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=64, ffn_hidden=128, norm="rmsnorm",
             positions="rope", mlp="swiglu", bias=False)
GPT2 = dict(block_size=64, n_layer=2, n_head=4, n_embd=64, ffn_hidden=128, norm="layernorm", positions="learned",
            mlp="gelu", gelu_approximate="tanh", bias=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    train, _ = default_split()
    return train_bpe([train[:40_000]], vocab_size=300)


def tiny(tok, flavour=LLAMA, seed=0, tied=True) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(ModelConfig(vocab_size=tok.vocab_size, tied_embeddings=tied, **flavour)).eval()


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory, tok) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "tiny"
    save_hf(tiny(tok), folder, tok)
    return folder


def memlm_cli(*args, cwd=None):
    # One thread: on a busy machine several OpenMP threads per process mostly wait for each other.
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "MEMLM_MODELS": str(Path(cwd or ROOT) / "no-models"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "memlm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, env=env)


def ids_of(tok, n=48) -> torch.Tensor:
    _, evals = default_split()
    return torch.tensor(tok.encode(evals[:2000])[:n])[None]


# ------------------------------------------------------------------------------ the command


def test_compress_cli_composed_methods(tmp_path, hf_model, tok):
    out = tmp_path / "small"
    proc = memlm_cli("compress", str(hf_model), "-o", str(out), "--method", "prune24", "--method", "int4",
                     "--group-size", "32", "--quantize-embedding", "int8", "--eval-tokens", "400", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for row in ("parameters", "weights in memory", "on disk", "perplexity (", "predicted generation peak"):
        assert row in proc.stdout, proc.stdout
    assert "prune24 dense -> int4 g32 -> embedding int8" in proc.stdout

    # The folder loads with memlm.load and computes exactly what the same compression computes here.
    lm = memlm.load(out)
    expected = load_hf(hf_model)
    compress(expected, tok, ["prune24", "int4"], CompressOptions(group_size=32, quantize_embedding="int8",
                                                                  eval=False, progress=False))
    x = ids_of(tok)
    with torch.no_grad():
        assert torch.equal(lm.model(x), expected(x))
    assert isinstance(lm.generate("def f(x):", max_new_tokens=8, temperature=0), str)

    text = tmp_path / "text.txt"
    text.write_text(default_split()[1][:20_000])  # its eval split: the last 2,000 characters
    proc = memlm_cli("eval", "--model", str(out), "--corpus", str(text), "--window", "64", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ppl"] > 1


def test_pruned_model_fine_tunes_with_memlm_train(tmp_path, hf_model):
    """The optional fine-tune after pruning is `memlm train --init-from` on the pruned folder: it
    starts from the smaller matrices (the run's config records them) and lowers the loss."""
    pruned = tmp_path / "pruned"
    proc = memlm_cli("compress", str(hf_model), "-o", str(pruned), "--method", "prune-ffn", "--keep", "0.5",
                     "--calib-tokens", "512", "--no-eval", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = tmp_path / "text.txt"
    text.write_text(default_split()[0][:20_000])
    run = tmp_path / "tuned"
    proc = memlm_cli("train", "--init-from", str(pruned), "--corpus", str(text), "--out", str(run), "--steps", "8",
                     "--micro-batch", "4", "--seq-len", "32", "--lr", "3e-3", "--set", "train.log_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "ffn_hidden = 64" in (run / "config.toml").read_text()
    losses = [m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert memlm.load(run).model.blocks[0].mlp.up_proj.out_features == 64


def test_compress_cli_bad_method_is_one_line_error(tmp_path, hf_model):
    proc = memlm_cli("compress", str(hf_model), "-o", str(tmp_path / "x"), "--method", "int5", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: unknown compression method 'int5'"], proc.stderr
    assert "hint: choose from: int8, int4" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_method_order_rules():
    check_methods(["prune-ffn", "prune-heads", "lowrank", "gptq4"])
    with pytest.raises(MemlmError, match="must be the last"):
        check_methods(["int4", "prune24"])
    with pytest.raises(MemlmError, match="more than one quantization"):
        check_methods(["int8", "int4"])
    with pytest.raises(MemlmError, match="no compression method"):
        check_methods([])


def test_pipeline_reports_and_shrinks(tok):
    model = tiny(tok)
    summary = compress(model, tok, ["prune-ffn", "gptq4"], CompressOptions(
        group_size=32, keep=0.5, calib_tokens=256, eval_tokens=300, progress=False))
    assert model.config.ffn_hidden == 64
    assert [s["what"] for s in summary.steps] == ["prune-ffn 128->64", "gptq4 g32"]
    assert summary.memory_after < summary.memory_before / 2
    # the int4 kernel's first-use pages (a fixed cost) outweigh what a model this small saves
    from memlm.memory.estimate import FORMAT_KERNEL_BYTES

    assert summary.predicted_after < summary.predicted_before + FORMAT_KERNEL_BYTES["int4"]
    assert summary.ppl_before > 1 and summary.ppl_after > 1 and summary.eval_tokens > 0
    assert json.dumps(summary.to_dict())  # the --json output


# ------------------------------------------------------------------------------ GGUF export


def _compressed(tok, flavour, method, embedding, tied=True):
    model = tiny(tok, flavour, tied=tied)
    quantize_model(model, method, 32, quantize_embedding=embedding, progress=False, use_kernel=False)
    return model


@pytest.mark.parametrize("flavour", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_gguf_q4_1_export_of_int4_g32_is_exact(tmp_path, tok, flavour):
    model = _compressed(tok, flavour, "int4", None)
    path = save_gguf(model, tok, tmp_path / "m.gguf", qtype="Q4_1")

    types = {t.name: QType(int(t.tensor_type)) for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_up.weight"] == QType.Q4_1
    assert types["blk.1.attn_output.weight"] == QType.Q4_1
    assert types["token_embd.weight"] == QType.Q8_0  # the (tied) head stays at 8 bits
    assert types["output_norm.weight"] == QType.F32

    back, _ = load_gguf(path)
    for name, module in model.named_modules():
        if name.startswith("blocks.") and hasattr(module, "spec"):  # every int4 layer, bit for bit
            assert torch.equal(dequantize_weight(module), back.get_submodule(name).weight), name
    x = ids_of(tok)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0.05)  # only the embedding was rounded


@pytest.mark.parametrize("flavour", [LLAMA, GPT2], ids=["llama", "gpt2"])
def test_gguf_q8_0_export_of_int8_model(tmp_path, tok, flavour):
    model = _compressed(tok, flavour, "int8", "int8", tied=flavour is GPT2)
    path = save_gguf(model, tok, tmp_path / "m.gguf", qtype="Q8_0")
    reader = gguf.GGUFReader(path)
    types = {t.name: QType(int(t.tensor_type)) for t in reader.tensors}
    assert {t for n, t in types.items() if n.endswith(".weight") and "norm" not in n} == {QType.Q8_0}

    back, _ = load_gguf(path)
    for name, module in model.named_modules():
        if hasattr(module, "weight_int8"):
            ours = dequantize_weight(module)
            theirs = back.get_submodule(name).weight.detach()
            # the codes are kept under an fp16 copy of each row's scale: at most 127 * |d - s|
            step = module.scales.float()[:, None]
            assert float(((ours - theirs).abs() / step).max()) <= 127 * 2**-11 + 1e-6, name
    x = ids_of(tok)
    with torch.no_grad():
        ours, theirs = model(x), back(x)
    # gpt2's learned positions are plain floats, rounded to Q8_0 on the way: not exact either
    assert float((ours - theirs).abs().max()) < 0.01 * float(ours.abs().max())


def test_int8_to_q8_0_is_exact_for_fp16_scales():
    from memlm.interop.gguf import _int8_to_q8_0

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (8, 64), generator=g, dtype=torch.int8)
    scales = (torch.rand(8, generator=g) / 100).half().float()  # every scale an fp16 number
    blocks = _int8_to_q8_0(codes, scales)
    values = gguf.quants.dequantize(blocks, QType.Q8_0)
    assert np.array_equal(values, (codes.float() * scales[:, None]).numpy())


# ------------------------------------------------------------------------------ inside a memory budget

# Wide enough that its float32 weights (50 MiB) outweigh what int4 adds (the kernel's first-use
# pages): only then does skipping the float32 perplexity make a run fit a smaller budget.
WIDE = dict(LLAMA, n_layer=4, n_head=8, n_kv_heads=4, n_embd=512, ffn_hidden=1536)
COMPRESS_ARGS = ("--eval-tokens", "640")


@pytest.fixture(scope="module")
def wide_sources(tmp_path_factory, tok) -> dict[str, Path]:
    """The same wide model as a Hugging Face folder (float32) and as GGUF Q4_1 (block weights
    Q4_1: int4 g32 when loaded into int4; the tied embedding Q8_0: int8 g32 when loaded into a format)."""
    folder = tmp_path_factory.mktemp("wide")
    model = tiny(tok, WIDE)
    save_hf(model, folder / "hf", tok)
    return {"hf": folder / "hf", "gguf": save_gguf(model, tok, folder / "wide.gguf", qtype="Q4_1")}


START_SLACK = 2 * 2**20  # how far two CLI processes' own program starts may place their runtimes apart


def _lean_budget(plain_run: dict) -> int:
    """A budget under what the run as always (float32, perplexity before and after) needed, by the
    plain run's own prediction: the plan has to skip the float32 perplexity and load straight into
    the format. Each CLI process places its runtime by its own start, which moves by some hundred
    KiB between processes, so the budget sits START_SLACK under the plain prediction, not a byte."""
    from memlm.memory.plan import SAFETY_MARGIN

    return int(plain_run["predicted_peak_bytes"] / (1 - SAFETY_MARGIN)) - START_SLACK


def _tensors(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors")), json.loads((folder / "memlm_model.json").read_text())


@pytest.mark.parametrize("which, method, group", [("gguf", "int4", 128), ("gguf", "int8", 128), ("hf", "int4", 128)],
                         ids=["gguf-int4-regrouped", "gguf-int8", "hf-int4"])
def test_budget_lean_rtn_path_saves_the_plain_paths_tensors(tmp_path, wide_sources, which, method, group):
    """Under a budget only the lean path fits, the model is loaded straight into the format (GGUF
    Q4_1 layers rounded again to the requested groups, the Q8_0 embedding back to float32) and
    the folder holds exactly the tensors of the plain float32 path; --json carries both peaks."""
    source = wide_sources[which]
    args = ("--method", method, "--group-size", str(group), *COMPRESS_ARGS, "--json")
    plain = memlm_cli("compress", str(source), "-o", str(tmp_path / "plain"), *args, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    budget = _lean_budget(json.loads(plain.stdout))
    lean = memlm_cli("compress", str(source), "-o", str(tmp_path / "lean"), *args, "--memory-budget", str(budget),
                     cwd=tmp_path)
    assert lean.returncode == 0, lean.stderr

    a, b = json.loads(plain.stdout), json.loads(lean.stdout)
    assert b["ppl_before"] is None and a["ppl_before"] > 1
    assert any("perplexity before was skipped" in n and f"straight into {method}" in n for n in b["notes"]), b
    assert b["ppl_after"] == a["ppl_after"]  # the same model computes the same perplexity
    for key in ("params_before", "memory_before", "params_after", "memory_after", "steps"):
        assert b[key] == a[key], key
    assert abs(b["predicted_before"] - a["predicted_before"]) < START_SLACK  # each run's own program start
    for r in (a, b):
        assert r["predicted_peak_bytes"] > 0 and abs(r["peak_bytes"] / r["predicted_peak_bytes"] - 1) < 0.2, r
    assert b["peak_bytes"] <= budget and b["predicted_peak_bytes"] < a["predicted_peak_bytes"]

    (ta, ma), (tb, mb) = _tensors(tmp_path / "plain"), _tensors(tmp_path / "lean")
    assert ma == mb
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key


def test_budget_run_prints_one_prediction_and_ends_with_it(tmp_path, hf_model):
    proc = memlm_cli("compress", str(hf_model), "-o", str(tmp_path / "out"), "--method", "int8", *COMPRESS_ARGS,
                     "--memory-budget", "2GiB", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stderr.splitlines() if "predicted peak" in line]
    assert len(said) == 1 and said[0].startswith("memory budget 2.0 GiB: int8, loaded in float32"), proc.stderr
    predicted = said[0].split("predicted peak ")[1].split(" (")[0]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"peak memory: predicted {predicted}, measured "), proc.stderr
    assert float(last.split("measured ")[1].split(" MiB")[0]) < 2048


def test_budget_too_small_is_refused_before_any_work(tmp_path, hf_model):
    out = tmp_path / "out"
    proc = memlm_cli("compress", str(hf_model), "-o", str(out), "--method", "gptq4", "--memory-budget", "64MiB",
                     cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "does not fit the memory budget 64.0 MiB: the leanest way needs" in errors[0]
    assert "hint: raise --memory-budget, or pass --no-eval" in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_lean_path_only_where_the_loader_gives_the_float_paths_codes(wide_sources):
    """The loader rounds int4 in groups of up to 128: --group-size 32 on a float checkpoint needs
    the float32 model; a GGUF whose block weights are all Q4_1 is re-rounded from exact values."""
    from memlm.compress.pipeline import _lean_format, plan_compress
    from memlm.loading import model_config_of

    config = model_config_of(wide_sources["hf"])

    def lean(which, methods, group):
        return _lean_format(str(wide_sources[which]), config, methods, CompressOptions(group_size=group))

    assert lean("gguf", ["int4"], 32) == "int4" and lean("gguf", ["int4"], 128) == "int4"
    assert lean("hf", ["int4"], 128) == "int4" and lean("hf", ["int8"], 128) == "int8"
    assert lean("hf", ["int4"], 32) is None  # 512 inputs: the loader would take groups of 128
    assert lean("hf", ["prune24", "int4"], 128) is None and lean("hf", ["gptq4"], 128) is None
    full = plan_compress(str(wide_sources["hf"]), ["int4"], CompressOptions(group_size=32))
    assert full.load_format is None and full.eval_before and full.budget is None
    assert list(full.breakdown.phases) == ["load", "perplexity before", "int4", "perplexity after", "save"]
