"""memlm: build, train, compress and serve transformer language models inside a memory budget."""

from memlm.config import ModelConfig, TrainConfig, preset
from memlm.errors import MemlmError
from memlm.loading import LoadedModel, load

__all__ = ["ModelConfig", "TrainConfig", "preset", "MemlmError", "load", "LoadedModel"]
__version__ = "0.1.0"
