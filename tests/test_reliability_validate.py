"""Validate early, once: every bad number, size, device, port or file field is one line naming the
key and its valid range, before any work (no run folder, no model loaded)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import memlm
from memlm.cli import main
from memlm.config import ModelConfig, check_port, preset
from memlm.errors import MemlmError
from memlm.interop.gguf import save_gguf
from memlm.interop.hf import save_hf
from memlm.model import Decoder
from memlm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = preset("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_heads=1, ffn_hidden=64, block_size=32, vocab_size=320)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`memlm ARGS` in this process (main() as the console script runs it): (status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["memlm", *args])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


def assert_one_line(status: int, err: str, *fragments: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and lines[0].startswith("error: ") and len(lines) <= 2, err
    assert len(lines) == 1 or lines[1].startswith("hint: "), err
    for f in fragments:
        assert f in err, err


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "model.n_head=0"], "model config: n_head must be an integer >= 1, got 0"),
    (["train", "--lr", "nan"], "train config: lr must be a finite number > 0, got nan"),
    (["train", "--lr", "inf"], "train config: lr must be a finite number > 0, got inf"),
    (["train", "--set", "train.eval_batches=0"], "train config: eval_batches must be an integer >= 1, got 0"),
    (["train", "--set", "train.beta2=1.5"], "train config: beta2 must be a finite number in [0, 1), got 1.5"),
    (["train", "--set", "model.rope_theta=nan"], "model config: rope_theta must be a finite number > 0"),
    (["generate", "hi", "--model", "no-such-model", "--temperature", "nan"],
     "sampling: temperature must be a finite number >= 0, got nan"),  # checked before the model is looked up
    (["generate", "hi", "--model", "no-such-model", "--repetition-penalty", "nan"], "repetition_penalty must be"),
    (["plan", "--model", "tiny", "--device", "tpu"], "plan: unknown device 'tpu'"),
    (["plan", "--model", "tiny", "--world-size", "0"], "plan: --world-size must be an integer >= 1, got 0"),
    (["plan", "--model", "tiny", "--seq-len", "0"], "plan: --seq-len must be an integer >= 1, got 0"),
    (["plan", "--model", "tiny", "--budget", "1GiB", "--global-batch-tokens", "0"],
     "plan: --global-batch-tokens must be an integer >= 1, got 0"),
    (["eval", "--model", "no-such-model", "--window", "0"], "eval: --window must be an integer >= 1, got 0"),
    (["serve", "--model", "no-such-model", "--port", "99999"], "serve: --port must be an integer in [1, 65535]"),
    (["serve", "--model", "no-such-model", "--slots", "0"], "serve: --slots must be an integer > 0, got 0"),
])
def test_bad_flags_and_values_are_one_line_before_any_work(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    if args[0] == "train":
        args = [*args, "--out", str(out)]
    status, err = cli(monkeypatch, capsys, *args)
    assert_one_line(status, err, message)
    assert not out.exists()


def test_a_port_outside_the_tcp_range():
    for bad in (99999, 0, -1):
        with pytest.raises(MemlmError, match=f"--port must be an integer in \\[1, 65535\\], got {bad}"):
            check_port(bad)
    check_port(8000)


def test_config_values_are_checked_before_anything_divides_by_them():
    with pytest.raises(MemlmError, match="n_head must be an integer >= 1, got 0"):
        ModelConfig(n_head=0)  # was a ZeroDivisionError
    with pytest.raises(MemlmError, match="norm_eps must be a finite number > 0"):
        ModelConfig(norm_eps=float("nan"))


# ------------------------------------------------------------------------- file fields


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "model"
    torch.manual_seed(0)
    save_hf(Decoder(LLAMA), folder, Tokenizer.load(tokenizer_dir))
    return folder


def _edited_copy(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    edit(dst)
    return dst


def _config_edit(change):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(change(config)))
    return edit


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "hidden_size": "256"}, "config.json: 'hidden_size' must be int, got '256'"),
    (lambda c: {k: v for k, v in c.items() if k != "num_hidden_layers"}, "config.json has no 'num_hidden_layers'"),
    (lambda c: [c], "config.json must hold a JSON object, got list"),
    (lambda c: {**c, "num_attention_heads": 0}, "config.json: num_attention_heads must be an integer >= 1, got 0"),
    (lambda c: {**c, "rms_norm_eps": -1.0}, "config.json: rms_norm_eps must be a finite number > 0"),
])
def test_bad_hf_config_fields(change, message, hf_folder, tmp_path):
    folder = _edited_copy(hf_folder, tmp_path / "m", _config_edit(change))
    with pytest.raises(MemlmError) as e:
        memlm.load(folder)
    assert message in e.value.message and "\n" not in str(e.value)


def test_a_tensor_of_the_wrong_shape(hf_folder, tmp_path):
    def edit(folder: Path) -> None:
        tensors = load_file(folder / "model.safetensors")
        tensors["model.norm.weight"] = torch.ones(7)
        save_file(tensors, folder / "model.safetensors")

    with pytest.raises(MemlmError, match=r"tensor 'norm.weight' has shape \(7,\), expected \(32,\)"):
        memlm.load(_edited_copy(hf_folder, tmp_path / "m", edit))


def test_a_gguf_with_a_nan_rope_theta(tmp_path, tokenizer_dir):
    path = save_gguf(Decoder(LLAMA), Tokenizer.load(tokenizer_dir), tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    key = b"llama.rope.freq_base"
    at = data.index(key) + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 6  # FLOAT32
    struct.pack_into("<f", data, at + 4, float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(MemlmError, match="metadata 'llama.rope.freq_base' should be a finite number, got nan"):
        memlm.load(path)
    assert np.isnan(struct.unpack_from("<f", data, at + 4)[0])


def test_export_never_overwrites_without_force(hf_folder, tmp_path, monkeypatch, capsys):
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    status, err = cli(monkeypatch, capsys, "export", str(hf_folder), "--out", str(existing))
    assert_one_line(status, err, f"{existing} already exists", "--force")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    monkeypatch.setattr(sys, "argv", ["memlm", "export", str(hf_folder), "--out", str(existing), "--force"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code == 0
    assert (existing / "model.safetensors").is_file()
