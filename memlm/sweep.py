"""Choosing a model size by validation inside a budget (`memlm sweep`).

A ladder of shapes (width and depth together, from LADDER) is scaled from a base preset; the
planner keeps those whose training fits the memory budget (memlm.memory.plan.plan_training,
the savers it would choose included); up to `rungs` of them, spread over the feasible sizes,
are trained one after another in this process for an equal share of the time, on one tokenizer
(trained by the first rung), so their losses compare. Each is scored on the corpus's fixed
eval split (memlm.data: the embedded corpus' last 20% of characters, a user corpus' last 10%:
held-out text none of the runs trained on), over SWEEP_EVAL_BATCHES batches at its end. The
recommendation is the rung of lowest held-out loss, with the plan it trained under; a plot
shows loss against parameters and against training tokens.

A fixed split rather than k-fold: each fold would retrain every rung, k times the time, for a
budget of minutes that is better spent training.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError
from memlm.memory.estimate import param_shapes
from memlm.memory.measure import format_bytes, parse_size
from memlm.memory.plan import Plan, plan_training, render_plan

# (n_embd, n_layer) from small to large: width and depth grow together, heads of 64 (32 below 128).
LADDER = [(64, 2), (128, 2), (128, 4), (192, 4), (256, 4), (256, 6), (384, 6), (512, 8), (768, 12), (1024, 16)]
SWEEP_EVAL_BATCHES = 20
RESULTS_FILE = "sweep.json"
PLOT_FILE = "sweep.png"


def parse_duration(text: str | float) -> float:
    """Seconds in "90s", "10m", "1.5h" or a bare number of seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([\d.]+)\s*(s|m|min|h)?\s*", str(text))
    if not m:
        raise MemlmError(f"cannot read the time '{text}'", "write it as 90s, 10m or 1.5h")
    value = float(m.group(1)) * {"s": 1, None: 1, "m": 60, "min": 60, "h": 3600}[m.group(2)]
    if value <= 0:
        raise MemlmError(f"the time must be positive, got '{text}'")
    return value


def shape(base: ModelConfig, width: int, depth: int) -> ModelConfig:
    """`base` scaled to n_embd = width, n_layer = depth (the MLP 3x wide, as tiny's)."""
    head = 64 if width >= 128 else 32
    n_head = max(1, width // head)
    n_kv = n_head // 2 if base.n_kv_heads < base.n_head and n_head % 2 == 0 else n_head
    return dataclasses.replace(base, name=f"d{width}-l{depth}", n_embd=width, n_layer=depth, n_head=n_head,
                               n_kv_heads=n_kv, head_dim=width // n_head, ffn_hidden=3 * width)


@dataclass
class Rung:
    name: str
    params: int
    n_embd: int
    n_layer: int
    plan: Plan = field(repr=False)
    eval_loss: float | None = None
    train_tokens: int = 0
    steps: int = 0
    tokens_per_s: float = 0.0
    peak_bytes: int = 0

    def to_dict(self) -> dict:
        return {"name": self.name, "params": self.params, "n_embd": self.n_embd, "n_layer": self.n_layer,
                "eval_loss": self.eval_loss, "train_tokens": self.train_tokens, "steps": self.steps,
                "tokens_per_s": self.tokens_per_s, "peak_bytes": self.peak_bytes,
                "predicted_peak_bytes": self.plan.predicted_peak, "savers": self.plan.tradeoffs}


def ladder(base: ModelConfig, train_cfg: TrainConfig, budget: int, rungs: int) -> list[Rung]:
    """The shapes of LADDER whose training the planner fits in `budget`, at most `rungs` of them
    spread from the smallest to the largest that fits."""
    fitting = []
    for width, depth in LADDER:
        config = shape(base, width, depth)
        plan = plan_training(config, train_cfg, budget)
        if not plan.feasible:
            break  # the ladder only grows: nothing after this fits either
        fitting.append(Rung(config.name, sum(s.numel for s in param_shapes(config)), width, depth, plan))
    if not fitting:
        smallest = plan_training(shape(base, *LADDER[0]), train_cfg, budget)
        raise MemlmError(f"not even the smallest model of the ladder trains in {format_bytes(budget)}",
                         f"raise --budget to at least {format_bytes(smallest.min_budget or 0)}")
    if len(fitting) <= rungs:
        return fitting
    picks = sorted({round(i * (len(fitting) - 1) / (rungs - 1)) for i in range(rungs)}) if rungs > 1 else [len(fitting) - 1]
    return [fitting[i] for i in picks]


@dataclass
class SweepResult:
    rungs: list[Rung]
    best: Rung
    budget_bytes: int
    seconds: float
    out_dir: Path
    plot: Path | None

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget_bytes, "seconds": self.seconds, "best": self.best.name,
                "rungs": [r.to_dict() for r in self.rungs]}


def sweep(base: ModelConfig, train_cfg: TrainConfig, budget: str | int, seconds: float, out_dir: str | Path,
          rungs: int = 4, console: Console | None = None) -> SweepResult:
    """Train the ladder for `seconds` in all and recommend the size of lowest held-out loss."""
    from memlm.train.loop import train

    budget_bytes, out = parse_size(budget), Path(out_dir)
    say = console.print if console is not None else (lambda *a, **k: None)
    if train_cfg.tokenizer is None:  # planned with the vocabulary the first rung's BPE will have
        base = dataclasses.replace(base, vocab_size=train_cfg.vocab_size)
    chosen = ladder(base, train_cfg, budget_bytes, rungs)
    share = seconds / len(chosen)
    say(f"sweep: {len(chosen)} sizes that fit {format_bytes(budget_bytes)} "
        f"({', '.join(f'{r.name} {r.params / 1e6:.2f}M' for r in chosen)}), {share:.0f} s each")
    tokenizer = train_cfg.tokenizer
    for rung in chosen:
        # The savers the plan chose, applied as settings: the runs share this process, whose
        # resident memory after one run is no baseline for the next one's guard.
        run_cfg = dataclasses.replace(
            rung.plan.train_config, out_dir=str(out / rung.name), tokenizer=tokenizer, max_time_s=share,
            steps=max(train_cfg.steps, 10**6), memory_budget=None, eval_every=0, save_every=0,
            eval_batches=SWEEP_EVAL_BATCHES)
        say(f"[bold]{rung.name}[/] ({rung.params:,} parameters) for {share:.0f} s")
        result = train(run_cfg, shape(base, rung.n_embd, rung.n_layer), console=console)
        tokenizer = tokenizer or str(out / rung.name)  # the first rung's BPE for all: the same ids
        rung.eval_loss = result.eval_losses[-1][1]
        rung.steps, rung.tokens_per_s, rung.peak_bytes = result.final_step, result.tokens_per_s, result.peak_bytes
        rung.train_tokens = _tokens_seen(out / rung.name)
    best = min(chosen, key=lambda r: r.eval_loss)
    result = SweepResult(chosen, best, budget_bytes, seconds, out, None)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    result.plot = plot_sweep(chosen, best, out / PLOT_FILE)
    return result


def _tokens_seen(run: Path) -> int:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return max((m.get("tokens_seen", 0) for m in lines), default=0)


def plot_sweep(rungs: list[Rung], best: Rung, path: Path) -> Path:
    """Held-out loss against parameters and against training tokens, the best size marked."""
    from memlm.errors import require_extra

    matplotlib = require_extra("matplotlib", "plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "params", "parameters"), (axes[1], "train_tokens", "training tokens")):
        xs = [getattr(r, key) for r in rungs]
        ax.plot(xs, [r.eval_loss for r in rungs], "o-")
        for r, x in zip(rungs, xs):
            ax.annotate(r.name, (x, r.eval_loss), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.plot([getattr(best, key)], [best.eval_loss], "r*", markersize=14, label=f"best: {best.name}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks overlap
        ax.set_xlabel(label)
        ax.set_ylabel("held-out loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("memlm sweep: held-out loss by model size, equal time each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def describe(result: SweepResult) -> str:
    lines = ["| size | parameters | steps | train tokens | tokens/s | held-out loss | peak |", "|---|---|---|---|---|---|---|"]
    for r in result.rungs:
        mark = " (best)" if r is result.best else ""
        lines.append(f"| {r.name}{mark} | {r.params:,} | {r.steps:,} | {r.train_tokens:,} | {r.tokens_per_s:,.0f} | "
                     f"{r.eval_loss:.4f} | {format_bytes(r.peak_bytes)} |")
    return "\n".join(lines)


def recommendation(result: SweepResult):
    """The best size and the plan it trained under (memlm.memory.plan.render_plan)."""
    return render_plan(result.best.plan)
