"""`memlm demo`: the main job on the embedded default corpus, with every choice made for the user.

Trains the `tiny` preset on the train split of CPython's language reference, then compares its
eval-split perplexity with a unigram model of the same tokenizer and prints a sample.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from memlm.config import TrainConfig, preset

DEMO_PROMPT = "The for statement is used to"
TRAINING_SECONDS = 150  # the demo's time budget for training: it must finish in 5 minutes on 2 cores
MEMORY_BUDGET = "1GiB"


def demo_configs(out_dir: str, steps: int, memory_budget: str = MEMORY_BUDGET):
    model_cfg = preset("tiny")
    train_cfg = TrainConfig(
        out_dir=out_dir, corpus="default", vocab_size=model_cfg.vocab_size, steps=steps, micro_batch=8,
        seq_len=128, lr=2e-3, min_lr=2e-4, warmup_steps=min(50, steps // 10), eval_every=max(steps // 3, 1),
        eval_batches=8, save_every=steps, keep_last=1, log_every=10, memory_budget=memory_budget,
    )
    return model_cfg, train_cfg


def steps_that_fit(seconds: float, memory_budget: str = MEMORY_BUDGET) -> int:
    """Time training steps of `tiny` with the settings the budget's plan picks, and size the run to
    the time budget. The timing runs the loop's own loss and optimizer with the planned settings,
    so it never needs more memory than the training that follows."""
    from memlm.memory.measure import return_free_heap
    from memlm.memory.plan import fit_training
    from memlm.model import build_model
    from memlm.train.loop import apply_train_settings, compute_loss
    from memlm.train.optim import build_optimizer

    model_cfg, probe = demo_configs("-", 1000, memory_budget)
    cfg, _ = fit_training(model_cfg, probe)
    model = apply_train_settings(build_model(model_cfg), cfg)
    opt = build_optimizer(model, cfg)
    x = torch.randint(0, model_cfg.vocab_size, (cfg.micro_batch, cfg.seq_len))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(cfg.grad_accum):
            (compute_loss(model, x, x, cfg) / cfg.grad_accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del model, opt, x
    return_free_heap()
    per_step = min(times[1:])  # the first step pays one-off allocation costs
    return max(100, min(1500, int(seconds / per_step)))


def run_demo(out_dir: str, steps: int, console: Console, out: Console, memory_budget: str = MEMORY_BUDGET) -> dict:
    from memlm.data import read_corpus
    from memlm.eval.perplexity import perplexity
    from memlm.infer.sampling import SamplingSettings
    from memlm.infer.generate import generate_text
    from memlm.loading import load_run
    from memlm.tokenizer import unigram_baseline_nll
    from memlm.train.checkpoint import latest_checkpoint
    from memlm.train.loop import train

    t0 = time.perf_counter()
    resume = latest_checkpoint(Path(out_dir)) is not None
    if resume:
        console.print(f"{out_dir} already holds a demo run: continuing it (delete the folder to start over)")
        from memlm.config import load_toml

        steps = max(steps or 0, load_toml(Path(out_dir) / "config.toml")["train"]["steps"])
    elif not steps:
        steps = steps_that_fit(TRAINING_SECONDS, memory_budget)
        console.print(f"this machine does a training step in ~{TRAINING_SECONDS / steps:.2f} s: "
                      f"{steps} steps fit the demo's {TRAINING_SECONDS} s of training")
    model_cfg, train_cfg = demo_configs(out_dir, steps, memory_budget)
    out.print(f"[bold]memlm demo[/]: training [bold]tiny[/] ({model_cfg.num_params() / 1e6:.1f}M parameters) "
              f"on the embedded Python language reference, {steps} steps of "
              f"{train_cfg.micro_batch}x{train_cfg.seq_len} tokens, inside a memory budget of {memory_budget}")
    result = train(train_cfg, model_cfg, resume=resume, console=console)
    model, tokenizer = load_run(Path(out_dir))

    train_ids = tokenizer.encode("\n\n".join(read_corpus("default", "train")))
    eval_ids = tokenizer.encode("\n\n".join(read_corpus("default", "eval")))
    window = train_cfg.seq_len
    ppl = perplexity(model, eval_ids, window=window, batch_size=8)
    unigram = math.exp(unigram_baseline_nll(train_ids, eval_ids, tokenizer.vocab_size))

    table = Table(title="eval split perplexity (lower is better)")
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_row("unigram baseline (same tokenizer)", f"{unigram:.1f}")
    table.add_row(f"tiny after {result.final_step} steps", f"{ppl.ppl:.1f}")
    out.print(table)
    out.print(f"the model is {unigram / ppl.ppl:.1f}x better than the unigram baseline; "
              f"{result.tokens_per_s:,.0f} training tokens/s (memory budget {memory_budget})")

    torch.manual_seed(0)
    settings = SamplingSettings(max_new_tokens=80, temperature=0.7, top_k=40, seed=0)
    sample = DEMO_PROMPT + generate_text(model, tokenizer, DEMO_PROMPT, settings)
    (Path(out_dir) / "samples.txt").write_text(sample + "\n")
    out.print("[bold]sample:[/]")
    out.print(sample, markup=False)
    out.print(f"done in {time.perf_counter() - t0:.0f} s; try: memlm generate \"{DEMO_PROMPT}\" --model {out_dir}")
    return {"ppl": ppl.ppl, "unigram_ppl": unigram, "steps": result.final_step, "sample": sample,
            "predicted_peak_bytes": result.predicted_peak_bytes}
