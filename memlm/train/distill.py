"""Knowledge distillation: train a small student on a big teacher's softened predictions.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

(Hinton et al., 2015). The temperature T > 1 flattens both distributions so the student also
learns how the teacher ranks the unlikely tokens; the T^2 factor keeps the soft term's gradients
on the same scale as the hard one's whatever T is. KL is averaged over tokens.

There is one training loop (memlm.train.loop.train): it takes a `Teacher` and its
`compute_loss` hands each micro-batch to `Teacher.loss`. The teacher runs under
`torch.no_grad()` on the same micro-batch, so its logits exist for one batch at a time, never
for the corpus; it is frozen (no gradients, eval mode) and may be quantized to save memory.
The student uses the teacher's tokenizer: their vocabularies must be the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from memlm.config import ModelConfig, TrainConfig
from memlm.errors import MemlmError

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # inside the run folder: the tokenizer the student uses
DISTILL_FILE = "distill.json"  # inside the run folder: the teacher and the loss settings


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, mean over tokens.

    logits (..., V) of the same shape; targets (...) token ids. Computed in float32.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise MemlmError(
            f"the student predicts {student_logits.shape[-1]} tokens but the teacher {teacher_logits.shape[-1]}",
            "distillation needs one vocabulary: build the student with the teacher's tokenizer",
        )
    vocab = student_logits.shape[-1]
    s = student_logits.reshape(-1, vocab).float()
    t = teacher_logits.reshape(-1, vocab).float()
    soft = F.kl_div(F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(s, targets.reshape(-1))
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


class Teacher:
    """A frozen model whose logits a student learns from; `loss` is what the training loop calls."""

    def __init__(self, model: nn.Module, temperature: float = 2.0, alpha: float = 0.5):
        if temperature <= 0:
            raise MemlmError(f"--temperature must be positive, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise MemlmError(f"--alpha must be in [0, 1], got {alpha}", "1 = teacher only, 0 = plain cross-entropy")
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        if device != x.device:  # follows the student to its device on first use
            self.model.to(x.device)
        with torch.no_grad():
            return self.model(x)

    def loss(self, student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The distillation loss of `student` on inputs x and targets y (B, T)."""
        teacher_logits = self.logits(x)
        return distillation_loss(student(x), teacher_logits, y, self.temperature, self.alpha)


@torch.no_grad()
def mean_kl(teacher: nn.Module, student: nn.Module, batches: list[torch.Tensor], temperature: float = 1.0) -> float:
    """Mean over tokens of KL(teacher || student) at `temperature`, on (B, T) input batches."""
    total, n = 0.0, 0
    for x in batches:
        t, s = teacher(x).float() / temperature, student(x).float() / temperature
        kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
        total += float(kl.sum())
        n += kl.numel()
    return total / max(n, 1)


def load_teacher(name_or_path: str, quant: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of the teacher, frozen, optionally quantized ("int8" | "int4")."""
    from memlm.compress import quantize_model
    from memlm.loading import load_model

    if quant not in (None, "int8", "int4"):
        raise MemlmError(f"--teacher-quant must be int8 or int4, got {quant!r}")
    model, tokenizer = load_model(name_or_path)
    if tokenizer is None:
        raise MemlmError(f"teacher '{name_or_path}' has no tokenizer", "the student must use the teacher's tokenizer")
    if model.config.vocab_size != tokenizer.vocab_size:
        raise MemlmError(
            f"teacher '{name_or_path}' has {model.config.vocab_size} output rows but its tokenizer "
            f"{tokenizer.vocab_size} tokens",
            "distillation needs the student's and the teacher's vocabularies to be the same",
        )
    if quant is not None:
        quantize_model(model, quant, progress=False)
    return model.eval(), tokenizer


def distill(teacher_source: str, train_cfg: TrainConfig, model_cfg: ModelConfig, temperature: float = 2.0,
            alpha: float = 0.5, teacher_quant: str | None = None, console: Any = None):
    """Train a student (`model_cfg`, or `train_cfg.init_from`) from a teacher; returns the TrainResult.

    The run folder is an ordinary memlm run (load it with memlm.load) plus the teacher's
    tokenizer and distill.json (teacher, temperature, alpha, quantization).
    """
    from memlm.tokenizer import Tokenizer
    from memlm.train.checkpoint import refuse_to_overwrite
    from memlm.train.loop import train

    train_cfg.validate()
    run_dir = Path(train_cfg.out_dir)
    refuse_to_overwrite(run_dir, resume=False, can_resume=False)  # before the teacher is loaded and anything written
    teacher_model, tokenizer = load_teacher(teacher_source, teacher_quant)
    teacher = Teacher(teacher_model, temperature, alpha)
    if train_cfg.tokenizer and Tokenizer.load(train_cfg.tokenizer).fingerprint() != tokenizer.fingerprint():
        raise MemlmError("the student's tokenizer differs from the teacher's",
                         "leave train.tokenizer unset: the student takes the teacher's tokenizer")
    if train_cfg.init_from:
        from memlm.loading import load_model

        init_vocab = load_model(train_cfg.init_from)[0].config.vocab_size
        if init_vocab != teacher.vocab_size:
            raise MemlmError(f"the student {train_cfg.init_from} has {init_vocab} output rows, the teacher "
                             f"{teacher.vocab_size}", "distillation needs one vocabulary")
    seq_len = train_cfg.seq_len or model_cfg.block_size
    if seq_len > teacher_model.config.block_size:
        raise MemlmError(f"seq_len {seq_len} is longer than the teacher's context {teacher_model.config.block_size}",
                         "lower --seq-len")

    tokenizer_dir = tokenizer.save(run_dir / TEACHER_TOKENIZER_DIR)
    record = {"teacher": teacher_source, "temperature": temperature, "alpha": alpha, "teacher_quant": teacher_quant}
    (run_dir / DISTILL_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    cfg = dataclasses.replace(train_cfg, tokenizer=str(tokenizer_dir))
    return train(cfg, model_cfg, console=console, teacher=teacher)
