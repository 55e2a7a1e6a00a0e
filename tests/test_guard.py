"""The memory watchdog: a budget run stops before it would cross its budget, even when the
planner was wrong, and says which term was under-predicted."""

import json
import os
import subprocess
import sys
import textwrap

import pytest


def test_guard_refuses_the_unit_that_would_cross_the_budget():
    """Units really add 34, 68, 136, 272 MiB while the prediction says 1 MiB: the fourth is refused
    before it allocates anything, and the message names the unit as the under-predicted term."""
    script = textwrap.dedent("""
        import json, torch
        from memlm.memory.guard import BudgetExceeded, Expected, MemoryGuard
        from memlm.memory.measure import current_rss_bytes, process_peak_rss_bytes
        MiB = 2**20
        rss = current_rss_bytes()
        budget = max(process_peak_rss_bytes(), rss) + 200 * MiB
        guard = MemoryGuard(budget, Expected(base=rss, state=0, unit=1 * MiB), "unit")
        guard.mark("start-up")
        ran, message, code = [], None, None
        try:
            for size in (1, 2, 4, 8, 16):
                guard.before_unit(size)
                t = torch.ones(size * 34 * MiB // 4)  # above glibc's mmap threshold: freed at once
                ran.append(size)
                del t
                guard.after_unit()
        except BudgetExceeded as e:
            message, code = e.message, e.exit_code
        print(json.dumps({"ran": ran, "message": message, "code": code,
                          "peak": process_peak_rss_bytes(), "budget": budget}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["ran"] == [1, 2, 4], r
    assert r["peak"] <= r["budget"], r
    assert "under-predicted: one unit" in r["message"], r
    assert r["code"] == 3


@pytest.mark.slow
def test_training_with_a_wrong_activation_term_stops_with_a_checkpoint(tmp_path):
    """The planner is given activations 20x too small; a batch ramp makes the later steps bigger.
    The run must stop before the first full-size step, save the last step, and stay inside."""
    from memlm.data import default_split

    (tmp_path / "corpus.txt").write_text(default_split()[0][:60_000])
    script = textwrap.dedent("""
        import json, sys
        import memlm.memory.estimate as est
        from memlm.config import TrainConfig, preset
        from memlm.errors import MemlmError
        from memlm.memory.measure import process_peak_rss_bytes

        real = est.block_activations
        est.block_activations = lambda *a, **k: [est.Saved(s.what, s.bytes // 20, s.formula) for s in real(*a, **k)]
        model_cfg = preset("tiny")
        base = dict(out_dir="runs/guarded", corpus="corpus.txt", vocab_size=400, steps=8,
                    micro_batch=16, seq_len=128, batch_ramp=[2], batch_ramp_steps=3, eval_batches=1,
                    save_every=0)
        cfg = TrainConfig(**base)
        model_cfg = preset("tiny", vocab_size=400)
        wrong = est.estimate_training(model_cfg, cfg).total
        budget = int(wrong / 0.95) + (1 << 20)
        from memlm.train.loop import train
        try:
            train(TrainConfig(**base, memory_budget=str(budget)), model_cfg)
            print(json.dumps({"stopped": False}))
        except MemlmError as e:
            print(json.dumps({"stopped": True, "code": e.exit_code, "message": e.message, "budget": budget,
                              "peak": process_peak_rss_bytes()}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["stopped"], result
    assert result["code"] == 3, result
    assert "under-predicted: one step" in result["message"], result
    assert result["peak"] <= result["budget"], result
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "guarded" / "checkpoints").iterdir())
    assert ckpts == ["step-000003"], ckpts  # the last ramp step, saved before stopping
