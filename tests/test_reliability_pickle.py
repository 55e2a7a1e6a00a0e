"""No code from a user's folder ever runs: a malicious pickle planted in every file a loader reads.

Each row of LOADERS is a folder (or file) memlm reads, the files its loader opens and the loader.
Every one of those files in turn is replaced by a pickle whose `__reduce__` calls `os.system`
(once as a bare pickle, once inside a zip written by `torch.save`, which is what
`pytorch_model.bin` and DCP shards are); a manifest that records the files' sha256 is updated
to match, as someone who plants a file can do. The loader must raise a one-line MemlmError, or
succeed where the file is a cache it rebuilds or a file it never opens, and the command must
never have run. A new loader is one more row.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import memlm
from memlm.config import TrainConfig, load_toml, preset
from memlm.data import read_corpus
from memlm.errors import MemlmError
from memlm.integrity import seal
from memlm.loading import load_model
from memlm.model import Decoder
from memlm.tokenizer import Tokenizer
from memlm.train import train
from memlm.train.checkpoint import consolidate, latest_checkpoint, load_checkpoint, save_sharded_checkpoint
from memlm.train.optim import build_optimizer

from .test_cli import memlm as run_cli

pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py

MODEL = preset("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_heads=1, ffn_hidden=64, block_size=32, vocab_size=320)


class Evil:
    """Unpickling this runs a shell command (what a hostile file would do)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _payloads(marker: Path) -> dict[str, bytes]:
    import io

    command = f"touch {marker}"
    zipped = io.BytesIO()
    torch.save(Evil(command), zipped)  # a zip-format torch file whose data.pkl is the payload
    return {"pickle": pickle.dumps(Evil(command), protocol=2), "torch-zip": zipped.getvalue()}


def _re_sign(root: Path, planted: Path) -> None:
    """Make every manifest under `root` that records `planted`'s sha256 agree with it again
    (sealed again too: memlm's seal is no secret)."""
    digest = hashlib.sha256(planted.read_bytes()).hexdigest()
    for manifest in list(root.rglob("*.json")):
        if manifest == planted:
            continue
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(files, dict):
            name = planted.relative_to(manifest.parent).as_posix() if manifest.parent in planted.parents else None
            if name in files:
                files[name] = {"sha256": digest, "bytes": planted.stat().st_size}
                manifest.write_text(json.dumps(seal(data)), encoding="utf-8")


# ------------------------------------------------------------------- what the loaders read


def _train_cfg(run: Path, corpus: Path, tokenizer: Path, **overrides) -> TrainConfig:
    base = dict(out_dir=str(run), corpus=str(corpus), tokenizer=str(tokenizer), steps=3, micro_batch=2, seq_len=16,
                lr=1e-3, warmup_steps=1, eval_every=0, eval_batches=1, save_every=2, log_every=1, device="cpu",
                threads=1)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def sources(tmp_path_factory, corpus, tokenizer_dir) -> dict[str, Path]:
    """One of each thing memlm reads, written by memlm itself."""
    from memlm.compress import quantize_model, save_compressed
    from memlm.interop.gguf import save_gguf
    from memlm.interop.hf import save_hf, state_dict_to_hf

    root = tmp_path_factory.mktemp("sources")
    run = root / "run"
    train(_train_cfg(run, corpus, tokenizer_dir), MODEL, stop_after=2)  # step-000002 of 3

    sharded = root / "sharded"
    shutil.copytree(run, sharded)
    ckpt = latest_checkpoint(sharded)
    model = Decoder(MODEL)
    optimizer = build_optimizer(model, _train_cfg(sharded, corpus, tokenizer_dir))
    state = load_checkpoint(ckpt, model, optimizer)
    shutil.rmtree(ckpt)
    save_sharded_checkpoint(sharded, state["step"], model, optimizer,
                            {k: v for k, v in state.items() if k != "step"})  # the format of several processes

    tokenizer = Tokenizer.load(tokenizer_dir)
    lm = memlm.load(run).model
    save_hf(lm, root / "hf", tokenizer)
    hf_bin = root / "hf-bin"
    hf_bin.mkdir()
    shutil.copy(root / "hf" / "config.json", hf_bin)
    torch.save(state_dict_to_hf(lm), hf_bin / "pytorch_model.bin")  # the legacy format, as HF wrote it
    save_compressed(quantize_model(memlm.load(run).model, "int8", progress=False), tokenizer, root / "compressed")
    save_gguf(lm, tokenizer, root / "model.gguf")
    (root / "corpus.jsonl").write_text('{"text": "hello"}\n', encoding="utf-8")
    (root / "run.toml").write_text('[train]\nsteps = 3\n', encoding="utf-8")
    return {"run": run, "sharded": sharded, "hf": root / "hf", "hf-bin": hf_bin, "compressed": root / "compressed",
            "gguf": root / "model.gguf", "corpus": root / "corpus.jsonl", "toml": root / "run.toml",
            "tokenizer": root / "hf", "_corpus": corpus, "_tokenizer": tokenizer_dir}


def _resume(sources: dict[str, Path]) -> Callable[[Path], object]:
    return lambda run: train(_train_cfg(run, sources["_corpus"], sources["_tokenizer"]), MODEL, resume=True)


@dataclass
class Loader:
    name: str
    source: str  # key of `sources`
    reads: list[str]  # files (globs under the source) the loader opens: a planted pickle must be refused
    load: Callable[[dict[str, Path]], Callable[[Path], object]]
    ignores: tuple[str, ...] = ()  # files it must succeed despite (never opened, or a cache it rebuilds)


CKPT = "checkpoints/step-000002"
LOADERS = [
    Loader("memlm.load(run folder)", "run",
           ["config.toml", "tokenizer.json", "tokenizer_config.json", f"{CKPT}/model.safetensors"],
           lambda s: memlm.load),
    Loader("train --resume (run folder)", "run",
           ["tokenizer.json", "tokenizer_config.json", f"{CKPT}/*.safetensors", f"{CKPT}/trainer_state.json"],
           _resume, ignores=("cache/*", "metrics.jsonl")),
    Loader("train --resume (sharded checkpoint)", "sharded",
           [f"{CKPT}/dcp/*", f"{CKPT}/rng.safetensors", f"{CKPT}/trainer_state.json"],
           _resume, ignores=(f"{CKPT}/dcp/.metadata",)),
    Loader("consolidate (sharded checkpoint)", "sharded", [f"{CKPT}/dcp/*"], lambda s: consolidate,
           ignores=(f"{CKPT}/dcp/.metadata",)),
    Loader("memlm.load(HF folder)", "hf", ["config.json", "model.safetensors", "tokenizer.json"],
           lambda s: memlm.load),
    Loader("memlm.load(HF folder, pytorch_model.bin)", "hf-bin", ["config.json", "pytorch_model.bin"],
           lambda s: load_model),
    Loader("memlm.load(compressed folder)", "compressed", ["memlm_model.json", "model.safetensors", "tokenizer*.json"],
           lambda s: memlm.load),
    Loader("memlm.load(GGUF)", "gguf", ["."], lambda s: memlm.load),
    Loader("read_corpus(.jsonl)", "corpus", ["."], lambda s: read_corpus),
    Loader("TOML config", "toml", ["."], lambda s: lambda p: TrainConfig.from_dict(load_toml(p)["train"])),
    Loader("Tokenizer.load", "tokenizer", ["tokenizer.json", "tokenizer_config.json"], lambda s: Tokenizer.load),
]


def _files(root: Path, globs: list[str] | tuple[str, ...]) -> list[Path]:
    if root.is_file():
        return [root] if "." in globs else []
    found = {p for g in globs for p in root.glob(g) if p.is_file()}
    return sorted(found)


@pytest.mark.parametrize("loader", LOADERS, ids=lambda row: row.name)
def test_a_planted_pickle_never_runs(loader, sources, tmp_path):
    original = sources[loader.source]
    reads = _files(original, loader.reads)
    assert reads, f"{loader.name}: no file matches {loader.reads}"
    ignored = _files(original, loader.ignores) if original.is_dir() else []
    marker = tmp_path / "code-ran"
    for kind, payload in _payloads(marker).items():
        for target in [*reads, *ignored, *([original / f"{CKPT}/dcp/.metadata"] if loader.source == "sharded" else [])]:
            copy = tmp_path / f"case-{kind}"
            (shutil.copytree if original.is_dir() else shutil.copy)(original, copy)
            planted = copy / target.relative_to(original) if original.is_dir() else copy
            planted.write_bytes(payload)
            _re_sign(copy, planted) if copy.is_dir() else None
            expect_error = target in reads and target not in ignored
            what = f"{loader.name}: {kind} in {target.name}"
            try:
                loader.load(sources)(copy)
            except MemlmError as e:
                assert expect_error, f"{what}: {e}"
                assert "\n" not in e.message and "\n" not in (e.hint or ""), f"{what}: {e}"
            else:
                assert not expect_error, f"{what}: loaded without complaint"
            assert not marker.exists(), f"{what}: the planted command ran"
            (shutil.rmtree if copy.is_dir() else os.unlink)(copy)


@pytest.mark.slow
def test_resume_never_unpickles_a_planted_dcp_metadata(sources, tmp_path):
    """The hole as a user met it: `memlm train --out R --resume` on a run folder holding a sharded
    checkpoint with a pickled `.metadata` (DCP's own index): it resumes, the code never runs."""
    run = tmp_path / "run"
    shutil.copytree(sources["sharded"], run)
    marker = tmp_path / "code-ran"
    (run / CKPT / "dcp" / ".metadata").write_bytes(_payloads(marker)["pickle"])
    proc = run_cli("train", "--out", str(run), "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists()
    assert latest_checkpoint(run).name == "step-000003"
    # (a pickle planted in the shards themselves is one line: the rows of LOADERS above)
