"""I/O failures are one line and lose nothing: a full disk, a read-only one, a folder memlm may
not write, a folder that vanishes during a save, on saves, exports and the token cache.

Full and read-only disks are real: a small tmpfs, remounted read-only where the test says so
(mounting needs root: elsewhere those tests are skipped, saying so). Permissions are real too:
as root, which may write anywhere, that test's writes run without the capabilities that allow it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memlm.config import ModelConfig, TrainConfig
from memlm.data import tokenize_corpus
from memlm.errors import MemlmError
from memlm.interop.hf import save_hf
from memlm.model import Decoder
from memlm.tokenizer import Tokenizer
from memlm.train import train
from memlm.train import checkpoint as ckpt_module
from memlm.train.checkpoint import list_checkpoints, save_checkpoint, verify_checkpoint
from memlm.train.optim import build_optimizer


ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(n_layer=1, n_embd=32, n_head=2, block_size=32, vocab_size=320, norm="rmsnorm", positions="rope",
                   mlp="swiglu", bias=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _mount(where: Path, size: str) -> None:
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'not root'}): these faults need root")


def _remount(where: Path, mode: str) -> None:
    for _ in range(50):  # EBUSY while a file is open for writing: the run closes its files quickly
        if subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"could not remount {where} {mode}")


@pytest.fixture
def disk(tmp_path):
    """A function mounting a tmpfs of a size (e.g. "2m") at tmp_path/disk; unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        _mount(where, size)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _fill(where: Path, leave: int) -> None:
    """Leave about `leave` bytes free on the file system of `where`."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(where / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _model_and_optimizer():
    torch.manual_seed(0)
    model = Decoder(TINY)
    return model, build_optimizer(model, TrainConfig())


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name)


def _assert_one_line(e: MemlmError, *fragments: str) -> None:
    assert "\n" not in e.message and "\n" not in (e.hint or ""), e
    for f in fragments:
        assert f in str(e), e


# ------------------------------------------------------------------------------ saving


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(disk):
    run = disk("4m")
    model, opt = _model_and_optimizer()
    first = save_checkpoint(run, 1, model, opt, {})
    _fill(run, leave=64 * 1024)  # room for a part of the next checkpoint, not all of it
    with pytest.raises(MemlmError) as e:
        save_checkpoint(run, 2, model, opt, {})
    _assert_one_line(e.value, "No space left on device", "step-000001 is intact", "free some space")
    assert _leftovers(run) == []
    assert list_checkpoints(run) == [first]
    verify_checkpoint(first)  # every file as recorded


def test_a_disk_turned_read_only_during_a_run_keeps_the_previous_checkpoint(disk):
    run = disk("4m")
    model, opt = _model_and_optimizer()
    first = save_checkpoint(run, 1, model, opt, {})
    _remount(run, "ro")
    with pytest.raises(MemlmError) as e:
        save_checkpoint(run, 2, model, opt, {})
    _assert_one_line(e.value, "Read-only file system", "step-000001 is intact", "read-only")
    assert list_checkpoints(run) == [first] and _leftovers(run) == []
    verify_checkpoint(first)


def test_a_folder_that_vanishes_during_a_save(tmp_path, monkeypatch):
    model, opt = _model_and_optimizer()
    save_checkpoint(tmp_path, 1, model, opt, {})
    real_save_file = ckpt_module.save_file

    def vanish_then_save(tensors, filename, metadata=None):  # someone deletes the folder being written
        shutil.rmtree(Path(filename).parent)
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(ckpt_module, "save_file", vanish_then_save)
    with pytest.raises(MemlmError) as e:
        save_checkpoint(tmp_path, 2, model, opt, {})
    _assert_one_line(e.value, "No such file or directory", "step-000001 is intact", "vanished")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000001"] and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ export, token cache


def test_export_to_a_full_or_read_only_disk_leaves_nothing(disk, tokenizer_dir):
    model, tokenizer = Decoder(TINY), Tokenizer.load(tokenizer_dir)
    full = disk("1m")
    _fill(full, leave=16 * 1024)
    with pytest.raises(MemlmError) as e:
        save_hf(model, full / "hf", tokenizer)
    _assert_one_line(e.value, "cannot export", "No space left on device")
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no folder, no temporary

    read_only = disk("1m")
    _remount(read_only, "ro")
    with pytest.raises(MemlmError) as e:
        save_hf(model, read_only / "hf", tokenizer)
    _assert_one_line(e.value, "Read-only file system")


def test_the_token_cache_on_a_full_disk(disk, corpus, tokenizer_dir):
    cache = disk("16k")
    with pytest.raises(MemlmError) as e:
        tokenize_corpus(str(corpus), Tokenizer.load(tokenizer_dir), "train", cache / "cache")
    _assert_one_line(e.value, "token cache", "No space left on device")
    assert _leftovers(cache) == []


def test_training_into_a_read_only_folder_fails_before_any_step(disk, corpus, tokenizer_dir):
    run = disk("1m")
    _remount(run, "ro")
    cfg = TrainConfig(out_dir=str(run / "run"), corpus=str(corpus), tokenizer=str(tokenizer_dir), steps=2,
                      micro_batch=2, seq_len=16, device="cpu", threads=1)
    with pytest.raises(MemlmError) as e:
        train(cfg, TINY)
    _assert_one_line(e.value, "Read-only file system")


PERMISSION_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError
from memlm.interop.hf import save_hf
from memlm.model import Decoder
from memlm.train.checkpoint import save_checkpoint
from memlm.train.optim import build_optimizer

where = Path(sys.argv[1])
model = Decoder(ModelConfig(**json.loads(sys.argv[2])))
results = {}
for name, write in (("checkpoint", lambda: save_checkpoint(where / "run", 1, model, build_optimizer(model, TrainConfig()), {})),
                    ("export", lambda: save_hf(model, where / "hf"))):
    try:
        write()
        results[name] = None
    except MemlmError as e:
        results[name] = [e.message, e.hint]
print(json.dumps(results))
"""


def test_a_folder_memlm_may_not_write(tmp_path):
    target = tmp_path / "locked"
    target.mkdir()
    target.chmod(0o555)
    cmd = [sys.executable, "-c", PERMISSION_SCRIPT, str(target), json.dumps(TINY.to_dict())]
    if os.geteuid() == 0:  # root writes anywhere: the writes run without the capabilities that allow it
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permissions cannot be made to apply")
        cmd = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
               "--bounding-set=-dac_override,-dac_read_search", *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)
    for name, (message, hint) in results.items():
        assert "Permission denied" in message and "permissions" in hint, (name, message, hint)
    assert os.listdir(target) == []


# A real `memlm train` whose disk turns read-only or fills up at a random moment (one line, exit 2,
# the committed checkpoint intact, the resumed run bit-identical): tests/faults/test_faults.py.
