"""Checkpoints: exact round trip, atomic writes, pruning, config checks, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError
from memlm.model import Decoder
from memlm.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from memlm.train.loop import compute_loss
from memlm.train.optim import build_optimizer



pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py


TINY = dict(n_layer=2, n_embd=64, n_head=4, block_size=32, vocab_size=97)


def _trained(optimizer: str = "adamw", seed: int = 0, **model_overrides):
    """A tiny model and its optimizer after two real steps (so the optimizer has state)."""
    torch.manual_seed(seed)
    model = Decoder(ModelConfig(**{**TINY, **model_overrides}))
    cfg = TrainConfig(optimizer=optimizer, lr=1e-2)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    for _ in range(2):
        compute_loss(model, x[:, :-1], x[:, 1:], cfg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


def _fresh(optimizer: str = "adamw", **model_overrides):
    torch.manual_seed(123)  # different init, so a load that did nothing would show
    model = Decoder(ModelConfig(**{**TINY, **model_overrides}))
    return model, build_optimizer(model, TrainConfig(optimizer=optimizer, lr=1e-2))


def _assert_same_optimizer_state(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for key, value in sa["state"][i].items():
            other = sb["state"][i][key]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), (i, key)
            else:
                assert value == other, (i, key)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_round_trip_is_exact(tmp_path, optimizer):
    model, opt = _trained(optimizer)
    path = save_checkpoint(tmp_path, 7, model, opt, {"tokens_seen": 99, "note": "hi"}, keep_last=2)
    assert path == tmp_path / "checkpoints" / "step-000007"

    model2, opt2 = _fresh(optimizer)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 7 and state["tokens_seen"] == 99 and state["note"] == "hi"
    assert state["model_config"] == model.config.to_dict()
    for (name, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), name
    assert model2.lm_head.weight is model2.tok_emb.weight  # still tied after loading
    _assert_same_optimizer_state(opt, opt2)

    # The loaded optimizer keeps stepping exactly like the original.
    x = torch.randint(0, TINY["vocab_size"], (2, 16))
    cfg = TrainConfig(optimizer=optimizer)
    for m, o in ((model, opt), (model2, opt2)):
        compute_loss(m, x[:, :-1], x[:, 1:], cfg).backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_untied_model_round_trip(tmp_path):
    model, opt = _trained(tied_embeddings=False)
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    model2, opt2 = _fresh(tied_embeddings=False)
    load_checkpoint(path, model2, opt2)
    assert torch.equal(model.lm_head.weight, model2.lm_head.weight)
    assert model2.lm_head.weight is not model2.tok_emb.weight


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 3, model, opt, {})
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    ]
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]
    from safetensors import safe_open

    with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "state.0.exp_avg" in names and "state.0.exp_avg_sq" in names and "state.0.step" in names


def test_rng_state_is_restored_on_request(tmp_path):
    model, opt = _trained()
    torch.manual_seed(5)
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    expected = torch.rand(4)
    load_checkpoint(path, model, opt)  # restore_rng defaults to False: the stream moves on
    assert not torch.equal(torch.rand(4), expected)
    load_checkpoint(path, model, opt, restore_rng=True)
    assert torch.equal(torch.rand(4), expected)


def test_leftover_tmp_is_ignored_and_cleaned(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 2, model, opt, {})
    # A crash while writing step 4 leaves a temp folder, with or without files in it.
    partial = tmp_path / "checkpoints" / ".step-000004.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert latest_checkpoint(tmp_path).name == "step-000002"
    # A step-* folder without trainer_state.json is incomplete and ignored too.
    (tmp_path / "checkpoints" / "step-000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000002"

    save_checkpoint(tmp_path, 6, model, opt, {})
    assert not partial.exists()
    assert latest_checkpoint(tmp_path).name == "step-000006"


def test_latest_checkpoint_of_empty_run(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None


def test_keep_last(tmp_path):
    model, opt = _trained()
    for step in (1, 2, 3, 10, 11):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=3)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000010", "step-000011"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_saving_the_same_step_twice_replaces_it(tmp_path):
    model, opt = _trained()
    save_checkpoint(tmp_path, 5, model, opt, {"v": 1})
    save_checkpoint(tmp_path, 5, model, opt, {"v": 2})
    path = latest_checkpoint(tmp_path)
    assert json.loads((path / "trainer_state.json").read_text())["v"] == 2
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1


def test_mismatching_model_config_is_refused(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    other, other_opt = _fresh(n_layer=3, n_embd=128)
    with pytest.raises(MemlmError) as e:
        load_checkpoint(path, other, other_opt)
    assert "n_layer" in e.value.message and "n_embd" in e.value.message
    # Name and dropout do not change the weights, so they may differ.
    same, same_opt = _fresh(name="renamed", dropout=0.1)
    load_checkpoint(path, same, same_opt)


def test_wrong_optimizer_is_refused(tmp_path):
    model, opt = _trained("adamw")
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    model2, sgd = _fresh("sgd")
    with pytest.raises(MemlmError):
        load_checkpoint(path, model2, sgd)


def test_not_a_checkpoint(tmp_path):
    model, opt = _fresh()
    with pytest.raises(MemlmError):
        load_checkpoint(tmp_path, model, opt)


def test_every_file_is_recorded_with_its_sha256_and_the_state_is_sealed(tmp_path):
    import hashlib

    from memlm.integrity import SEAL, sealed_intact

    model, opt = _trained()
    path = save_checkpoint(tmp_path, 3, model, opt, {"note": "hi"})
    state = json.loads((path / "trainer_state.json").read_text())
    assert sorted(state["files"]) == ["model.safetensors", "optimizer.safetensors", "rng.safetensors"]
    for name, entry in state["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert sealed_intact(state) and len(state[SEAL]) == 64
    assert not sealed_intact({**state, "note": "changed"})
    assert not sealed_intact({k: v for k, v in state.items() if k != SEAL})  # files without a seal
    assert sealed_intact({"step": 1})  # a checkpoint of a memlm that recorded neither


def test_a_checkpoint_without_sha256_still_loads(tmp_path):
    """Checkpoints written before memlm recorded files load as they always did."""
    from memlm.integrity import SEAL

    model, opt = _trained()
    path = save_checkpoint(tmp_path, 3, model, opt, {})
    state = json.loads((path / "trainer_state.json").read_text())
    del state["files"], state[SEAL]
    (path / "trainer_state.json").write_text(json.dumps(state))
    model2, opt2 = _fresh()
    load_checkpoint(path, model2, opt2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps (Linux)")
def test_a_loaded_checkpoint_keeps_no_file_mapped(tmp_path):
    """The optimizer state is read into fresh memory: a pruned checkpoint's files leave the disk
    (safetensors' load_file maps the file, and the state would hold the map for the whole run)."""
    model, opt = _trained()
    path = save_checkpoint(tmp_path, 1, model, opt, {})
    model2, opt2 = _fresh()
    load_checkpoint(path, model2, opt2, restore_rng=True)
    maps = Path("/proc/self/maps").read_text()
    assert str(path) not in maps
