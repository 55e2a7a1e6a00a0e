"""`memlm finetune`: adapt a pretrained model on the one training loop, with LoRA, QLoRA or fully.

This workflow sits above what it drives: memlm.loading reads the base (straight into int4/int8
for QLoRA), memlm.adapters wraps its layers, memlm.data_instruct (or memlm.data_classify) makes
the batches, and memlm.train.loop.train runs the steps with everything it has (checkpoints and
exact resume, the progress bar, metrics.jsonl, --memory-budget). The loop is handed a `FineTune`:
it asks it for the model, the batches, the evaluation, the plan, and the part of the model a
checkpoint holds (the adapters -- and a classification head -- only; the frozen base is read
again from its source on resume).

A run folder is an ordinary memlm run plus
    finetune.json   what was fine-tuned how (base, data, LoRA settings, base format, task)
    adapter/        the adapters in the Hugging Face PEFT layout (memlm.adapters.peft), when LoRA
A full fine-tune's checkpoints hold the whole model, so its folder loads like any run.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from memlm.adapters.lora import DEFAULT_TARGETS, apply_lora, parse_targets, target_names
from memlm.adapters.peft import save_adapter
from memlm.config import TrainConfig
from memlm.errors import MemlmError
from memlm.integrity import read_json_object

FINETUNE_FILE = "finetune.json"
ADAPTER_DIR = "adapter"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_SEQ_LEN = 512
BASE_FORMATS = (None, "int8", "int4")
PRESET_VOCAB = 4096  # the BPE a model trained from scratch (a preset) gets, from the task's training text


@dataclass
class FinetuneConfig:
    """What is fine-tuned, and how (saved as finetune.json in the run folder)."""

    model: str = DEFAULT_MODEL  # a known name or a path
    data: str = "default"  # "default": the embedded set of the task; or a .jsonl file
    task: str = "lm"  # "lm" (text / chat) | "classify"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(DEFAULT_TARGETS)  # or "all-linear"
    quantize_base: str | None = None  # None: the base as stored (GGUF: dequantized to fp32); int8 | int4
    full: bool = False  # train every weight instead of adapters
    pooling: str = "last"  # classify: "last" real token or "mean" over the real tokens
    labels: list[str] = field(default_factory=list)  # classify: the classes (filled from the data)

    def validate(self) -> None:
        if self.task not in ("lm", "classify"):
            raise MemlmError(f"unknown fine-tuning task {self.task!r}", "use --task lm or --task classify")
        if self.quantize_base not in BASE_FORMATS:
            raise MemlmError(f"--quantize-base must be int8 or int4, got {self.quantize_base!r}")
        if self.full and self.quantize_base:
            raise MemlmError("--full trains every weight, which a quantized base cannot hold",
                             "drop --quantize-base for a full fine-tune, or drop --full for (Q)LoRA")
        if not self.full:
            if self.lora_r < 1:
                raise MemlmError(f"--lora-r must be at least 1, got {self.lora_r}")
            if self.lora_alpha <= 0:
                raise MemlmError(f"--lora-alpha must be positive, got {self.lora_alpha}")
            parse_targets(self.lora_targets)
        if self.pooling not in ("last", "mean"):
            raise MemlmError(f"unknown pooling {self.pooling!r}", "use --pooling last or --pooling mean")

    @property
    def method(self) -> str:
        return "full" if self.full else ("qlora" if self.quantize_base else "lora")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def float_embedding(model: nn.Module) -> None:
    """A GGUF's Q8_0 token table loaded as int8 back in float32, its tied head with it: the loss's
    fused head paths (memlm.train.loss) need a float head weight, and a frozen int8 table would
    be dequantized into autograd's saved tensors on every step."""
    from memlm.compress.quantize import Int8Embedding, Int8TiedHead, dequantize_weight

    emb = model.tok_emb
    if not isinstance(emb, Int8Embedding):
        return
    table = nn.Embedding(emb.num_embeddings, emb.embedding_dim, device="meta")
    table.weight = nn.Parameter(dequantize_weight(emb), requires_grad=False)
    model.tok_emb = table
    if isinstance(model.lm_head, Int8TiedHead):
        head = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False, device="meta")
        head.weight = table.weight
        model.lm_head = head


def trainable_view(model: nn.Module) -> nn.Module:
    """A module tree holding only `model`'s trainable parameters, under the same names (the same
    tensors, not copies): what a checkpoint of a fine-tune saves and restores."""
    view = nn.Module()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        *path, leaf = name.split(".")
        node = view
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, p)
    return view


def build_base(fcfg: FinetuneConfig, seq_len: int, train_texts: list[str] | None = None,
               tokenizer: Any = None, seed: int = 1337) -> tuple[nn.Module, Any]:
    """(base model, tokenizer) of a fine-tune. A known model or a path is read in fcfg.quantize_base
    (its int8 token table back in float: `float_embedding`); a preset name (tiny, ...) is a model
    trained from scratch: freshly initialised, with a BPE of the training texts (or `tokenizer`)."""
    from memlm.config import PRESETS, preset
    from memlm.loading import load_model
    from memlm.model import build_model

    if fcfg.model in PRESETS:
        if tokenizer is None:
            from memlm.tokenizer import train_bpe

            tokenizer = train_bpe(train_texts or [""], PRESET_VOCAB)
        config = preset(fcfg.model, vocab_size=tokenizer.vocab_size)
        config.block_size = max(config.block_size, seq_len)
        torch.manual_seed(seed)
        return build_model(config), tokenizer
    base, tokenizer = load_model(fcfg.model, weight_format=fcfg.quantize_base)
    if tokenizer is None:
        raise MemlmError(f"model '{fcfg.model}' has no tokenizer", "put a tokenizer.json beside the weights")
    float_embedding(base)
    return base, tokenizer


class _ClassifyLoss:
    """The loop's objective for classification: cross-entropy of the head's logits, batches of
    (x, y = [label, length] per row) (memlm.data_classify.collate)."""

    @staticmethod
    def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(x, y[:, 1]).float(), y[:, 0])


class FineTune:
    """What the training loop asks a fine-tune for (see memlm.train.loop.train's `task`)."""

    def __init__(self, fcfg: FinetuneConfig, train_cfg: TrainConfig, console: Any = None):
        from memlm import data_classify, data_instruct
        from memlm.config import PRESETS

        fcfg.validate()
        if fcfg.model in PRESETS and not fcfg.full:
            raise MemlmError(f"'{fcfg.model}' is a preset: it has no pretrained weights to adapt",
                             "train it from scratch with --full, or name a pretrained model")
        self.fcfg = fcfg
        self.seq_len = train_cfg.seq_len or DEFAULT_SEQ_LEN
        say = console.print if console is not None else (lambda *a, **k: None)
        # the data first: a mistake in it fails before the model is read
        if fcfg.task == "lm":
            train_records, eval_records = data_instruct.load_records(fcfg.data)
        else:
            train_records, eval_records = data_classify.load_labelled(fcfg.data)
            classes = data_classify.class_names(train_records)
            if fcfg.labels and fcfg.labels != classes:
                raise MemlmError(f"the data's classes ({', '.join(classes)}) are not the run's ({', '.join(fcfg.labels)})",
                                 "resume with the run's own data, or choose another --out")
            fcfg.labels = classes
        self.eval_records = eval_records
        run_tokenizer = _run_tokenizer(train_cfg.out_dir) if fcfg.model in PRESETS else None
        base, tokenizer = build_base(fcfg, self.seq_len, [r.get("text", "") for r in train_records], run_tokenizer,
                                     train_cfg.seed)
        self.base, self.tokenizer, self.model_config = base, tokenizer, base.config
        if self.seq_len > base.config.block_size:
            raise MemlmError(f"seq_len {self.seq_len} is longer than the model's context {base.config.block_size}",
                             "lower --seq-len")
        if not fcfg.full:  # a bad target or rank fails now, not after the data is tokenized
            for name in target_names(base, parse_targets(fcfg.lora_targets)):
                out_f, in_f = _shape(base.get_submodule(name))
                if fcfg.lora_r > min(in_f, out_f):
                    raise MemlmError(f"LoRA rank {fcfg.lora_r} is larger than layer {name} ({out_f} x {in_f})",
                                     f"use --lora-r at most {min(in_f, out_f)}")
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        if fcfg.task == "lm":
            self.objective = None  # the loop's own next-token loss
            self.collate = data_instruct.collate
            self.train_examples, dropped = data_instruct.encode_records(train_records, tokenizer, self.seq_len)
            self.eval_examples, dropped_eval = data_instruct.encode_records(eval_records, tokenizer, self.seq_len)
            if dropped or dropped_eval:
                say(f"[yellow]{dropped + dropped_eval} examples left out: nothing to learn within {self.seq_len} "
                    "tokens (raise --seq-len to keep them)[/]")
            unit = f"{sum(e.n_target for e in self.train_examples):,} target tokens"
        else:
            self.objective = _ClassifyLoss()
            self.collate = data_classify.collate
            self.train_examples = data_classify.encode_labelled(train_records, tokenizer, fcfg.labels, self.seq_len)
            self.eval_examples = data_classify.encode_labelled(eval_records, tokenizer, fcfg.labels, self.seq_len)
            unit = f"{len(fcfg.labels)} classes"
        if not self.eval_examples:
            raise MemlmError("no held-out example is left to evaluate on",
                             "the examples are longer than --seq-len or have no answer; raise --seq-len")
        self.batches = data_instruct.ExampleBatches(self.train_examples, train_cfg.micro_batch, train_cfg.seed,
                                                    self.pad_id, self.collate)
        self.data_summary = f"{len(self.train_examples):,} train / {len(self.eval_examples):,} held-out examples ({unit})"
        # the longest row a batch can have: what the memory plan sizes (rows are padded per batch)
        longest = max(len(e.ids) for e in self.train_examples + self.eval_examples) - (fcfg.task == "lm")
        self.max_len = min(self.seq_len, longest)
        self.model: nn.Module | None = None
        self.eval_before: float | None = None  # the base's held-out loss (finetune(eval_before=True))
        self.before_answers: list[tuple[str, str]] = []
        self.references: list[str] = []

    # -- the loop's questions

    def build_model(self) -> nn.Module:
        """The model the loop trains: the base (with adapters unless full), under a head for classify."""
        from memlm.model.heads import SequenceClassifier

        base = self.base
        if self.fcfg.full:
            base.requires_grad_(True)
        else:
            apply_lora(base, self.fcfg.lora_r, self.fcfg.lora_alpha, self.fcfg.lora_dropout, self.fcfg.lora_targets)
        model = base
        if self.fcfg.task == "classify":
            torch.manual_seed(0)  # the head's init: the same on resume (its weights come from the checkpoint anyway)
            model = SequenceClassifier(base, len(self.fcfg.labels), self.fcfg.pooling)
        self.model = model
        return model

    def write_run_files(self, run_dir: Path) -> None:
        (run_dir / FINETUNE_FILE).write_text(json.dumps(self.fcfg.to_dict(), indent=2) + "\n", encoding="utf-8")

    def checkpoint_module(self, model: nn.Module) -> nn.Module:
        return model if self.fcfg.full else trainable_view(model)

    def batch(self, index: int, rank: int, world_size: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches.get(index, rank, world_size, shape.micro_batch)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, cfg: TrainConfig, device: torch.device, ctx: Any = None) -> float:
        """Held-out loss: per target token (lm) or per example (classify), over every held-out
        example. Under torchrun (`ctx`, memlm.train.distributed.Distributed) each rank scores
        every world_size-th row of a batch and the sums are added up: the same figure as one
        process's, however unevenly the rows' targets fall."""
        from memlm.data_instruct import IGNORE_INDEX, eval_batches
        from memlm.train.loop import compute_loss

        rank, world_size = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
        was_training = model.training
        model.eval()
        total, count = 0.0, 0
        for x, y in eval_batches(self.eval_examples, cfg.micro_batch, self.pad_id, self.collate):
            x, y = x[rank::world_size], y[rank::world_size]
            n = len(y) if self.objective is not None else int((y != IGNORE_INDEX).sum())
            if n:
                total += compute_loss(model, x.to(device), y.to(device), cfg, self.objective).item() * n
                count += n
        model.train(was_training)
        if ctx is not None:
            total, count = ctx.sum(total), ctx.sum(count)
        return total / max(count, 1)

    def estimate(self, cfg: TrainConfig, device: str):
        """The predicted peak, for the longest row this data makes (not seq_len, when all are shorter)."""
        from memlm.memory.estimate import estimate_finetune

        return estimate_finetune(self.model_config, dataclasses.replace(cfg, seq_len=self.max_len), device,
                                 world_size=cfg.nproc, **self.plan_terms())

    def fit(self, cfg: TrainConfig, device: str):
        from memlm.memory.plan import fit_finetune

        return fit_finetune(self.model_config, dataclasses.replace(cfg, seq_len=self.max_len), device,
                            **self.plan_terms())

    def plan_terms(self) -> dict[str, Any]:
        """How this fine-tune looks to the estimator (memlm.memory.estimate.estimate_finetune)."""
        from memlm.memory.estimate import model_layout

        layout = model_layout(self.base)
        return {"lora_r": None if self.fcfg.full else self.fcfg.lora_r,
                "lora_targets": None if self.fcfg.full else parse_targets(self.fcfg.lora_targets),
                "base_format": layout["weight_format"], "group_size": layout["group_size"],
                # a classifier's head scores one pooled row per example, not answer tokens
                "answer_tokens": None if self.objective is not None else tuple(sorted(
                    (e.n_target for e in self.train_examples + self.eval_examples), reverse=True))}


def _run_tokenizer(run_dir: str | Path) -> Any:
    """The tokenizer a from-scratch run trained (on resume: the same ids), or None for a new run."""
    from memlm.tokenizer import Tokenizer

    return Tokenizer.load(run_dir) if (Path(run_dir) / "tokenizer.json").is_file() else None


def _shape(layer: nn.Module) -> tuple[int, int]:
    from memlm.compress.kinds import kind_of

    return kind_of(layer).shape(layer)


# ------------------------------------------------------------------------------ the workflow


def _check_resume(run_dir: Path, fcfg: FinetuneConfig) -> None:
    path = run_dir / FINETUNE_FILE
    if not path.is_file():
        return
    saved = read_json_object(path, "resume with the run's own folder, or choose another --out")
    keys = [k for k in fcfg.to_dict() if k != "labels"]
    changed = [f"{k}: {saved.get(k)!r} -> {getattr(fcfg, k)!r}" for k in keys if saved.get(k) != getattr(fcfg, k)]
    if changed:
        raise MemlmError(f"cannot resume {run_dir} with other fine-tuning settings ({'; '.join(changed)})",
                         "resume with the run's own settings (finetune.json), or choose another --out")


def read_finetune_config(run_dir: str | Path) -> FinetuneConfig:
    """The settings a fine-tuning run folder was made with (its finetune.json)."""
    path = Path(run_dir) / FINETUNE_FILE
    if not path.is_file():
        raise MemlmError(f"{run_dir} is not a fine-tuning run (no {FINETUNE_FILE})", "pass the --out of memlm finetune")
    saved = read_json_object(path, "pass the --out of memlm finetune")
    known = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in saved.items() if k in known})


def choose_rank_and_base(fcfg: FinetuneConfig, cfg: TrainConfig) -> FinetuneConfig:
    """Under a memory budget: the base format and LoRA rank the planner picks (memlm.memory.plan.
    plan_finetune), before the base is read in that format. The micro-batch, checkpointing and
    loss chunk are then fitted by the loop (FineTune.fit), to the same plan."""
    from memlm.loading import layout_of, model_config_of
    from memlm.memory.plan import plan_finetune
    from memlm.train.loop import resolve_device

    plan = plan_finetune(model_config_of(fcfg.model), cfg, cfg.memory_budget, resolve_device(cfg.device).type,
                         fcfg.lora_r, parse_targets(fcfg.lora_targets), fcfg.quantize_base or "fp32",
                         layout=lambda f: {} if f == "fp32" else layout_of(fcfg.model, f))
    if not plan.feasible:
        return fcfg  # the loop refuses it, with the smallest budget that would do
    fmt = plan.settings["base_format"]
    return dataclasses.replace(fcfg, lora_r=plan.settings["lora_r"], quantize_base=None if fmt == "fp32" else fmt)


def finetune(fcfg: FinetuneConfig, train_cfg: TrainConfig, resume: bool = False, console: Any = None,
             stop_after: int | None = None, before: int = 0, eval_before: bool = True):
    """Fine-tune as `fcfg` says on the training loop; returns (TrainResult, FineTune). The
    adapters (LoRA) are written to <run>/adapter at the end, in the PEFT layout.

    eval_before: score the held-out set with the base first (FineTune.eval_before); before: also
    answer that many held-out questions with it (FineTune.before_answers, .references)."""
    from memlm.train.checkpoint import refuse_to_overwrite
    from memlm.train.distributed import setup as setup_distributed
    from memlm.train.loop import resolve_device, train

    run_dir = Path(train_cfg.out_dir)
    refuse_to_overwrite(run_dir, resume)
    cfg = dataclasses.replace(train_cfg, seq_len=train_cfg.seq_len or DEFAULT_SEQ_LEN, init_from=fcfg.model,
                              corpus=fcfg.data)
    # Under torchrun: join the process group now (the loop reuses it), so that the base's held-out
    # loss is scored once over the ranks and only rank 0 writes and prints.
    ctx = setup_distributed(cfg, resolve_device(cfg.device))
    cfg = dataclasses.replace(cfg, nproc=ctx.world_size)  # what the plan and the estimate divide by
    check_processes(fcfg, cfg)
    if not ctx.is_main:
        console = None
    if cfg.memory_budget is not None and not fcfg.full:
        fcfg = choose_rank_and_base(fcfg, cfg)
    if resume:
        _check_resume(run_dir, fcfg)
    task = FineTune(fcfg, cfg, console)
    if eval_before and not resume and fcfg.task == "lm":  # (a classifier's head starts untrained: no "before")
        task.eval_before = task.evaluate(task.base, cfg, torch.device("cpu"), ctx)  # (the base is moved later)
    if before and fcfg.task == "lm" and ctx.is_main:
        held_out = [e for e in task.eval_records if "messages" in e][:before]
        questions = [r["messages"][0]["content"] for r in held_out]
        task.before_answers = list(zip(questions, answers(task.base, task.tokenizer, questions)))
        task.references = [r["messages"][-1]["content"] for r in held_out]
    result = train(cfg, task.model_config, resume=resume, console=console, stop_after=stop_after, tuning=task)
    if not fcfg.full and ctx.is_main:  # the base's adapters (a classifier's head is in its checkpoints)
        save_adapter(task.base, run_dir / ADAPTER_DIR, base_name=fcfg.model)
    return result, task


def check_processes(fcfg: FinetuneConfig, cfg: TrainConfig) -> None:
    """Refuse what cannot run on cfg.nproc processes, before any starts (the CLI calls it before
    launching torchrun; each rank again)."""
    from memlm.train import distributed
    from memlm.train.loop import resolve_device

    if cfg.nproc <= 1:
        return
    distributed.check_config(cfg, cfg.nproc, resolve_device(cfg.device))
    if cfg.strategy == "fsdp" and not fcfg.full:
        raise MemlmError("a LoRA fine-tune runs with strategy 'ddp'",
                         "every process holds the same frozen base, and FSDP would shard only the small "
                         "adapters: drop --strategy fsdp (it is for --full)")


# ------------------------------------------------------------------------------ answers and merging


def answers(model: nn.Module, tokenizer: Any, questions: list[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies of `model` to each question as one user turn of its chat template."""
    from memlm.infer.generate import generate_text
    from memlm.infer.sampling import SamplingSettings

    was_training = model.training
    model.eval()
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    for q in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out.append(generate_text(model, tokenizer, prompt, settings).strip())
    model.train(was_training)
    return out


def resolve_adapter(path: str | Path) -> tuple[Path, str | None, str | None]:
    """(adapter folder, base model, base format) of an adapter folder or a fine-tuning run folder."""
    from memlm.adapters.peft import is_adapter_folder, read_adapter_config

    path = Path(path)
    if (path / FINETUNE_FILE).is_file() and is_adapter_folder(path / ADAPTER_DIR):
        fcfg = read_finetune_config(path)
        return path / ADAPTER_DIR, fcfg.model, fcfg.quantize_base
    config = read_adapter_config(path)
    return path, config.get("base_model_name_or_path"), None


@dataclass
class MergeResult:
    out: Path
    layers: int
    weight_format: str
    ppl_adapter: float | None = None  # the base with the adapter unmerged
    ppl_merged: float | None = None
    max_logit_diff: float | None = None  # merged vs unmerged on the scored text


def merge_adapter(adapter: str | Path, out: str | Path, base: str | None = None, weight_format: str | None = None,
                  eval_tokens: int = 4096) -> MergeResult:
    """Fold an adapter into its base and save the result (a memlm folder memlm.load reads).

    A float base merges exactly. A quantized base (QLoRA's int4, say: `weight_format`, by default
    the format the run was trained in) is merged and rounded again to its own format, which costs
    accuracy: the perplexity of the unmerged and the merged model on the first `eval_tokens` of
    the embedded eval split says how much (0: no evaluation)."""
    from memlm.adapters.lora import merge_lora
    from memlm.adapters.peft import load_adapter
    from memlm.compress.storage import save_compressed
    from memlm.data import read_corpus
    from memlm.eval.perplexity import perplexity
    from memlm.loading import load_model
    from memlm.memory.estimate import model_layout

    folder, trained_base, trained_format = resolve_adapter(adapter)
    base = base or trained_base
    if base is None:
        raise MemlmError(f"the adapter in {folder} does not name its base model", "pass --model BASE")
    model, tokenizer = load_model(base, weight_format=weight_format or trained_format)
    n = len(load_adapter(model, folder))
    model.eval()
    result = MergeResult(Path(out), n, model_layout(model)["weight_format"])
    ids = None
    if eval_tokens and tokenizer is not None:
        ids = tokenizer.encode("\n\n".join(read_corpus("default", "eval")))[:eval_tokens]
        window = min(512, model.config.block_size)
        result.ppl_adapter = perplexity(model, ids, window=window).ppl
        with torch.no_grad():
            before = model(torch.tensor([ids[:window]]))
    merge_lora(model)
    if ids is not None:
        result.ppl_merged = perplexity(model, ids, window=window).ppl
        with torch.no_grad():
            result.max_logit_diff = float((model(torch.tensor([ids[:window]])) - before).abs().max())
    save_compressed(model, tokenizer, out)
    return result


# ------------------------------------------------------------------------------ classifiers


def load_classifier(run_dir: str | Path) -> tuple[nn.Module, Any, FinetuneConfig]:
    """(classifier, tokenizer, settings) of a `memlm finetune --task classify` run: the base read
    as it was trained, its adapters and head (or, full, every weight) from the latest checkpoint."""
    from memlm.config import PRESETS, load_toml
    from memlm.model.heads import SequenceClassifier
    from memlm.train.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    fcfg = read_finetune_config(run_dir)
    if fcfg.task != "classify":
        raise MemlmError(f"{run_dir} fine-tuned a language model, not a classifier", "pass a --task classify run")
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise MemlmError(f"run folder {run_dir} has no checkpoint yet", "train it first (memlm finetune --task classify)")
    seq_len = load_toml(run_dir / "config.toml")["train"].get("seq_len") or DEFAULT_SEQ_LEN
    base, tokenizer = build_base(fcfg, seq_len, tokenizer=_run_tokenizer(run_dir) if fcfg.model in PRESETS else None)
    if not fcfg.full:
        apply_lora(base, fcfg.lora_r, fcfg.lora_alpha, fcfg.lora_dropout, fcfg.lora_targets)
    classifier = SequenceClassifier(base, len(fcfg.labels), fcfg.pooling)
    load_checkpoint(ckpt, classifier if fcfg.full else trainable_view(classifier))
    return classifier.eval(), tokenizer, fcfg


def evaluate_classifier(run_dir: str | Path, data: str = "default", batch_size: int = 16):
    """(result, majority-class baseline) of a classifier run on `data`'s held-out split (a JSONL
    file: all of it; "default": the embedded set's held-out split)."""
    from memlm import data_classify
    from memlm.data_instruct import eval_batches
    from memlm.eval.classify import majority_baseline, metrics, predict

    classifier, tokenizer, fcfg = load_classifier(run_dir)
    train_records, held_out = data_classify.load_labelled(fcfg.data)
    records = held_out if data == "default" else data_classify.read_labelled(data)
    from memlm.config import load_toml

    seq_len = load_toml(Path(run_dir) / "config.toml")["train"].get("seq_len") or DEFAULT_SEQ_LEN
    examples = data_classify.encode_labelled(records, tokenizer, fcfg.labels, seq_len)
    pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
    true, pred = predict(classifier, eval_batches(examples, batch_size, pad_id, data_classify.collate))
    name = f"{fcfg.model} {fcfg.method}"
    train_labels = [fcfg.labels.index(str(r["label"])) for r in train_records]
    return metrics(true, pred, fcfg.labels, name), majority_baseline(train_labels, true, fcfg.labels)
