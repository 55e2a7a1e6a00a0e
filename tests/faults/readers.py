"""Every reader of user files, as a fuzz target: `target(data, work)` writes `data` where the
reader looks and reads it. A target may return or raise MemlmError with a one-line message;
anything else (another exception, a crash, a hang, a huge allocation) is a bug. Shared by
tests/faults/test_fuzz.py (hypothesis, bounded) and bench/faults.py (atheris or hypothesis,
long). `Seeds` writes one valid file of each kind, the starting points of the mutations.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from memlm.config import preset
from memlm.errors import MemlmError

MODEL = preset("tiny", n_layer=1, n_embd=32, n_head=2, n_kv_heads=1, ffn_hidden=64, block_size=32, vocab_size=320)


def one_line(e: MemlmError) -> None:
    assert "\n" not in e.message and "\n" not in (e.hint or ""), f"not one line: {e}"


@dataclass
class Seeds:
    """Valid files of every kind memlm reads, written by memlm (the fuzzers mutate them)."""

    root: Path

    @classmethod
    def make(cls, root: Path, corpus: Path, tokenizer_dir: Path) -> Seeds:
        from memlm.compress import quantize_model, save_compressed
        from memlm.config import TrainConfig
        from memlm.interop.gguf import save_gguf
        from memlm.interop.hf import save_hf
        from memlm.model import Decoder
        from memlm.tokenizer import Tokenizer
        from memlm.train import train
        from memlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_sharded_checkpoint
        from memlm.train.optim import build_optimizer

        root.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        tokenizer = Tokenizer.load(tokenizer_dir)
        model = Decoder(MODEL).eval()
        save_gguf(model, tokenizer, root / "model.gguf")
        save_hf(model, root / "hf", tokenizer)
        save_compressed(quantize_model(Decoder(MODEL), "int8", progress=False), tokenizer, root / "compressed")
        cfg = TrainConfig(out_dir=str(root / "run"), corpus=str(corpus), tokenizer=str(tokenizer_dir), steps=1,
                          micro_batch=2, seq_len=16, eval_every=0, eval_batches=1, device="cpu", threads=1)
        train(cfg, MODEL)
        (root / "run.toml").write_text((root / "run" / "config.toml").read_text())
        shutil.copytree(root / "run", root / "sharded")
        ckpt = latest_checkpoint(root / "sharded")
        model, optimizer = Decoder(MODEL), None
        optimizer = build_optimizer(model, cfg)
        state = load_checkpoint(ckpt, model, optimizer)
        shutil.rmtree(ckpt)
        save_sharded_checkpoint(root / "sharded", state["step"], model, optimizer,
                                {k: v for k, v in state.items() if k != "step"})
        (root / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("one", "two €")))
        return cls(root)

    def bytes_of(self, kind: str) -> bytes:
        return (self.root / SOURCES[kind]).read_bytes()


# kind -> the seed file a target's input replaces
SOURCES = {
    "gguf": "model.gguf",
    "safetensors": "hf/model.safetensors",
    "tokenizer.json": "hf/tokenizer.json",
    "config.json": "hf/config.json",
    "toml": "run.toml",
    "jsonl": "corpus.jsonl",
    "trainer_state.json": "run/checkpoints/step-000001/trainer_state.json",
    "memlm_model.json": "compressed/memlm_model.json",
    "memlm_dcp.json": "sharded/checkpoints/step-000001/dcp/memlm_dcp.json",
}


def _copy(seeds: Seeds, folder: str, work: Path) -> Path:
    dst = work / folder
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(seeds.root / folder, dst)
    return dst


def _json_or_none(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def _resealed(data: bytes) -> bytes:
    """A JSON object sealed again (memlm's seal is no secret: a planted file can carry a valid
    one, so the parser behind it is what is fuzzed), anything else as it is."""
    from memlm.integrity import seal

    value = _json_or_none(data)
    return json.dumps(seal(value)).encode() if isinstance(value, dict) else data


def gguf(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.interop.gguf import load_gguf, read_gguf_config

    path = work / "fuzz.gguf"
    path.write_bytes(data)
    read_gguf_config(path)
    load_gguf(path)


def safetensors(seeds: Seeds, data: bytes, work: Path) -> None:
    """An HF folder's weights: memlm's safetensors reader, then each tensor into the model."""
    import memlm

    folder = _copy(seeds, "hf", work)
    (folder / "model.safetensors").write_bytes(data)
    memlm.load(folder)


def tokenizer_json(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.tokenizer import Tokenizer

    path = work / "tokenizer.json"
    path.write_bytes(data)
    tok = Tokenizer.load(path)
    tok.decode(tok.encode("def f(x):\n    return x  # ünïcode"))


def config_json(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.loading import model_config_of

    folder = work / "hf-config"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(data)
    model_config_of(folder)


def toml(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.cli import resolve_configs

    path = work / "run.toml"
    path.write_bytes(data)
    resolve_configs(path, None, {})


def jsonl(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.data import read_corpus

    path = work / "corpus.jsonl"
    path.write_bytes(data)
    read_corpus(str(path), "train")


def trainer_state(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.model import Decoder
    from memlm.train.checkpoint import latest_checkpoint, load_checkpoint

    run = _copy(seeds, "run", work)
    ckpt = latest_checkpoint(run)
    (ckpt / "trainer_state.json").write_bytes(_resealed(data))
    load_checkpoint(ckpt, Decoder(MODEL), restore_rng=True)


def compressed_description(seeds: Seeds, data: bytes, work: Path) -> None:
    from memlm.compress.storage import load_compressed

    folder = _copy(seeds, "compressed", work)
    (folder / "memlm_model.json").write_bytes(_resealed(data))
    load_compressed(folder)


def dcp_index(seeds: Seeds, data: bytes, work: Path) -> None:
    """A sharded checkpoint's index, with the manifest re-signed to let it through."""
    from memlm.integrity import describe_files, seal
    from memlm.model import Decoder
    from memlm.train.checkpoint import latest_checkpoint, load_sharded_checkpoint

    run = _copy(seeds, "sharded", work)
    ckpt = latest_checkpoint(run)
    (ckpt / "dcp" / "memlm_dcp.json").write_bytes(data)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["files"].update(describe_files(ckpt, ["dcp/memlm_dcp.json"]))
    (ckpt / "trainer_state.json").write_text(json.dumps(seal(state)))
    load_sharded_checkpoint(ckpt, Decoder(MODEL))


# kind -> target
TARGETS: dict[str, Callable[[Seeds, bytes, Path], None]] = {
    "gguf": gguf, "safetensors": safetensors, "tokenizer.json": tokenizer_json, "config.json": config_json,
    "toml": toml, "jsonl": jsonl, "trainer_state.json": trainer_state, "memlm_model.json": compressed_description,
    "memlm_dcp.json": dcp_index,
}


def run_target(kind: str, seeds: Seeds, data: bytes, work: Path) -> bool:
    """Feed `data` to the reader of `kind`; True when it refused it (one-line MemlmError), False
    when it accepted it; anything else raises."""
    try:
        TARGETS[kind](seeds, data, work)
    except MemlmError as e:
        one_line(e)
        return True
    return False
