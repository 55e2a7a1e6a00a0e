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
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from memlm.config import ModelConfig, TrainConfig, to_toml
from memlm.errors import Interrupted, MemlmError, io_error
from memlm.integrity import write_text_atomic
from memlm.memory.estimate import estimate_training
from memlm.memory.guard import BudgetExceeded, MemoryGuard, expected_from
from memlm.memory.measure import PeakMemory, format_bytes, process_peak_rss_bytes, return_free_heap
from memlm.train.checkpoint import (
    CheckpointDamaged,
    config_differences,
    intact_checkpoint,
    latest_checkpoint,
    read_trainer_state,
    refuse_to_overwrite,
)
from memlm.train.distributed import local_state_bytes
from memlm.train.distributed import setup as setup_distributed
from memlm.train.loss import IGNORE_INDEX, chunked_cross_entropy, linear_cross_entropy
from memlm.train.optim import build_optimizer, clipped_step, lr_at, set_lr
from memlm.train.progressive import step_shape

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
CACHE_DIR = "cache"
BAR_INTERVAL_S = 0.25  # the progress bar is redrawn after a step at most this often
# Train-config fields that decide which data each step sees: a resume must not change them.
_TRAJECTORY_FIELDS = (
    "corpus", "task", "seed", "micro_batch", "grad_accum", "seq_len",
    "seq_len_warmup", "seq_len_warmup_steps", "batch_ramp", "batch_ramp_steps",
    "clean_control", "clean_unicode", "clean_lowercase", "clean_whitespace", "clean_dedup", "clean_dedup_unit",
)


@dataclass
class TrainResult:
    run_dir: Path
    final_step: int
    last_loss: float
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean eval loss)
    tokens_per_s: float = 0.0  # training throughput of this session (eval and saving excluded)
    peak_bytes: int = 0  # peak memory of this session (process RSS on CPU, allocated on CUDA; max over ranks)
    state_bytes: int = 0  # weights + gradients + optimizer states one process holds (after its first step)
    predicted_peak_bytes: int = 0  # the prediction printed at the start (the plan's, under a budget)


def compute_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 teacher: Any | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` on inputs `x` and targets `y` (both (B, T)).

    Under "bf16-autocast" the matmuls run in bfloat16 while the weights stay fp32; the
    cross-entropy itself is computed in fp32 (autocast's rule for it). With `cfg.loss_chunk`
    the head and the loss run `loss_chunk` tokens at a time (memlm.train.loss): same value and
    gradients, without the (tokens x vocab) logits. Without it, in fp32, the head and the loss
    run over the full logits in one buffer (memlm.train.loss.linear_cross_entropy: the same
    value, gradients and saved tensors as F.cross_entropy, a third of its memory at the peak).

    With a `teacher` (memlm.train.distill.Teacher) the loss is its distillation loss instead,
    which needs the student's full logits (no chunking).
    """
    with _autocast(cfg, x.device):
        if teacher is not None:
            return teacher.loss(model, x, y)
        head = getattr(model, "lm_head", None)
        # The head's own paths need its weight matrix; a head of another kind (quantized,
        # LoRA-wrapped) computes its own logits, so it takes the plain path.
        if type(head) is nn.Linear and head.bias is None and hasattr(model, "hidden_states"):
            if cfg.loss_chunk > 0:
                h, t = scored_rows(model.hidden_states(x), y)
                return chunked_cross_entropy(h, head.weight, t, cfg.loss_chunk)
            # fp32 weights as plain tensors (FSDP's are sharded DTensors: they take the plain path)
            if cfg.precision == "fp32" and head.weight.dtype == torch.float32 and type(head.weight.data) is torch.Tensor:
                h, t = scored_rows(model.hidden_states(x), y)
                return linear_cross_entropy(h, head.weight, t)
        logits = model(x)  # (B, T, vocab)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))


def scored_rows(h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states (B, T, d) and targets (B, T) of the positions the loss scores, as (n, d)
    and (n,): the head and the loss need not run where the target is IGNORE_INDEX (a fine-tune's
    prompt and padding, most of its tokens). The same mean loss and gradients."""
    h, y = h.reshape(-1, h.size(-1)), y.reshape(-1)
    keep = y != IGNORE_INDEX
    if bool(keep.all()):
        return h, y
    rows = keep.nonzero().squeeze(1)
    return h.index_select(0, rows), y.index_select(0, rows)


def gradients_in_one_buffer(params: list[nn.Parameter]) -> None:
    """Give every parameter a zero gradient, views of one buffer (one per dtype), before backward.

    Backward otherwise allocates each gradient as it reaches its parameter and keeps it: an
    adapter's gradient is a few KiB, made between a block's temporaries of 1-4 MiB, and those
    small kept blocks split the holes the temporaries leave in glibc's heap, so the next block's
    backward cannot reuse them. Fine-tuning SmolLM2 with LoRA on every linear layer and every
    block recomputed peaked at 1,338 MiB so, 1,128 MiB with this; the same loss, the same speed.
    Backward adds into these gradients in place; zero_grad(set_to_none=True) frees the buffer.
    """
    for dtype in {p.dtype for p in params}:
        same = [p for p in params if p.dtype == dtype]
        flat = torch.zeros(sum(p.numel() for p in same), dtype=dtype, device=same[0].device)
        at = 0
        for p in same:
            p.grad = flat[at:at + p.numel()].view_as(p)
            at += p.numel()


def apply_train_settings(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Set up a model for `cfg` before its optimizer is built: bf16 weights for precision
    "bf16", activation checkpointing every `cfg.activation_checkpointing` blocks."""
    if cfg.precision == "bf16":
        # Pure bf16: the weights themselves (the optimizer keeps fp32 math; see optim.py).
        # Buffers (RoPE and position tables) stay fp32: they are not trained.
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    model.checkpoint_every = cfg.activation_checkpointing
    return model


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16-autocast":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Any, torch.Tensor]], cfg: TrainConfig, device: torch.device,
    rank: int = 0, world_size: int = 1,
) -> float:
    """Mean loss over fixed eval batches (TrainingData.eval_batches).

    With several processes each scores its share of every batch's rows (the caller averages).
    """
    was_training = model.training
    model.eval()
    losses = []
    for x, y in batches:
        b = x.size(0) // world_size
        x, y = x[rank * b : (rank + 1) * b], y[rank * b : (rank + 1) * b]
        losses.append(compute_loss(model, x.to(device), y.to(device), cfg).item())
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainingData:
    """What the loop draws batches from: token streams (an LM) or pairs (seq2seq), behind the
    same two calls, each batch a pure function of its index."""

    batches: Callable[[int], Any]  # micro-batch size -> an object with .get(index, rank, world_size, seq_len)
    eval_batches: Callable[[], Iterable[tuple[Any, torch.Tensor]]]  # the fixed eval batches
    size: str  # for the start-up line: "123,456 train tokens"
    cleaning_report: dict | None = None


def training_data(cfg: TrainConfig, model_cfg: ModelConfig, tokenizer, seq_len: int, cache: Path, cleaning,
                  main_first) -> TrainingData:
    """The train and eval splits of cfg.corpus, tokenized (an LM's in the token cache, written by
    rank 0 first), checked to hold at least one batch."""
    from memlm.data import Batches, eval_batches, tokenize_corpus

    if cfg.task == "seq2seq":
        from memlm.pairs import PairBatches, pair_eval_batches, read_pairs, tokenize_pairs

        ids = {split: tokenize_pairs(read_pairs(cfg.corpus, split, cleaning), tokenizer) for split in ("train", "eval")}
        marks = (model_cfg.start_id, tokenizer.eos_id)
        return TrainingData(lambda b: PairBatches(ids["train"], b, seq_len, cfg.seed, *marks),
                            lambda: pair_eval_batches(ids["eval"], cfg.micro_batch, seq_len, cfg.eval_batches, *marks),
                            f"{len(ids['train']):,} train pairs")
    with main_first():  # rank 0 writes the token cache, the others then read it
        train_file = tokenize_corpus(cfg.corpus, tokenizer, "train", cache, cleaning)
        tokens = {"train": train_file.tokens(), "eval": tokenize_corpus(cfg.corpus, tokenizer, "eval", cache,
                                                                        cleaning).tokens()}
    for split, stream in tokens.items():
        if len(stream) < seq_len + 1:
            raise MemlmError(
                f"corpus {cfg.corpus} is too small: its {split} split has {len(stream)} tokens, "
                f"one sequence needs {seq_len + 1}",
                "use a bigger corpus or a shorter --seq-len",
            )
    return TrainingData(lambda b: Batches(tokens["train"], b, seq_len, cfg.seed),
                        lambda: eval_batches(tokens["eval"], cfg.micro_batch, seq_len, cfg.eval_batches),
                        f"{len(tokens['train']):,} train tokens", train_file.meta.get("cleaning_report"))


def check_task(cfg: TrainConfig, model_cfg: ModelConfig) -> None:
    """An encoder-decoder learns pairs; every other kind learns text."""
    if (model_cfg.kind == "encdec") != (cfg.task == "seq2seq"):
        raise MemlmError(
            f"a {model_cfg.kind} model cannot train on the {cfg.task} task",
            "an encoder-decoder trains with --task seq2seq (pairs); decoder, rnn and conv models with --task lm"
            if model_cfg.kind != "encdec" else "train it with --task seq2seq",
        )


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
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a crash
    write_text_atomic(path, "".join(k + "\n" for k in kept))  # a kill here must not lose the log


def train(
    train_cfg: TrainConfig,
    model_cfg: ModelConfig,
    resume: bool = False,
    console: Console | None = None,
    stop_after: int | None = None,
    teacher: Any | None = None,
    tuning: Any | None = None,
) -> TrainResult:
    """Train a model as `train_cfg` says, in the run folder `train_cfg.out_dir`.

    `resume`: continue from the run's latest checkpoint (start fresh when it has none).
    `stop_after`: end (eval and save as at the end) after this step, without changing the
    schedule, which still runs to `train_cfg.steps`: for tests and time-limited jobs.
    `teacher`: distill from it (memlm.train.distill); evaluation stays plain cross-entropy.
    `tuning`: fine-tune (memlm.finetune.FineTune): it supplies the model and its tokenizer, the
    batches, the evaluation, the memory plan, an `objective` (None: next-token cross-entropy),
    the run files beside config.toml, and the part of the model a checkpoint holds.
    """
    from memlm.cleaning import CleanOptions, CleanReport
    from memlm.model import build_model
    from memlm.tokenizer import Tokenizer, train_bpe

    cfg = train_cfg
    cfg.validate()
    cleaning = CleanOptions.of(cfg)
    # Under torchrun: join the process group (otherwise one process, and ctx does nothing).
    ctx = setup_distributed(cfg, resolve_device(cfg.device))
    cfg = dataclasses.replace(cfg, nproc=ctx.world_size)  # config.toml records the world size used
    if not ctx.is_main:
        console = None  # rank 0 alone prints
    run_dir = Path(cfg.out_dir)
    say = console.print if console is not None else (lambda *a, **k: None)

    # ---- everything that can fail on user input is checked before the run folder is written
    # (only the token cache goes into it earlier)
    ckpt = refuse_to_overwrite(run_dir, resume)
    if resume and ckpt is None:
        say(f"[yellow]nothing to resume in {run_dir}: starting a new run[/]")
    if ckpt is not None:
        def damaged(e: CheckpointDamaged) -> None:
            say(f"{e.message}: moved it aside ({e.path.name}.damaged)", style="yellow", markup=False)

        with ctx.main_first():  # rank 0 checks (and moves damaged ones aside) before the others look
            ckpt = intact_checkpoint(run_dir, on_damaged=damaged)
    saved_state = read_trainer_state(ckpt) if ckpt is not None else None
    if saved_state is not None and "model_config" not in saved_state:
        raise MemlmError(f"{ckpt} has no model_config in its trainer_state.json",
                         "it was not written by memlm train; start a new run")
    device = ctx.device  # on CUDA, the GPU of this rank
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    pretrained: nn.Module | None = None
    if tuning is not None:  # a pretrained base, built by the fine-tune (its tokenizer too)
        tokenizer, model_cfg = tuning.tokenizer, tuning.model_config
    elif saved_state is not None:
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
        tokenizer = None  # trained below, once the plan (if any) has said that the run fits
    if pretrained is None and tuning is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size if tokenizer else cfg.vocab_size)
    elif pretrained is not None and tokenizer.vocab_size > model_cfg.vocab_size:
        raise MemlmError(
            f"tokenizer has {tokenizer.vocab_size} ids but {cfg.init_from} only {model_cfg.vocab_size} embeddings",
            "fine-tune with the model's own tokenizer",
        )
    if saved_state is not None:
        # through ModelConfig: a run saved before a field existed has that field's default
        saved_model = ModelConfig.from_dict(saved_state["model_config"]).to_dict()
        diffs = config_differences(saved_model, model_cfg.to_dict(), ignore=("name",))
        if diffs:
            raise MemlmError(
                f"the model config differs from the one {run_dir} was trained with ({'; '.join(diffs)})",
                "resume with the run's own config.toml",
            )

    check_task(cfg, model_cfg)
    seq_len = cfg.seq_len or model_cfg.block_size
    if seq_len > model_cfg.block_size:
        raise MemlmError(
            f"seq_len {seq_len} is longer than the model's block_size {model_cfg.block_size}",
            "lower --seq-len or build the model with a larger block_size",
        )
    cfg = dataclasses.replace(cfg, seq_len=seq_len)
    guard: MemoryGuard | None = None
    if cfg.memory_budget is not None:  # the planner picks the savers, keeping the global batch
        from memlm.memory.plan import fit_training

        cfg, plan = (tuning.fit(cfg, device.type) if tuning is not None else
                     fit_training(model_cfg, cfg, device.type, teacher_bytes=_teacher_bytes(teacher)))
        breakdown = plan.breakdown
        say(f"memory budget {format_bytes(plan.budget_bytes)}: predicted peak {format_bytes(plan.predicted_peak)}; "
            + ("; ".join(plan.tradeoffs) or "no saver needed"))
        if device.type == "cpu":  # the guard watches resident memory; CUDA budgets are the allocator's
            guard = MemoryGuard(plan.budget_bytes, expected_from(breakdown), "step")
    elif tuning is not None:
        breakdown = tuning.estimate(cfg, device.type)
        say(f"predicted peak memory {format_bytes(breakdown.total)} (memlm plan --task finetune shows the terms)")
    else:
        breakdown = estimate_training(model_cfg, cfg, device.type, world_size=ctx.world_size,
                                      teacher_bytes=_teacher_bytes(teacher))
        say(f"predicted peak memory {format_bytes(breakdown.total)} (per process; memlm plan shows the terms)")
    cfg.validate()  # now that seq_len is known, warmup lengths are checked against it
    if tokenizer is None:
        say(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {cfg.corpus}")
        tokenizer = ctx.from_main(lambda: train_bpe(_tokenizer_texts(cfg, cleaning), cfg.vocab_size))
        # a small corpus can give fewer merges than asked: the model (never larger than planned) follows
        model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
    if saved_state is not None and "train_config" in saved_state:
        # Only fields the checkpoint has: runs saved before a field existed still resume.
        saved_train = {k: v for k, v in saved_state["train_config"].items() if k in _TRAJECTORY_FIELDS}
        changed = config_differences(saved_train, {k: getattr(cfg, k) for k in saved_train})
        if changed:
            raise MemlmError(
                f"cannot resume {run_dir} with a different data setup ({'; '.join(changed)})",
                "resume with the run's own config.toml",
            )

    data = None  # a fine-tune brings its own examples (tuning.batch, tuning.evaluate)
    if tuning is None:
        if model_cfg.kind == "encdec":  # the decoder starts from EOS, as BART's
            if tokenizer.eos_id is None:
                raise MemlmError("an encoder-decoder needs a tokenizer with an EOS token",
                                 "train one here (no --tokenizer)")
            model_cfg = dataclasses.replace(model_cfg, start_id=tokenizer.eos_id)
        data = training_data(cfg, model_cfg, tokenizer, seq_len, run_dir / CACHE_DIR, cleaning, ctx.main_first)
        if data.cleaning_report:
            say("cleaning (train split): " + CleanReport(**data.cleaning_report).summary())
    return_free_heap()  # the tokenizer's and the tokenization's freed buffers go back to the system
    if guard is not None:
        guard.mark("start-up")
    # One Batches per micro-batch size of the batch ramp: each draws its rows from (seed, index),
    # so every micro-batch is a pure function of its index and the step's shape.
    batches: dict[int, Any] = {}

    def micro_batch(index: int, shape) -> tuple[Any, torch.Tensor]:
        if tuning is not None:
            return tuning.batch(index, ctx.rank, ctx.world_size, shape)
        if shape.micro_batch not in batches:
            batches[shape.micro_batch] = data.batches(shape.micro_batch)
        return batches[shape.micro_batch].get(index, ctx.rank, ctx.world_size, seq_len=shape.seq_len)

    # ---- model and optimizer (built before the run folder is written: they can still fail)
    torch.manual_seed(cfg.seed)
    model = tuning.build_model() if tuning is not None else build_model(model_cfg)
    if pretrained is not None:
        model.load_state_dict(pretrained.state_dict())
        del pretrained
    model.to(device)
    apply_train_settings(model, ctx.model_settings(cfg))
    net = ctx.wrap(model)  # forward runs through net: DDP's wrapper, or model itself (FSDP shards it in place)
    optimizer = build_optimizer(model, cfg)
    saved = tuning.checkpoint_module(model) if tuning is not None else model  # what checkpoints hold
    objective = teacher if teacher is not None else getattr(tuning, "objective", None)

    step, tokens_seen, wall_time, last_loss = 0, 0, 0.0, float("nan")
    eval_losses: list[tuple[int, float]] = []
    if ckpt is not None:
        state = ctx.load_checkpoint(ckpt, saved, optimizer, verify=False)  # intact_checkpoint verified it
        step = state["step"]
        tokens_seen = state.get("tokens_seen", 0)
        wall_time = state.get("wall_time", 0.0)
        last_loss = state.get("last_loss", float("nan"))
        say(f"resuming {run_dir} from {ckpt.name}")
    model.train()

    # ---- the run folder (only now that everything above has worked)
    metrics_path = run_dir / METRICS_FILE
    if ctx.is_main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            if saved_state is None:
                tokenizer.save(run_dir)
            # whole or not at all: `--resume` reads it back
            write_text_atomic(run_dir / CONFIG_FILE, to_toml({"model": model_cfg.to_dict(), "train": cfg.to_dict()}))
            if tuning is not None:
                tuning.write_run_files(run_dir)
            if saved_state is None:
                metrics_path.write_text("", encoding="utf-8")
            else:
                _filter_metrics(metrics_path, saved_state["step"])
        except OSError as e:
            raise io_error(e, f"write the run folder {run_dir}") from e

    end_step = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    say(
        f"model: {model.num_params():,} parameters | device {device} | {cfg.precision} | "
        + (f"{data.size} | " if tuning is None else f"{tuning.data_summary} | ")
        + f"{cfg.micro_batch * cfg.grad_accum * seq_len:,} tokens per step"
        + (" (after the warmup phases)" if cfg.seq_len_warmup or cfg.batch_ramp else "")
    )

    def log(record: dict[str, Any]) -> None:
        if not ctx.is_main:
            return
        try:
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise io_error(e, f"write {metrics_path}") from e

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
    state_bytes = 0
    window_tokens, window_time = 0, 0.0  # since the last log line
    progress = _progress(console)
    task = progress.add_task("train", total=cfg.steps, completed=step, loss=last_loss, tps=0.0, mem="-")
    def peak_now() -> int:  # the whole process's peak on CPU (the budget's promise), the allocator's on CUDA
        return pm.peak_so_far() if device.type == "cuda" else process_peak_rss_bytes()

    def stop_if_asked() -> None:
        """Before a step: stop cleanly, with a checkpoint, when a signal asked for it or when the
        step would cross the budget."""
        problem = None
        if guard is not None:
            try:
                # the size of the next step in tokens: relative to the planned full shape
                guard.before_unit(step_shape(step + 1, cfg).tokens / (cfg.micro_batch * seq_len))
            except BudgetExceeded as e:
                problem = e
        # Every rank stops together: 1 for the budget, a signal's number (2, 15: above 1) for a signal.
        reason = ctx.max(stops.received or int(problem is not None))
        if not reason:
            return
        saved_at = latest_checkpoint(run_dir) if ctx.is_main else None
        if step > 0 and latest_step_saved != step:
            saved_at = ctx.save_checkpoint(run_dir, step, saved, optimizer, trainer_state(step), cfg.keep_last)
        if reason > 1:
            raise _interrupted(signal.Signals(reason), step, saved_at, run_dir)
        raise problem or BudgetExceeded("another process of this run reached its memory budget",
                                        "raise --memory-budget")

    latest_step_saved = step
    # Adapters on a frozen base (few, small parameters) in one process on a CPU: their gradients
    # are made before backward, in one buffer (see gradients_in_one_buffer)
    adapters = None
    if device.type == "cpu" and not ctx.active and not cfg.fused_backward \
            and any(not p.requires_grad for p in model.parameters()):
        adapters = [p for p in model.parameters() if p.requires_grad]
    drawn_at = 0.0  # when the progress bar was last drawn
    # CUDA: the allocator's peak. CPU: VmHWM, read as it is (PeakMemory would only add a 1 kHz
    # sampling thread, on kernels that refuse its reset, for a number the loop does not use).
    with (PeakMemory(device) if device.type == "cuda" else contextlib.nullcontext()) as pm, progress, \
            StopSignals() as stops:
        while step < end_step:
            # A step's time is all of it but evaluation and checkpoints: the guard's checks, the
            # data, forward, backward, clipping, the optimizer, the metrics and the progress bar.
            t0 = time.perf_counter()
            stop_if_asked()
            step += 1
            ctx.fault_point(step)
            set_lr(optimizer, lr_at(step, cfg))
            shape = step_shape(step, cfg)
            tokens_per_step = 0  # as run: a fine-tune's rows are padded to each batch's longest, not seq_len
            loss_sum = None  # on the device: one host sync a step, not one per micro-batch
            for k in range(cfg.grad_accum):
                x, y = micro_batch((step - 1) * cfg.grad_accum + k, shape)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                tokens_per_step += x.numel() * ctx.world_size  # every rank's share has this shape
                ctx.sync_gradients(net, now=k == cfg.grad_accum - 1)
                loss = compute_loss(net, x, y, cfg, objective)
                if ctx.active:  # each rank's mean weighted by its share of the counted targets
                    loss = loss * ctx.token_share(int((y != IGNORE_INDEX).sum()))
                loss = loss / cfg.grad_accum
                if k == 0 and adapters is not None:
                    gradients_in_one_buffer(adapters)
                loss.backward()  # with fused_backward, this also steps the optimizer
                loss_sum = loss.detach().float() if loss_sum is None else loss_sum + loss.detach().float()
            # clipped to the global norm: DDP's gradients are all-reduced, FSDP's are DTensors
            grad_norm = clipped_step(optimizer, model.parameters(), cfg.grad_clip)
            if state_bytes == 0:
                state_bytes = ctx.max(local_state_bytes(model, optimizer))
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cpu":
                # The step's freed activations and gradients go back to the system: glibc's heap
                # would keep them, and the next step's forward, whose blocks come in other sizes
                # and order, would split them into holes and grow past them (fine-tuning
                # SmolLM2 with QLoRA: +450 MiB at step 2 without this; ~70 ms a step with it).
                return_free_heap()
            if guard is not None:
                guard.after_unit()

            last_loss = ctx.mean(loss_sum.item())  # the global batch's loss: every rank saw its share
            if not math.isfinite(last_loss):
                raise MemlmError(
                    f"the loss became {last_loss} at step {step}",
                    "lower --lr, keep grad_clip on, or use fp32 precision",
                )
            peak = peak_now()
            window_tokens += tokens_per_step
            progress.update(task, completed=step, loss=last_loss, mem=format_bytes(peak),
                            tps=window_tokens / max(window_time + time.perf_counter() - t0, 1e-9))
            if time.perf_counter() - drawn_at >= BAR_INTERVAL_S or step == end_step:
                progress.refresh()  # drawn from here, at most every BAR_INTERVAL_S: no drawing thread
                drawn_at = time.perf_counter()
            dt = time.perf_counter() - t0
            tokens_seen += tokens_per_step
            session_tokens += tokens_per_step
            session_time += dt
            window_time += dt
            wall_time += dt
            if cfg.max_time_s > 0 and wall_time >= cfg.max_time_s:
                end_step = step  # the time is up: this step ends the run (logged, evaluated, saved)

            if step % max(cfg.log_every, 1) == 0 or step == end_step:
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": lr_at(step, cfg),
                    "tokens_per_s": window_tokens / max(window_time, 1e-9),
                    "peak_bytes": peak,
                    "tokens_seen": tokens_seen,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm
                log(record)
                window_tokens, window_time = 0, 0.0

            if (cfg.eval_every > 0 and step % cfg.eval_every == 0) or step == end_step:
                eval_loss = (tuning.evaluate(net, cfg, device, ctx) if tuning is not None
                             else ctx.mean(evaluate(net, data.eval_batches(), cfg, device, ctx.rank, ctx.world_size)))
                eval_losses.append((step, eval_loss))
                log({"step": step, "eval_loss": eval_loss})
                say(f"step {step}: eval loss {eval_loss:.4f}")

            if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == end_step:
                ctx.save_checkpoint(run_dir, step, saved, optimizer, trainer_state(step), cfg.keep_last)
                latest_step_saved = step

    peak_bytes = ctx.max(peak_now())
    if guard is not None:  # where the memory went, for `memlm plan` users and the accuracy bench
        log({"step": step, "memory": {"marks": guard.marks, "step_peak_extra": guard.unit_peak_extra,
                                      "state_after_steps": guard.state_rss - guard.marks.get("start-up", 0)
                                      if guard.state_rss else None,
                                      "peak": peak_bytes, "predicted": breakdown.total,
                                      "expected": dataclasses.asdict(guard.expected)}})
    say(
        f"done: step {step}, loss {last_loss:.4f}, "
        f"{session_tokens / max(session_time, 1e-9):,.0f} tokens/s"
    )
    return TrainResult(
        run_dir=run_dir,
        final_step=step,
        last_loss=last_loss,
        eval_losses=eval_losses,
        tokens_per_s=session_tokens / session_time if session_time > 0 else 0.0,
        peak_bytes=peak_bytes,
        state_bytes=state_bytes,
        predicted_peak_bytes=breakdown.total,
    )


class StopSignals:
    """SIGINT and SIGTERM while training: the first asks the loop to stop after the current step
    (it saves a checkpoint and raises `Interrupted`); a second one ends the process at once, as
    the signal does by default. Schedulers send SIGTERM before they kill a job, Ctrl-C sends
    SIGINT. Handlers can only be set from the main thread: elsewhere signals keep their default.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0  # the first signal's number, 0 before any
        self._before: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._before[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        # os.write: safe between any two bytecodes, whatever the progress bar was drawing
        os.write(2, f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
                    f"(send it again to stop at once)\n".encode())

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._before.items():
            signal.signal(signum, handler)
        self._before.clear()


def _interrupted(sig: signal.Signals, step: int, saved: Path | None, run_dir: Path) -> Interrupted:
    if step == 0:
        return Interrupted(f"{sig.name} before the first step: nothing to save", "run the command again", sig)
    where = f"checkpoint {saved}" if saved is not None else "its checkpoint"
    return Interrupted(f"{sig.name} after step {step}: {where} is saved",
                       f"memlm train --out {run_dir} --resume continues the run", sig)


def _tokenizer_texts(cfg: TrainConfig, cleaning) -> list[str]:
    """The train split's text a tokenizer is trained on (seq2seq: every source and target)."""
    if cfg.task == "seq2seq":
        from memlm.pairs import read_pairs

        return [text for pair in read_pairs(cfg.corpus, "train", cleaning) for text in pair]
    from memlm.data import read_corpus

    return read_corpus(cfg.corpus, "train", cleaning)


def _teacher_bytes(teacher: Any | None) -> int:
    """Bytes of a distillation teacher's tensors (0 without one), for the memory plan."""
    if teacher is None:
        return 0
    model = teacher.model
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())  # a tied embedding/head counted once


def _progress(console: Console | None):
    """A progress bar: step/total, loss, tokens/s, peak memory, ETA (silent without a console).

    Drawn by the loop after a step (`refresh()`), not by rich's refresh thread: ten redraws a
    second from a third thread compete with torch's threads for the cores and the GIL, and the
    bar only changes when a step ends.
    """
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
        auto_refresh=False,
    )
