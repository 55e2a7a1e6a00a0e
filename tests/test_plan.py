"""The planner's choices on synthetic budgets (memlm.memory.plan)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from rich.console import Console

from memlm.config import TrainConfig, preset
from memlm.errors import MemlmError
from memlm.memory.estimate import estimate_inference, estimate_training
from memlm.memory.plan import SAFETY_MARGIN, Plan, plan_for_cli, plan_inference, plan_training, render_plan

MiB = 2**20
TINY = preset("tiny")
BASE = TrainConfig(micro_batch=32, grad_accum=1, seq_len=256)
GLOBAL = 32 * 256


@pytest.fixture(scope="module")
def unconstrained() -> Plan:
    return plan_training(TINY, BASE, 1 << 50, global_batch_tokens=GLOBAL)


def test_generous_budget_picks_the_fastest_plan_with_no_savers(unconstrained):
    p = unconstrained
    assert p.feasible and p.tradeoffs == [] and p.cost == pytest.approx(1.0)
    s = p.settings
    assert (s["micro_batch"], s["grad_accum"], s["activation_checkpointing"], s["loss_chunk"]) == (32, 1, 0, 0)
    assert (s["optimizer"], s["precision"], s["fused_backward"]) == ("adamw", "fp32", False)
    assert p.predicted_peak == estimate_training(TINY, p.train_config).total
    assert p.headroom == p.budget_bytes - p.predicted_peak


@pytest.mark.parametrize("share", [0.95, 0.8, 0.65, 0.5, 0.4, 0.33, "smallest"])
def test_plans_never_exceed_the_budget_and_keep_the_global_batch(unconstrained, share):
    if share == "smallest":  # the least the planner says fits (where it lies moves with calibration)
        budget = plan_training(TINY, BASE, 1 << 20, global_batch_tokens=GLOBAL).min_budget
    else:
        budget = int(unconstrained.predicted_peak * share)
    p = plan_training(TINY, BASE, budget, global_batch_tokens=GLOBAL)
    assert p.feasible
    assert p.predicted_peak <= budget * (1 - SAFETY_MARGIN)
    # the prediction is the estimate of exactly the returned config
    assert p.predicted_peak == estimate_training(TINY, p.train_config).total
    tc = p.train_config
    assert tc.micro_batch * tc.grad_accum * tc.seq_len == GLOBAL
    assert not (tc.fused_backward and tc.grad_accum > 1)
    assert p.tradeoffs  # something was given up
    assert p.cost > 1.0
    tc.validate()  # a config the loop accepts


def test_tighter_budgets_cost_more(unconstrained):
    costs = []
    for share in (0.9, 0.7, 0.5, 0.35, 0.28):
        costs.append(plan_training(TINY, BASE, int(unconstrained.predicted_peak * share),
                                   global_batch_tokens=GLOBAL).cost)
    assert costs == sorted(costs)


def test_plan_uses_most_of_a_tight_budget(unconstrained):
    """The knobs that only cost memory are turned up as far as the budget lets them."""
    for share in (0.9, 0.7, 0.5, 0.4):
        budget = int(unconstrained.predicted_peak * share)
        p = plan_training(TINY, BASE, budget, global_batch_tokens=GLOBAL)
        if p.predicted_peak >= 0.8 * budget:
            continue
        # less used only where the next micro-batch up (the same global batch) does not fit
        tc = p.train_config
        assert tc.grad_accum > 1, (share, p.settings)
        bigger = dataclasses.replace(tc, micro_batch=2 * tc.micro_batch, grad_accum=tc.grad_accum // 2)
        assert estimate_training(TINY, bigger).total > budget * (1 - SAFETY_MARGIN), (share, p.settings)


def test_infeasible_reports_the_smallest_budget():
    p = plan_training(TINY, BASE, 100 * MiB, global_batch_tokens=GLOBAL)
    assert not p.feasible
    assert p.min_budget is not None and p.min_budget > 100 * MiB
    ok = plan_training(TINY, BASE, p.min_budget, global_batch_tokens=GLOBAL)
    assert ok.feasible
    # ... and it is (close to) the smallest: 2% less does not fit
    assert not plan_training(TINY, BASE, int(p.min_budget * 0.98), global_batch_tokens=GLOBAL).feasible


def test_allow_restricts_the_search(unconstrained):
    budget = int(unconstrained.predicted_peak * 0.4)
    p = plan_training(TINY, BASE, budget, global_batch_tokens=GLOBAL,
                      allow={"optimizer": ["adamw"], "precision": ["fp32"], "fused_backward": [False]})
    assert p.settings["optimizer"] == "adamw" and p.settings["precision"] == "fp32"
    assert not p.settings["fused_backward"]


def test_big_model_trades_the_optimizer_when_states_dominate():
    gpt2 = preset("gpt2")
    base = TrainConfig(micro_batch=1, seq_len=128)
    need = plan_training(gpt2, base, 1 << 50).predicted_peak
    p = plan_training(gpt2, base, int(need * 0.75))
    assert p.feasible
    assert p.settings["optimizer"] != "adamw" or p.settings["fused_backward"] or p.settings["precision"] != "fp32"


def test_world_size_and_fsdp_lower_the_need():
    gpt2 = preset("gpt2")
    base = TrainConfig(micro_batch=1, seq_len=128, strategy="fsdp")
    one = plan_training(gpt2, base, 1 << 50)
    four = plan_training(gpt2, base, 1 << 50, world_size=4, global_batch_tokens=4 * 128)
    assert four.predicted_peak < one.predicted_peak
    # TrainConfig.micro_batch is global (split over the processes), so the step covers 4 sequences.
    assert four.settings["micro_batch"] * four.settings["grad_accum"] * 128 == four.settings["global_batch_tokens"]


def test_plan_json_and_render(unconstrained):
    d = json.loads(unconstrained.to_json())
    assert d["feasible"] and d["settings"]["micro_batch"] == 32
    assert d["breakdown"]["total_bytes"] == unconstrained.predicted_peak
    console = Console(record=True, width=120)
    console.print(render_plan(unconstrained))
    assert "fits" in console.export_text()
    bad = plan_training(TINY, BASE, 50 * MiB, global_batch_tokens=GLOBAL)
    console.print(render_plan(bad))
    assert "does not fit" in console.export_text()


# ------------------------------------------------------------------------------ inference


def test_inference_generous_budget_keeps_fp32():
    gpt2 = preset("gpt2")
    p = plan_inference(gpt2, "4GiB")
    assert p.feasible and p.settings["weight_format"] == "fp32" and p.settings["kv_dtype"] == "fp32"
    assert p.settings["context"] == gpt2.block_size and p.settings["concurrent_sequences"] > 1
    assert p.tradeoffs == []
    # one more sequence would not fit
    more = estimate_inference(gpt2, batch=p.settings["concurrent_sequences"] + 1, context=gpt2.block_size)
    assert more.total > p.budget_bytes * (1 - SAFETY_MARGIN)


def test_inference_tight_budget_quantizes():
    gpt2 = preset("gpt2")
    fp32_one = estimate_inference(gpt2, batch=1).total
    p = plan_inference(gpt2, int(fp32_one * 0.7))
    assert p.feasible and p.settings["weight_format"] in ("bf16", "int8", "int4")
    assert p.predicted_peak <= p.budget_bytes * (1 - SAFETY_MARGIN)
    assert any("weights" in t for t in p.tradeoffs)


def test_inference_without_context_shortens_it_before_giving_up():
    cfg = preset("smollm2-135m")  # 8192-token context: the cache of one sequence is big
    smallest = min(estimate_inference(cfg, batch=1, context=cfg.block_size, weight_format=f).total
                   for f in ("fp32", "bf16", "int8", "int4"))
    p = plan_inference(cfg, int(smallest * 0.9))
    assert p.feasible and p.settings["context"] < cfg.block_size
    assert any("context limited" in t for t in p.tradeoffs)
    fixed = plan_inference(cfg, int(smallest * 0.9), context=cfg.block_size)
    assert not fixed.feasible and fixed.min_budget > fixed.budget_bytes


def test_plan_for_cli_tasks():
    cfg = preset("tiny")
    train = plan_for_cli(cfg, "train", "2GiB", seq_len=128, global_batch_tokens=4096)
    assert train.task == "train" and train.settings["seq_len"] == 128
    assert train.settings["global_batch_tokens"] == 4096
    fine = plan_for_cli(cfg, "finetune", 2 * 2**30)
    assert fine.task == "finetune" and any("full fine-tuning" in n for n in fine.notes)
    assert fine.settings["seq_len"] == cfg.block_size
    infer = plan_for_cli(cfg, "infer", "1GiB", seq_len=200)
    assert infer.task == "infer" and infer.settings["context"] == 200
    with pytest.raises(MemlmError):
        plan_for_cli(cfg, "dance", "1GiB")
    with pytest.raises(MemlmError):
        plan_for_cli(cfg, "infer", "1GiB", seq_len=cfg.block_size + 1)
    with pytest.raises(MemlmError):
        plan_for_cli(cfg, "train", "lots")


def test_planner_respects_a_finetune_base():
    """Settings the planner does not search (lr, steps...) come through from the base config."""
    base = dataclasses.replace(BASE, lr=3e-5, steps=77)
    p = plan_training(TINY, base, 600 * MiB, global_batch_tokens=GLOBAL)
    assert p.train_config.lr == 3e-5 and p.train_config.steps == 77


def test_a_budgeted_run_on_several_processes_keeps_its_global_batch():
    """A run's micro_batch is the global one (the loop splits it over the processes): fitting a
    budget must not multiply it by the world size again."""
    from memlm.memory.plan import fit_training

    for nproc in (1, 2, 4):
        tc = TrainConfig(micro_batch=4, grad_accum=2, seq_len=64, nproc=nproc, memory_budget="16GiB")
        fitted, plan = fit_training(preset("tiny"), tc)
        assert fitted.micro_batch * fitted.grad_accum == 8 and plan.settings["global_batch_tokens"] == 8 * 64
