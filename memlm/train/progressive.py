"""Progressive training: short sequences and small micro-batches first, the full shape after.

Two independent ramps, each a list of values held for a fixed number of steps:

    seq_len_warmup = [64, 128], seq_len_warmup_steps = 100
        steps 1-100 train on 64-token windows, 101-200 on 128, then the full seq_len
    batch_ramp = [2, 4], batch_ramp_steps = 50
        steps 1-50 use micro-batches of 2 rows, 51-100 of 4, then the full micro_batch

The shape of a step is a pure function of the step number, and the rows of a micro-batch a
pure function of (seed, micro-batch index, shape), so a resumed run sees exactly the data an
uninterrupted one would have, even across a phase change. The memory planner must size for the
largest phase: `longest_phase`.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlm.config import TrainConfig
from memlm.errors import MemlmError


@dataclass(frozen=True)
class StepShape:
    micro_batch: int
    seq_len: int

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def _phase_value(step: int, values: list[int], steps_each: int, full: int) -> int:
    """values[k] for steps k*steps_each+1 .. (k+1)*steps_each (steps are 1-based), then `full`."""
    if values and steps_each > 0:
        phase = (step - 1) // steps_each
        if phase < len(values):
            return values[phase]
    return full


def _full_seq_len(cfg: TrainConfig, block_size: int | None) -> int:
    seq_len = cfg.seq_len or block_size
    if seq_len is None:
        raise MemlmError("the train config has no seq_len", "set seq_len or pass the model's block_size")
    return seq_len


def step_shape(step: int, cfg: TrainConfig, block_size: int | None = None) -> StepShape:
    """Micro-batch size and sequence length of optimizer step `step` (1-based)."""
    full = _full_seq_len(cfg, block_size)
    return StepShape(
        micro_batch=_phase_value(step, cfg.batch_ramp, cfg.batch_ramp_steps, cfg.micro_batch),
        seq_len=_phase_value(step, cfg.seq_len_warmup, cfg.seq_len_warmup_steps, full),
    )


def tokens_in_steps(first: int, last: int, cfg: TrainConfig, block_size: int | None = None) -> int:
    """Tokens trained on in steps first..last (inclusive), grad_accum included."""
    return sum(step_shape(s, cfg, block_size).tokens for s in range(first, last + 1)) * cfg.grad_accum


def longest_phase(cfg: TrainConfig, block_size: int | None = None) -> tuple[int, int]:
    """(micro_batch, seq_len) of the phase that needs the most memory: size memory for this.

    Activation memory grows with micro_batch x seq_len (and attention with seq_len^2), so the
    biggest phase is the one with the most tokens, the longer sequence breaking ties. Both ramps
    only ever grow, so today this is the full shape; going through the phases keeps it right if
    a schedule ever shrinks one of them.
    """
    full = _full_seq_len(cfg, block_size)
    # Every distinct shape starts at a phase boundary of one of the two ramps (or at step 1).
    starts = {1}
    for values, steps_each in ((cfg.seq_len_warmup, cfg.seq_len_warmup_steps), (cfg.batch_ramp, cfg.batch_ramp_steps)):
        if steps_each > 0:
            starts.update(k * steps_each + 1 for k in range(len(values) + 1))
    shapes = [StepShape(cfg.micro_batch, full)] + [step_shape(s, cfg, block_size) for s in sorted(starts)]
    best = max(shapes, key=lambda s: (s.tokens, s.seq_len))
    return best.micro_batch, best.seq_len
