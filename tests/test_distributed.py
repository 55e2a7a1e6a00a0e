"""Training on two CPU processes (gloo): DDP and FSDP match one process, FSDP halves the state
per rank, checkpoints reshard 2 -> 1 and 1 -> 2, and a lost rank fails the job cleanly.

The two-process runs go through torchrun, started from pytest. Most use this very file as the
torchrun script (see `_worker` at the bottom): each rank calls `memlm.train.train` and rank 0
writes the TrainResult as JSON. The crash test goes through the CLI (`memlm train --nproc 2`).
Every process runs one torch thread: the machine may be busy, and tiny models gain nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from memlm.config import ModelConfig, TrainConfig, to_toml
from memlm.data import default_corpus_text
from memlm.errors import MemlmError
from memlm.tokenizer import train_bpe
from memlm.train import distributed
from memlm.train.checkpoint import checkpoint_name, consolidate, is_sharded, latest_checkpoint, list_checkpoints
from memlm.train.loop import METRICS_FILE, train

HERE = Path(__file__).resolve()
MODEL = ModelConfig(n_layer=2, n_embd=64, n_head=4, block_size=64, vocab_size=320)
STEPS = 10
LAUNCH_TIMEOUT_S = 240  # a generous bound for one torchrun job on a busy 2-core machine


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures: tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    corpus = folder / "text.txt"
    corpus.write_text(default_corpus_text()[:60_000], encoding="utf-8")
    train_bpe([corpus.read_text(encoding="utf-8")], vocab_size=320).save(folder / "tok")
    return {"corpus": corpus, "tokenizer": folder / "tok"}


def _cfg(out: Path, data: dict[str, Path], **overrides) -> TrainConfig:
    base = dict(
        out_dir=str(out), corpus=str(data["corpus"]), tokenizer=str(data["tokenizer"]),
        steps=STEPS, micro_batch=4, seq_len=32, lr=3e-3, min_lr=3e-4, warmup_steps=3,
        eval_every=5, eval_batches=2, save_every=5, keep_last=2, log_every=1, device="cpu", threads=1,
        dist_timeout_s=60,
    )
    return TrainConfig(**{**base, **overrides})


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", distributed.FAULT_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "NO_COLOR": "1", **extra}


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=_env(**env), timeout=LAUNCH_TIMEOUT_S)
    return proc


def _launch(tmp: Path, cfg: TrainConfig, resume: bool = False, nproc: int = 2, model: ModelConfig = MODEL) -> dict:
    """`train(cfg, model)` on `nproc` processes through torchrun; rank 0's TrainResult as a dict."""
    spec = tmp / f"spec-{time.monotonic_ns()}.json"
    result = spec.with_suffix(".result.json")
    spec.write_text(json.dumps({"model": model.to_dict(), "train": cfg.to_dict(), "resume": resume,
                                "result": str(result)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE), str(spec)]
    proc = _run(cmd, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(result.read_text())


def _losses(run: Path | str) -> dict[int, float]:
    lines = (Path(run) / METRICS_FILE).read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def _assert_close(got: dict[int, float], want: dict[int, float], steps: range, rel: float) -> None:
    assert sorted(got) == sorted(want), (sorted(got), sorted(want))
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    assert worst <= rel, (worst, {s: (got[s], want[s]) for s in steps})


def _resume_copy(run: Path, to: Path, keep_step: int) -> Path:
    """A copy of a finished run whose checkpoints after `keep_step` are gone (as if it stopped there)."""
    shutil.copytree(run, to)
    for ckpt in list_checkpoints(to):
        if int(ckpt.name.split("-")[1]) > keep_step:
            shutil.rmtree(ckpt)
    assert latest_checkpoint(to).name == checkpoint_name(keep_step)
    return to


# ------------------------------------------------------------------- the reference runs


@pytest.fixture(scope="module")
def single(tmp_path_factory, data) -> tuple[Path, object]:
    """One process, the reference: checkpoints at 5 and 10."""
    run = tmp_path_factory.mktemp("single") / "run"
    result = train(_cfg(run, data), MODEL)
    return run, result


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory, data) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp / "run", _launch(tmp, _cfg(tmp / "run", data, strategy="fsdp"))


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, data) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ddp")
    return tmp / "run", _launch(tmp, _cfg(tmp / "run", data, strategy="ddp"))


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(strategy, single, request):
    run, result = request.getfixturevalue(strategy)
    reference = _losses(single[0])
    _assert_close(_losses(run), reference, range(1, STEPS + 1), rel=1e-4)
    assert result["final_step"] == STEPS and result["tokens_per_s"] > 0 and result["peak_bytes"] > 0
    # rank 0 alone wrote the run folder; the config records the world size and strategy it ran with
    config = (run / "config.toml").read_text()
    assert "nproc = 2" in config and f'strategy = "{strategy}"' in config
    ckpt = latest_checkpoint(run)
    assert is_sharded(ckpt) and sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp",
                                                                                            "__1_0.distcp"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["strategy"] == strategy and state["step"] == STEPS


OTHER_KINDS = {
    "encdec": ModelConfig(kind="encdec", n_layer=2, n_encoder_layer=2, n_embd=32, n_head=4, block_size=32,
                          vocab_size=320, positions="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "gru": ModelConfig(kind="rnn", rnn_cell="gru", n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=320),
}


@pytest.mark.slow
@pytest.mark.parametrize("name, strategy", [("encdec", "fsdp"), ("gru", "ddp")])
def test_other_kinds_on_two_processes_match_one_process(name, strategy, tmp_path, data):
    """The factory's kinds through the same distributed loop: the encoder-decoder sharded (FSDP
    wraps its encoder and decoder layers), the GRU replicated (DDP): losses equal one process's."""
    model = OTHER_KINDS[name]
    task = dict(task="seq2seq", corpus="default") if name == "encdec" else {}
    one = tmp_path / "one"
    train(_cfg(one, data, **task), model)
    two = tmp_path / "two"
    result = _launch(tmp_path, _cfg(two, data, strategy=strategy, **task), model=model)
    _assert_close(_losses(two), _losses(one), range(1, STEPS + 1), rel=1e-4)
    assert result["final_step"] == STEPS and is_sharded(latest_checkpoint(two))


def test_fsdp_with_the_chunked_loss_matches_one_process(tmp_path, data, single):
    """Under FSDP on 2 ranks the chunked loss reads the head's weight after the root's forward:
    it must be the whole (unsharded) matrix there, or the losses would drift from the reference."""
    run = tmp_path / "run"
    _launch(tmp_path, _cfg(run, data, strategy="fsdp", loss_chunk=24))
    _assert_close(_losses(run), _losses(single[0]), range(1, STEPS + 1), rel=1e-4)


def test_fsdp_halves_weights_grads_and_optimizer_per_rank(single, fsdp, ddp):
    one = single[1].state_bytes
    assert one > 0
    ratio = fsdp[1]["state_bytes"] / one
    assert 0.45 <= ratio <= 0.6, ratio
    assert ddp[1]["state_bytes"] == pytest.approx(one, rel=0.01)  # DDP: a full copy on every rank


def test_sharded_run_loads_and_consolidates_to_one_model(fsdp, single):
    import memlm

    run = fsdp[0]
    lm = memlm.load(run)  # the model.safetensors rank 0 gathered into the checkpoint
    full = consolidate(run)  # the DCP shards put together in this process, no process group
    assert type(full).__name__ == "Decoder"
    loaded, merged = lm.model.state_dict(), full.state_dict()
    assert loaded.keys() == merged.keys()
    assert all(torch.equal(loaded[k], merged[k]) for k in loaded)
    # and it is the same model the single process trained, up to float rounding
    reference = memlm.load(single[0]).model.state_dict()
    assert all(torch.allclose(loaded[k], reference[k], rtol=1e-3, atol=1e-5) for k in loaded)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_two_processes_on_one(strategy, tmp_path, data, single, request):
    run = _resume_copy(request.getfixturevalue(strategy)[0], tmp_path / "run", keep_step=5)
    # a half-written checkpoint past the last committed one is never picked up
    partial = run / "checkpoints" / f".{checkpoint_name(8)}.tmp"
    (partial / "dcp").mkdir(parents=True)
    result = train(_cfg(run, data, strategy=strategy), MODEL, resume=True)
    assert result.final_step == STEPS and not partial.exists()  # the next save cleaned it up
    _assert_close(_losses(run), _losses(single[0]), range(6, STEPS + 1), rel=1e-5)
    assert not is_sharded(latest_checkpoint(run))  # one process writes the single-process format


def test_resume_one_process_on_two(tmp_path, data, single):
    run = _resume_copy(single[0], tmp_path / "run", keep_step=5)
    result = _launch(tmp_path, _cfg(run, data, strategy="fsdp"), resume=True)
    assert result["final_step"] == STEPS
    _assert_close(_losses(run), _losses(single[0]), range(6, STEPS + 1), rel=1e-5)
    assert is_sharded(latest_checkpoint(run))


def test_a_killed_rank_fails_the_job_and_resume_continues(tmp_path, data, single):
    """Rank 1 dies at step 7: torchrun must stop the job (non-zero, no hang); `--resume` then
    continues from step 6, the last committed checkpoint, and ends as if nothing happened."""
    config = tmp_path / "run.toml"
    cfg = dataclasses.replace(_cfg(tmp_path / "run", data, save_every=3), nproc=2, strategy="fsdp")
    config.write_text(to_toml({"model": MODEL.to_dict(), "train": cfg.to_dict()}))
    memlm = [sys.executable, "-m", "memlm", "train"]

    t0 = time.monotonic()
    crashed = _run([*memlm, "--config", str(config)], cwd=tmp_path, **{distributed.FAULT_ENV: "1:7"})
    assert crashed.returncode != 0, crashed.stderr[-3000:]
    assert time.monotonic() - t0 < 150  # well inside the launch timeout: nobody waited for a collective
    assert "exiting at step 7" in crashed.stderr
    run = tmp_path / "run"
    assert [p.name for p in list_checkpoints(run)] == [checkpoint_name(3), checkpoint_name(6)]

    resumed = _run([*memlm, "--out", str(run), "--resume"], cwd=tmp_path)  # 2 processes, from config.toml
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "starting 2 processes" in resumed.stderr and "resuming" in resumed.stderr
    assert resumed.stdout.count("trained 10 steps") == 1  # rank 0 alone reports
    _assert_close(_losses(run), _losses(single[0]), range(7, STEPS + 1), rel=1e-5)


# ------------------------------------------------------------------- fast checks, no launch


def test_settings_that_cannot_run_sharded_fail_clearly(tmp_path, data):
    cpu = torch.device("cpu")
    cases = [
        (dict(micro_batch=3), "not divisible"),
        (dict(batch_ramp=[1, 2], batch_ramp_steps=2), "batch_ramp"),
        (dict(fused_backward=True, grad_clip=0.0), "fused_backward"),
        (dict(strategy="ddp", precision="bf16"), "bf16"),
        (dict(strategy="fsdp", optimizer="adafactor"), "adafactor"),
        (dict(strategy="fsdp", cpu_offload=True), "GPU"),
        (dict(strategy="ddp", cpu_offload=True, device="cuda"), "fsdp"),
    ]
    for overrides, fragment in cases:
        with pytest.raises(MemlmError) as e:
            distributed.check_config(_cfg(tmp_path, data, **overrides), 2, cpu)
        assert fragment in e.value.message and e.value.hint
    distributed.check_config(_cfg(tmp_path, data, micro_batch=4, strategy="fsdp"), 2, cpu)  # fine


def test_nproc_without_torchrun_says_how_to_launch(tmp_path, data, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for overrides in (dict(nproc=2), dict(cpu_offload=True)):
        with pytest.raises(MemlmError) as e:
            train(_cfg(tmp_path / "run", data, **overrides), MODEL)
        assert "torchrun" in e.value.hint
    assert not (tmp_path / "run").exists()


def test_cli_checks_before_launching(tmp_path, data):
    proc = _run([sys.executable, "-m", "memlm", "train", "--nproc", "3", "--micro-batch", "4",
                 "--out", str(tmp_path / "run"), "--set", f'train.tokenizer="{data["tokenizer"]}"'], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "not divisible by the 3 processes" in proc.stderr and "starting" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture
def one_rank_group():
    """A process group of one rank inside pytest: enough to build the DDP/FSDP wrappers."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_wrapped_models_take_the_chunked_loss(strategy, one_rank_group, monkeypatch):
    """compute_loss chunks the loss through DDP's wrapper and FSDP's root as on a plain model."""
    import memlm.train.loop as loop
    from memlm.model import Decoder
    from memlm.train.loss import chunked_cross_entropy

    calls = []
    monkeypatch.setattr(loop, "chunked_cross_entropy", lambda *a: calls.append(1) or chunked_cross_entropy(*a))
    torch.manual_seed(0)
    model, plain = Decoder(MODEL), Decoder(MODEL)
    plain.load_state_dict(model.state_dict())
    net = distributed.Distributed(world_size=1, strategy=strategy, active=True).wrap(model)
    x, y = torch.randint(0, MODEL.vocab_size, (2, 2, 32))
    loss = loop.compute_loss(net, x, y, TrainConfig(loss_chunk=16))
    loss.backward()
    expected = loop.compute_loss(plain, x, y, TrainConfig())
    expected.backward()
    assert calls == [1] and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    grad = model.tok_emb.weight.grad
    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    assert torch.allclose(grad, plain.tok_emb.weight.grad, atol=1e-6)


def test_torchrun_command():
    cmd = distributed.torchrun_command(4, ["train", "--out", "r"])
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[5:] == ["-m", "memlm", "train", "--out", "r"]


# --------------------------------------------------------- this file as the torchrun script


def _worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = train(TrainConfig.from_dict(spec["train"]), ModelConfig.from_dict(spec["model"]), resume=spec["resume"])
    distributed.shutdown()
    if distributed.is_main_process():
        out = {**dataclasses.asdict(result), "run_dir": str(result.run_dir)}
        Path(spec["result"]).write_text(json.dumps(out))


if __name__ == "__main__":
    _worker(sys.argv[1])
