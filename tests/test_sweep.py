"""memlm sweep on a tiny ladder: only sizes the planner fits are trained, each scored on the
held-out split, the best one recommended, results and plot written."""

from __future__ import annotations

import json

import pytest

from memlm.config import TrainConfig, preset
from memlm.errors import MemlmError
from memlm.memory.measure import parse_size
from memlm.sweep import ladder, parse_duration, shape, sweep

pytestmark = pytest.mark.usefixtures("one_thread")


def test_durations():
    assert [parse_duration(t) for t in ("90s", "10m", "1.5h", "45", 3)] == [90, 600, 5400, 45, 3]
    with pytest.raises(MemlmError, match="cannot read the time"):
        parse_duration("ten minutes")


def test_the_ladder_holds_what_the_planner_fits():
    base, train_cfg = preset("tiny"), TrainConfig(micro_batch=4, seq_len=128)
    budget = parse_size("600MiB")
    rungs = ladder(base, train_cfg, budget, 3)
    assert len(rungs) == 3 and [r.params for r in rungs] == sorted(r.params for r in rungs)
    assert all(r.plan.feasible and r.plan.predicted_peak <= budget for r in rungs)
    assert shape(base, 256, 4).num_params() == base.num_params()  # the ladder's (256, 4) is tiny itself
    with pytest.raises(MemlmError, match="not even the smallest") as e:
        ladder(base, train_cfg, parse_size("200MiB"), 3)
    assert "raise --budget to at least" in e.value.hint


def test_a_tiny_sweep_recommends_the_lowest_held_out_loss(tmp_path, corpus, tokenizer_dir):
    train_cfg = TrainConfig(corpus=str(corpus), tokenizer=str(tokenizer_dir), micro_batch=4, seq_len=32, lr=3e-3,
                            warmup_steps=2, device="cpu", threads=1, log_every=1)
    result = sweep(preset("tiny", block_size=64), train_cfg, "520MiB", 6, tmp_path / "sweep", rungs=2)
    assert len(result.rungs) == 2 and result.rungs[0].params < result.rungs[1].params
    assert all(r.steps >= 1 and r.eval_loss < 7 and r.plan.predicted_peak <= parse_size("520MiB") for r in result.rungs)
    assert result.best is min(result.rungs, key=lambda r: r.eval_loss)
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert saved["best"] == result.best.name and [r["eval_loss"] for r in saved["rungs"]] == [r.eval_loss for r in result.rungs]
    assert result.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
