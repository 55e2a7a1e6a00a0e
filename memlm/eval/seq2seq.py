"""An encoder-decoder on source -> target pairs: the loss of the references (teacher forcing),
and the greedy outputs scored by exact match and SQuAD's token F1, beside the copy-the-name
baseline (memlm.pairs.copy_the_name: the function's name as words, the embedded task's
obvious guess)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from memlm.infer.generate import generate_batch
from memlm.infer.sampling import SamplingSettings
from memlm.pairs import copy_the_name, exact_match, pair_rows, token_f1, tokenize_pairs
from memlm.train.loss import IGNORE_INDEX

BATCH = 16  # pairs per forward and per batched generation


@dataclass
class Seq2SeqResult:
    pairs: int
    loss: float  # mean nats per reference token (EOS included)
    exact_match: float
    f1: float
    baseline_exact_match: float
    baseline_f1: float
    examples: list[dict] = field(default_factory=list)  # source, reference, output

    @property
    def ppl(self) -> float:
        return math.exp(self.loss)


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[tuple[str, str]], max_new_tokens: int = 32,
                   examples: int = 3, on_batch=None) -> Seq2SeqResult:
    """Score `model` on `pairs` (sources cut to the model's context, as in training)."""
    model.eval()
    config = model.config
    ids = tokenize_pairs(pairs, tokenizer)
    nll, count, outputs = 0.0, 0, []
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    for start in range(0, len(ids), BATCH):
        chunk = ids[start:start + BATCH]
        x, y = pair_rows(chunk, config.block_size, config.start_id, tokenizer.eos_id)
        logits = model(x).float()
        nll += torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, ignore_index=IGNORE_INDEX,
                                                 reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
        sources = [s[:config.block_size] or [tokenizer.eos_id] for s, _ in chunk]
        outputs += [tokenizer.decode(o) for o in generate_batch(model, sources, settings, tokenizer.eos_id)]
        if on_batch is not None:
            on_batch(len(chunk))
    refs = [t for _, t in pairs]
    baseline = [copy_the_name(s) for s, _ in pairs]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    return Seq2SeqResult(
        pairs=len(pairs), loss=nll / count,
        exact_match=mean([exact_match(o, r) for o, r in zip(outputs, refs)]),
        f1=mean([token_f1(o, r) for o, r in zip(outputs, refs)]),
        baseline_exact_match=mean([exact_match(b, r) for b, r in zip(baseline, refs)]),
        baseline_f1=mean([token_f1(b, r) for b, r in zip(baseline, refs)]),
        examples=[{"source": s, "reference": r, "output": o} for (s, r), o in zip(pairs[:examples], outputs)],
    )
