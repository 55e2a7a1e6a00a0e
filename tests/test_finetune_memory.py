"""The fine-tuning terms of the memory planner: LoRA's saved activations against autograd itself,
the frozen base in its stored format, adapters' states, and `--memory-budget` choosing settings."""

from __future__ import annotations

import sys

import pytest
import torch

from memlm.adapters.lora import apply_lora
from memlm.compress.quantize import quantize_model
from memlm.config import TrainConfig, preset
from memlm.memory.estimate import (
    estimate_finetune,
    estimate_training,
    inference_weight_bytes,
    lora_block_activations,
    lora_shapes,
    optimizer_state_bytes,
)
from memlm.memory.plan import plan_finetune
from memlm.model import Decoder

FLAVOURS = {
    "llama": dict(vocab_size=512, n_layer=2, block_size=64),
    "gpt2": dict(vocab_size=512, n_layer=2, n_embd=128, n_head=4, block_size=64),
}


def _saved_bytes(block, x, rope) -> int:
    """Bytes autograd saves in one block's forward (parameters and buffers aside), by storage."""
    fixed = {t.untyped_storage().data_ptr() for t in [*block.parameters(), *block.buffers()]}
    if rope is not None:
        fixed |= {t.untyped_storage().data_ptr() for t in rope}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in fixed:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope)
    return sum(seen.values())


@pytest.mark.parametrize("flavour,targets,fmt", [
    ("llama", ("q_proj", "v_proj"), None), ("llama", ("all-linear",), "int4"), ("llama", ("o_proj",), None),
    ("gpt2", ("up_proj", "down_proj"), "int4"), ("gpt2", ("q_proj", "v_proj"), None)])
def test_lora_block_activations_are_what_autograd_saves(flavour, targets, fmt):
    base = "tiny" if flavour == "llama" else "gpt2"
    cfg = preset(base, **FLAVOURS[flavour])
    torch.manual_seed(0)
    model = Decoder(cfg)
    if fmt:
        quantize_model(model, fmt, group_size=32, progress=False)
    apply_lora(model, r=4, alpha=8, targets=list(targets))
    model.train()
    B, T = 2, 16
    h = model.tok_emb(torch.randint(0, 512, (B, T))).detach()
    if cfg.positions == "learned":
        h = h + model.pos_emb.weight[:T].detach()
    rope = (model.rope_cos[:T], model.rope_sin[:T]) if cfg.positions == "rope" else None
    for first in (True, False):  # block 0's input needs no gradient; a later block's does
        x = h if first else h.clone().requires_grad_(True)
        expected = sum(s.bytes for s in lora_block_activations(cfg, B, T, 4, targets, first=first))
        assert _saved_bytes(model.blocks[0], x, rope) == expected


def test_the_finetune_estimate_trains_adapters_only():
    cfg = preset("smollm2-135m")
    tc = TrainConfig(micro_batch=2, seq_len=256)  # the shape bench/memory_accuracy.py measures
    full = estimate_finetune(cfg, tc)
    lora = estimate_finetune(cfg, tc, lora_r=8, lora_targets=("q_proj", "v_proj"), base_format="fp32")
    qlora = estimate_finetune(cfg, tc, lora_r=8, lora_targets=("q_proj", "v_proj"), base_format="int4", group_size=32)
    shapes = lora_shapes(cfg, 8, ("q_proj", "v_proj"))
    n = sum(s.numel for s in shapes)
    assert n == 30 * (8 * 576 + 576 * 8 + 8 * 576 + 192 * 8)
    assert lora.term("optimizer_states", "optimizer step") == sum(optimizer_state_bytes(s, "adamw") for s in shapes)
    assert lora.term("gradients", "optimizer step") == 4 * n
    # int4 block Linears, float embedding and norms, the RoPE tables; and the adapters in fp32
    assert qlora.term("weights", "optimizer step") == inference_weight_bytes(cfg, "int4", group_size=32) + 4 * n
    assert full.total == estimate_training(cfg, tc).total + full["tokenizer"]
    assert qlora.total < lora.total < full.total
    assert qlora.settings["method"] == "qlora" and full.settings["method"] == "full"


def test_plan_finetune_trades_base_format_and_checkpointing_for_a_budget():
    cfg = preset("smollm2-135m")
    tc = TrainConfig(micro_batch=4, seq_len=512)
    roomy = plan_finetune(cfg, tc, "16GiB", lora_r=8, base_format="fp32")
    assert roomy.feasible and roomy.settings["base_format"] == "fp32" and roomy.tradeoffs == []
    unconstrained = roomy.predicted_peak
    tight = plan_finetune(cfg, tc, int(unconstrained * 0.6), lora_r=8, base_format="fp32")
    assert tight.feasible and tight.predicted_peak <= int(unconstrained * 0.6) * 0.94
    assert tight.settings["micro_batch"] * tight.settings["grad_accum"] == 4  # the global batch kept
    hopeless = plan_finetune(cfg, tc, "100MiB", lora_r=8, base_format="int4", search_base=False)
    assert not hopeless.feasible and hopeless.min_budget > 100 * 2**20


def test_memlm_plan_task_finetune_prints_the_lora_terms(monkeypatch, capsys):
    from memlm import cli

    monkeypatch.setattr(sys, "argv", ["memlm", "plan", "--model", "smollm2-135m", "--task", "finetune", "--lora-r",
                                      "8", "--quantize-base", "int4", "--seq-len", "512", "--micro-batch", "4",
                                      "--json"])
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None)
    import json

    out = json.loads(capsys.readouterr().out)
    assert out["task"] == "finetune" and out["settings"]["method"] == "qlora" and out["settings"]["lora_r"] == 8
    assert "frozen base (int4" in next(t["formula"] for t in out["terms"] if t["name"] == "weights")


def test_a_process_of_a_two_process_finetune_holds_the_base_and_half_the_batch():
    cfg = preset("smollm2-135m")
    kw = dict(lora_r=8, lora_targets=("q_proj", "v_proj"), base_format="int4", group_size=32)
    half = estimate_finetune(cfg, TrainConfig(micro_batch=4, seq_len=512), **kw)
    two = estimate_finetune(cfg, TrainConfig(micro_batch=8, seq_len=512, nproc=2), world_size=2, **kw)
    assert two.term("weights", "optimizer step") == half.term("weights", "optimizer step")  # the whole base, each
    assert two.term("activations") == half.term("activations")  # its share of the micro-batch
    assert two.term("runtime") > half.term("runtime")  # and the process group's code
    # under a budget, the run's global batch is kept (its micro_batch is the global one)
    tc = TrainConfig(micro_batch=8, seq_len=512, nproc=2)
    plan = plan_finetune(cfg, tc, "16GiB", lora_r=8, base_format="int4")
    assert plan.feasible and plan.world_size == 2
    assert plan.settings["micro_batch"] * plan.settings["grad_accum"] * 512 == plan.settings["global_batch_tokens"] == 8 * 512


def test_the_loss_is_sized_for_the_answers_a_micro_batch_can_hold():
    """Instruction data scores only its answers: the head and the loss run over at most the
    micro-batch's B largest answers (memlm.train.loop.scored_rows), not all B*T positions."""
    cfg = preset("smollm2-135m")
    tc = TrainConfig(micro_batch=4, seq_len=256)
    kw = dict(lora_r=8, lora_targets=("q_proj", "v_proj"), base_format="int4", group_size=32)
    every = estimate_finetune(cfg, tc, **kw)
    answers = (300, 90, 40, 30, 30, 20, 10)  # largest first; one longer than seq_len
    scored = estimate_finetune(cfg, tc, answer_tokens=answers, **kw)
    n = 256 + 90 + 40 + 30  # the four largest, each at most T
    V, d = cfg.vocab_size, cfg.n_embd
    # fp32 full loss: one (n, V) buffer, and in backward the (n, d) sides of the head's matmuls
    assert scored.term("logits_loss", "backward: loss") == n * V * 4 + 3 * n * d * 4
    assert every.term("logits_loss", "backward: loss") == 4 * 256 * V * 4 + 3 * 4 * 256 * d * 4
    assert scored.total < every.total
    assert estimate_finetune(cfg, tc, answer_tokens=(2000,) * 8, **kw).total == every.total  # capped at B*T
