"""Training: the loop, optimizers and the learning-rate schedule, checkpoints."""

from memlm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from memlm.train.loop import TrainResult, compute_loss, train
from memlm.train.optim import build_optimizer, lr_at

__all__ = [
    "TrainResult",
    "build_optimizer",
    "compute_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "save_checkpoint",
    "train",
]
