"""The training loop: one explicit function, in the spirit of nanoGPT's train.py.

A run lives in one folder (`train_cfg.out_dir`):

    config.toml            the resolved [model] and [train] configs
    tokenizer.json         the tokenizer (+ tokenizer_config.json)
    metrics.jsonl          one JSON object per log line (train loss) and per eval (eval_loss)
    checkpoints/step-N/    see memlm.train.checkpoint
    cache/                 the tokenized corpus

Optimizer steps are numbered from 1: `step-000006` holds the state after 6 updates. Step `s`
trains on micro-batches `(s - 1) * grad_accum + k` of `Batches`, which are a pure function of
(seed, index), so a resumed run sees exactly the data an uninterrupted one would have seen, and
(on CPU, fp32) produces exactly the same losses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from memlm.config import ModelConfig, TrainConfig, to_toml
from memlm.errors import MemlmError
from memlm.memory.measure import PeakMemory, format_bytes
from memlm.train.checkpoint import (
    config_differences,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from memlm.train.optim import build_optimizer, lr_at, set_lr

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CACHE_DIR = "cache"
# Train-config fields that decide which data each step sees: a resume must not change them.
_TRAJECTORY_FIELDS = ("corpus", "seed", "micro_batch", "grad_accum", "seq_len")


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    last_loss: float
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss)
    tokens_per_s: float = 0.0  # training throughput of this session (eval and saving excluded)
    peak_bytes: int = 0  # peak memory of this session (process RSS on CPU, allocated on CUDA)


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on inputs `x` and targets `y` (both (B, T)).

    Under "bf16-autocast" the matmuls run in bfloat16 while the weights stay fp32; the
    cross-entropy itself is computed in fp32 (autocast's rule for it).
    """
    with _autocast(cfg, x.device):
        logits = model(x)  # (B, T, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, tokens: np.ndarray, cfg: TrainConfig, seq_len: int, device: torch.device
) -> float:
    """Mean loss over `cfg.eval_batches` fixed batches spread over the eval stream."""
    from memlm.data import eval_batches

    was_training = model.training
    model.eval()
    losses = []
    for x, y in eval_batches(tokens, cfg.micro_batch, seq_len, cfg.eval_batches):
        losses.append(compute_loss(model, x.to(device), y.to(device), cfg).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def resolve_device(name: str) -> torch.device:
    """"auto" -> cuda when available, else cpu; anything else must be a device torch knows."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise MemlmError(f"unknown device '{name}'", "use 'auto', 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MemlmError(f"device '{name}' asked for, but no CUDA GPU is available", "use device = 'cpu' or 'auto'")
    return device


def _reject_unimplemented(cfg: TrainConfig) -> None:
    """Settings the config accepts but this loop does not do yet: fail rather than ignore them."""
    todo = {
        "precision = 'bf16'": cfg.precision == "bf16",
        "fused_backward": cfg.fused_backward,
        "loss_chunk": cfg.loss_chunk > 0,
        "seq_len_warmup": bool(cfg.seq_len_warmup),
        "memory_budget": cfg.memory_budget is not None,
        "nproc > 1": cfg.nproc > 1,
    }
    for what, asked in todo.items():
        if asked:
            raise MemlmError(f"{what} is not implemented yet", "leave it at its default for now")


def _load_pretrained(name_or_path: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer or None) from memlm.loading, for fine-tuning."""
    from memlm.loading import load_model  # the loader module depends on much of memlm; import late

    loaded = load_model(name_or_path)
    if isinstance(loaded, tuple):
        return loaded[0], (loaded[1] if len(loaded) > 1 else None)
    return loaded, None


def _filter_metrics(path: Path, last_step: int) -> None:
    """Drop log lines past `last_step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def train(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    resume: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a model as `train_cfg` says, in the run folder `train_cfg.out_dir`.

    `resume`: continue from the run's latest checkpoint (start fresh when it has none).
    `stop_after`: end (eval and save as at the end) after this step, without changing the
    schedule, which still runs to `train_cfg.steps`: for tests and time-limited jobs.
    """
    from memlm.data import Batches, read_corpus, tokenize_corpus
    from memlm.model import Decoder
    from memlm.tokenizer import Tokenizer, train_bpe

    cfg = train_cfg
    cfg.validate()
    _reject_unimplemented(cfg)
    run_dir = Path(cfg.out_dir)
    say = console.print if console is not None else (lambda *a, **k: None)

    # ---- everything that can fail on user input is checked before the run folder is written
    # (only the token cache goes into it earlier)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and not resume:
        raise MemlmError(
            f"run folder {run_dir} already has checkpoints",
            "pass --resume to continue it or choose another --out",
        )
    if resume and ckpt is None:
        say(f"[yellow]nothing to resume in {run_dir}: starting a new run[/]")
    saved_state = read_trainer_state(ckpt) if ckpt is not None else None
    device = resolve_device(cfg.device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    pretrained: nn.Module | None = None
    if saved_state is not None:
        tokenizer = Tokenizer.load(run_dir)
        if cfg.init_from:  # the checkpoint's weights win; its config is the model's config
            model_cfg = ModelConfig.from_dict(saved_state["model_config"])
    elif cfg.init_from:
        pretrained, tokenizer = _load_pretrained(cfg.init_from)
        if cfg.tokenizer:
            tokenizer = Tokenizer.load(cfg.tokenizer)
        if tokenizer is None:
            raise MemlmError(f"{cfg.init_from} came without a tokenizer", "pass --tokenizer with the model's tokenizer")
        model_cfg = dataclasses.replace(pretrained.config, dropout=model_cfg.dropout)
    elif cfg.tokenizer:
        tokenizer = Tokenizer.load(cfg.tokenizer)
    else:
        say(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {cfg.corpus}")
        tokenizer = train_bpe(read_corpus(cfg.corpus, "train"), cfg.vocab_size)
    if pretrained is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif tokenizer.vocab_size > model_cfg.vocab_size:
        raise MemlmError(
            f"tokenizer has {tokenizer.vocab_size} ids but {cfg.init_from} only {model_cfg.vocab_size} embeddings",
            "fine-tune with the model's own tokenizer",
        )
    if saved_state is not None:
        diffs = config_differences(saved_state["model_config"], model_cfg.to_dict(), ignore=("name",))
        if diffs:
            raise MemlmError(
                f"the model config differs from the one {run_dir} was trained with ({'; '.join(diffs)})",
                "resume with the run's own config.toml",
            )

    seq_len = cfg.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise MemlmError(
            f"seq_len {seq_len} is longer than the model's block_size {model_cfg.block_size}",
            "lower --seq-len or build the model with a larger block_size",
        )
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    if saved_state is not None and "train_config" in saved_state:
        saved_train = {k: v for k, v in saved_state["train_config"].items() if k in _TRAJECTORY_FIELDS}
        changed = config_differences(saved_train, {k: getattr(cfg, k) for k in _TRAJECTORY_FIELDS})
        if changed:
            raise MemlmError(
                f"cannot resume {run_dir} with a different data setup ({'; '.join(changed)})",
                "resume with the run's own config.toml",
            )

    cache = run_dir / CACHE_DIR
    train_tokens = tokenize_corpus(cfg.corpus, tokenizer, "train", cache).tokens()
    eval_tokens = tokenize_corpus(cfg.corpus, tokenizer, "eval", cache).tokens()
    for split, tokens in (("train", train_tokens), ("eval", eval_tokens)):
        if len(tokens) < seq_len + 1:
            raise MemlmError(
                f"corpus {cfg.corpus} is too small: its {split} split has {len(tokens)} tokens, "
                f"one sequence needs {seq_len + 1}",
                "use a bigger corpus or a shorter --seq-len",
            )
    batches = Batches(train_tokens, cfg.micro_batch, seq_len, cfg.seed)

    # ---- model and optimizer (built before the run folder is written: they can still fail)
    torch.manual_seed(cfg.seed)
    model = Decoder(model_cfg)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
        del pretrained
    model.to(device)
    model.checkpoint_every = cfg.activation_checkpointing
    optimizer = build_optimizer(model, cfg)

    step, tokens_seen, wall_time, last_loss = 0, 0, 0.0, float("nan")
    eval_losses: list[tuple[int, float]] = []
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, restore_rng=True)
        step = state["step"]
        tokens_seen = state.get("tokens_seen", 0)
        wall_time = state.get("wall_time", 0.0)
        last_loss = state.get("last_loss", float("nan"))
        say(f"resuming {run_dir} from {ckpt.name}")
    model.train()

    # ---- the run folder (only now that everything above has worked)
    run_dir.mkdir(parents=True, exist_ok=True)
    if saved_state is None:
        tokenizer.save(run_dir)
    (run_dir / CONFIG_FILE).write_text(
        to_toml({"model": model_cfg.to_dict(), "train": cfg.to_dict()}), encoding="utf-8"
    )
    metrics_path = run_dir / METRICS_FILE
    if saved_state is None:
        metrics_path.write_text("", encoding="utf-8")
    else:
        _filter_metrics(metrics_path, saved_state["step"])

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    tokens_per_step = cfg.micro_batch * cfg.grad_accum * seq_len
    say(
        f"model: {model.num_params():,} parameters | device {device} | {cfg.precision} | "
        f"{len(train_tokens):,} train tokens | {tokens_per_step:,} tokens per step"
    )

    def log(record: dict[str, Any]) -> None:
        with metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def trainer_state(at_step: int) -> dict[str, Any]:
        return {
            "model_config": model_cfg.to_dict(),
            "train_config": cfg.to_dict(),
            "tokens_seen": tokens_seen,
            "data_position": at_step + 1,  # the next step to train; Batches needs nothing else
            "wall_time": wall_time,
            "last_loss": last_loss,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
        }

    session_tokens, session_time = 0, 0.0
    window_tokens, window_time = 0, 0.0  # since the last log line
    progress = _progress(console)
    task = progress.add_task("train", total=cfg.steps, completed=step, loss=last_loss, tps=0.0, mem="-")
    with PeakMemory(device) as pm, progress:
        while step < end_step:
            step += 1
            t0 = time.perf_counter()
            set_lr(optimizer, lr_at(step, cfg))
            loss_sum = 0.0
            for k in range(cfg.grad_accum):
                x, y = batches.get((step - 1) * cfg.grad_accum + k)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                loss = compute_loss(model, x, y, cfg) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            grad_norm = None
            if cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0

            last_loss = loss_sum
            if not math.isfinite(last_loss):
                raise MemlmError(
                    f"the loss became {last_loss} at step {step}",
                    "lower --lr, keep grad_clip on, or use fp32 precision",
                )
            tokens_seen += tokens_per_step
            session_tokens += tokens_per_step
            session_time += dt
            window_tokens += tokens_per_step
            window_time += dt
            wall_time += dt
            peak = pm.peak_so_far()
            progress.update(
                task, completed=step, loss=last_loss, tps=window_tokens / max(window_time, 1e-9), mem=format_bytes(peak)
            )

            if step % max(cfg.log_every, 1) == 0 or step == end_step:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(window_time, 1e-9),
                    "peak_bytes": peak,
                    "tokens_seen": tokens_seen,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log(record)
                window_tokens, window_time = 0, 0.0

            if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == end_step:
                eval_loss = evaluate(model, eval_tokens, cfg, seq_len, device)
                eval_losses.append((step, eval_loss))
                log({"step": step, "eval_loss": eval_loss})
                say(f"step {step}: eval loss {eval_loss:.4f}")

            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == end_step:
                save_checkpoint(run_dir, step, model, optimizer, trainer_state(step), cfg.keep_last)

    peak_bytes = pm.peak_bytes
    say(
        f"done: step {step}, loss {last_loss:.4f}, "
        f"{session_tokens / max(session_time, 1e-9):,.0f} tokens/s, peak memory {format_bytes(peak_bytes)}"
    )
    return TrainResult(
        run_dir=run_dir,
        final_step=step,
        last_loss=last_loss,
        eval_losses=eval_losses,
        tokens_per_s=session_tokens / session_time if session_time > 0 else 0.0,
        peak_bytes=peak_bytes,
    )


def _progress(console: Console | None):
    """A progress bar: step/total, loss, tokens/s, peak memory, ETA (silent without a console)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TextColumn("mem {task.fields[mem]}"),
        TimeRemainingColumn(),
        console=console,
        disable=console is None,
    )
