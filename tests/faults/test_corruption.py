"""Corrupted bytes in each file of a checkpoint (single-process and sharded) and of a compressed
model: the load names the damaged file, never loads it, and resuming falls back by itself to the
newest intact checkpoint."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import memlm
from memlm.compress import load_compressed, quantize_model, save_compressed
from memlm.config import TrainConfig, preset
from memlm.errors import MemlmError
from memlm.model import Decoder
from memlm.tokenizer import Tokenizer
from memlm.train import train
from memlm.train.checkpoint import (
    CheckpointDamaged,
    intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)
from memlm.train.optim import build_optimizer

SEED = int(os.environ.get("MEMLM_FAULT_SEED", "15"))
FLIPS_PER_FILE = 3
MODEL = preset("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_heads=1, ffn_hidden=64, block_size=32, vocab_size=320)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(run: Path, corpus: Path, tokenizer: Path) -> TrainConfig:
    return TrainConfig(out_dir=str(run), corpus=str(corpus), tokenizer=str(tokenizer), steps=4, micro_batch=2,
                       seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1, save_every=2, keep_last=3,
                       device="cpu", threads=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corrupt")
    run = root / "run"
    train(_cfg(run, corpus, tokenizer_dir), MODEL)  # checkpoints at steps 2 and 4
    sharded = root / "sharded"
    shutil.copytree(run, sharded)
    last = list_checkpoints(sharded)[-1]
    model = Decoder(MODEL)
    optimizer = build_optimizer(model, _cfg(sharded, corpus, tokenizer_dir))
    state = load_checkpoint(last, model, optimizer)
    shutil.rmtree(last)
    save_sharded_checkpoint(sharded, state["step"], model, optimizer, {k: v for k, v in state.items() if k != "step"},
                            keep_last=3)
    compressed = save_compressed(quantize_model(memlm.load(run).model, "int8", progress=False),
                                 Tokenizer.load(tokenizer_dir), root / "compressed")
    return {"run": run, "sharded": sharded, "compressed": compressed}


def _flip(path: Path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    at = rng.randrange(len(data))
    data[at] ^= 1 << rng.randrange(8)  # one bit: the smallest corruption there is
    path.write_bytes(bytes(data))
    return at


@pytest.mark.parametrize("kind", ["run", "sharded"])
def test_a_flipped_bit_in_any_file_of_a_checkpoint_is_named_and_resume_falls_back(kind, runs, tmp_path):
    rng = random.Random(SEED)
    newest = list_checkpoints(runs[kind])[-1]
    files = sorted(p.relative_to(newest) for p in newest.rglob("*") if p.is_file())
    assert len(files) >= 4
    for name in files:
        for _ in range(FLIPS_PER_FILE):
            run = tmp_path / "copy"
            shutil.copytree(runs[kind], run)
            damaged = run / newest.relative_to(runs[kind])
            before = (damaged / name).read_bytes()
            at = _flip(damaged / name, rng)
            what = f"{name} bit flipped at byte {at}"
            if name.suffix == ".json" and _same_json(before, (damaged / name).read_bytes()):
                shutil.rmtree(run)  # e.g. 1e-08 -> 1E-08: the same content, nothing to detect
                continue
            with pytest.raises(CheckpointDamaged) as e:
                verify_checkpoint(damaged)
            assert name.name in e.value.message and "\n" not in str(e.value), (what, e.value)
            assert "step-000002" in e.value.hint, (what, e.value.hint)
            assert intact_checkpoint(run).name == "step-000002", what
            assert (damaged.parent / f"{damaged.name}.damaged").is_dir()  # kept, out of the way
            shutil.rmtree(run)


def _same_json(a: bytes, b: bytes) -> bool:
    import json

    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def test_truncated_files_are_named(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["run"], run)
    newest = list_checkpoints(run)[-1]
    with open(newest / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointDamaged, match=r"optimizer.safetensors \(100 bytes, \d+ recorded\)"):
        load_checkpoint(newest, Decoder(MODEL))
    memlm.load(run)  # for inference only the weights are read, and checked: they are intact
    with open(newest / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointDamaged, match="step-000004 is damaged: model.safetensors"):
        memlm.load(run)


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(runs, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(runs["run"], run)
    for ckpt in list_checkpoints(run):
        _flip(ckpt / "model.safetensors", random.Random(SEED))
    with pytest.raises(CheckpointDamaged, match="step-000004 is damaged"):
        intact_checkpoint(run)
    assert [p.name for p in list_checkpoints(run)] == ["step-000002", "step-000004"]  # nothing moved


def test_a_flipped_bit_in_any_file_of_a_compressed_model_is_named(runs, tmp_path):
    rng = random.Random(SEED)
    files = sorted(p.name for p in runs["compressed"].iterdir())
    assert "memlm_model.json" in files and "tokenizer.json" in files
    for name in files:
        for _ in range(FLIPS_PER_FILE):
            folder = tmp_path / "copy"
            shutil.copytree(runs["compressed"], folder)
            at = _flip(folder / name, rng)
            with pytest.raises(MemlmError) as e:
                load_compressed(folder)
            assert name in e.value.message and "\n" not in str(e.value), (name, at, e.value)
            shutil.rmtree(folder)


def test_resume_falls_back_by_itself_and_continues_exactly(runs, tmp_path, corpus, tokenizer_dir):
    import json

    from safetensors.torch import load_file

    from memlm.train.loop import METRICS_FILE

    run = tmp_path / "copy"
    shutil.copytree(runs["run"], run)
    _flip(run / "checkpoints" / "step-000004" / "model.safetensors", random.Random(SEED))
    result = train(_cfg(run, corpus, tokenizer_dir), MODEL, resume=True)  # finds step 4 damaged, resumes at 2
    assert result.final_step == 4 and (run / "checkpoints" / "step-000004.damaged").is_dir()

    def losses(folder: Path) -> dict[int, float]:
        lines = (folder / METRICS_FILE).read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}

    assert losses(run) == losses(runs["run"])  # steps 3 and 4 trained again, exactly as the first time
    got = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    want = load_file(runs["run"] / "checkpoints" / "step-000004" / "model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
