"""Fill a model built on the meta device one tensor at a time, in a weight format.

Every loader (GGUF files, Hugging Face folders, memlm runs) reads a checkpoint tensor by tensor
and hands each one to a `ModelAssembler`, which converts a block Linear to the target format
(`linear_in_format`) as soon as its weight arrives. The float copy of a layer is dropped before
the next tensor is read, so loading for int4 never holds the float32 model: its peak is the
converted model plus about one layer. A loader that already has a layer in its final form (a
GGUF Q4_1 tensor is an int4 layer, bit for bit) hands over the module instead. `InOrder` lets
a loader convert the next tensors in worker threads while it assembles the current one.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

import torch
from torch import nn

from memlm.compress.quantize import (
    Int8Embedding,
    Int8TiedHead,
    format_float_dtype,
    is_block_linear,
    linear_in_format,
    set_module,
)
from memlm.errors import MemlmError
from memlm.memory.measure import return_free_heap

T = TypeVar("T")
R = TypeVar("R")

# Threads a loader converts tensors on (see `InOrder`): the dev box has 2 cores, and each more
# would hold another tensor's temporaries while loading.
LOAD_WORKERS = 2


class InOrder:
    """convert(item) for each item, taken in order, computed by `workers` threads at most `ahead`
    items before the one being taken. The first conversions start at once, so the caller can
    do other work (build the tokenizer) before taking any; a loader holds at most `ahead` + 1
    results beside what it has assembled, so `ahead` bounds the extra memory when results are
    not final (a float layer still to be quantized). workers=0: each item converted as it is
    taken, by the caller (what a profiler sees whole).

    `convert` must only read shared state. An exception it raises comes out of the iteration, in
    order; on leaving the `with` block, conversions not started are cancelled and running ones
    finish first.

        with InOrder(convert, tensors, workers=2, ahead=2) as results:
            ...
            for result in results:
                ...

    The threads are started up front (a ThreadPoolExecutor starts a second one only while no
    thread is idle, and short first items kept SmolLM2's load on one).
    """

    def __init__(self, convert: Callable[[T], R], items: Iterable[T], workers: int = LOAD_WORKERS, ahead: int = 1):
        self._convert, self._items, self._ahead = convert, iter(items), max(0, ahead)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: deque = deque()
        self._threads = [threading.Thread(target=self._work, name=f"memlm-load-{i}", daemon=True)
                         for i in range(max(0, workers))]
        for thread in self._threads:
            thread.start()
        if self._threads:
            try:
                self._fill()
            except BaseException:  # an item that could not be made: no `with` block to stop the threads
                self.__exit__()
                raise

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, item = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(self._convert(item))
                except BaseException as e:  # handed to the caller by result()
                    future.set_exception(e)

    def _fill(self) -> None:
        while len(self._pending) <= self._ahead:
            item = next(self._items, _END)
            if item is _END:
                return
            future: Future = Future()
            self._jobs.put((future, item))
            self._pending.append(future)

    def __iter__(self) -> Iterator[R]:
        if not self._threads:
            yield from map(self._convert, self._items)
            return
        while self._pending:
            result = self._pending.popleft().result()
            self._fill()
            yield result

    def __enter__(self) -> InOrder:
        return self

    def __exit__(self, *exc: object) -> None:
        for future in self._pending:
            future.cancel()
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()


_END = object()


class ModelAssembler:
    """Puts tensors (by state-dict key) and ready modules into `memlm.model.empty_model(config)`.

    weight_format: None keeps every tensor as given, in `dtype`; "fp32", "bf16", "int8", "int4"
    convert the block Linears (q/k/v/o/gate/up/down_proj) to that format, and everything else
    to float32 (bfloat16 for "bf16"): the formats of `memlm.memory.estimate`.
    """

    def __init__(self, model: nn.Module, weight_format: str | None = None, dtype: torch.dtype = torch.float32,
                 use_kernel: bool | None = None, source: str = "the checkpoint"):
        self.model = model
        self.weight_format = weight_format
        self.dtype = format_float_dtype(weight_format, dtype)
        self.use_kernel = use_kernel
        self.source = source
        # The position tables first, while little else is loaded: their computation's
        # temporaries (a few MB for an 8k context) then never sit on top of the whole model.
        model.reset_buffers("cpu")

    def put(self, key: str, value: torch.Tensor) -> None:
        """One tensor; a block Linear's weight is converted to the format right here."""
        owner_name, _, attr = key.rpartition(".")
        owner = self._module(owner_name, key)
        current = getattr(owner, attr, None)
        if not isinstance(current, torch.Tensor):
            raise MemlmError(f"{self.source}: tensor '{key}' has no place in the model", _HINT)
        if tuple(value.shape) != tuple(current.shape):
            raise MemlmError(
                f"{self.source}: tensor '{key}' has shape {tuple(value.shape)}, expected {tuple(current.shape)}", _HINT,
            )
        if attr == "weight" and is_block_linear(owner_name, owner):
            set_module(self.model, owner_name,
                       linear_in_format(value, owner.bias, self.weight_format, self.dtype, self.use_kernel))
            if self.weight_format in ("int8", "int4"):
                return_free_heap()  # the float copy just freed: glibc would keep its pages otherwise
            return
        # A parameter of a plain module, or the bias of an already converted Linear.
        setattr(owner, attr, nn.Parameter(value.detach().to(self.dtype)))

    def put_module(self, name: str, module: nn.Module) -> None:
        """A layer already in its final form (built without a bias): it takes over the bias of
        the placeholder it replaces, whether already put or still to come (meta)."""
        bias = getattr(self._module(name, name), "bias", None)
        if bias is not None:
            module.bias = bias
        set_module(self.model, name, module)
        return_free_heap()  # the loader's temporaries of this layer (raw blocks, repacked codes)

    def missing(self) -> list[str]:
        """State-dict keys no tensor has been put for yet (a tied head counts as present)."""
        # Not model.state_dict(): an int4 layer in the kernel's layout converts its weight back to
        # the portable layout there, a copy of every int4 weight for a look at which are empty.
        tied = self.model.config.tied_embeddings
        left = []
        for owner, module in self.model.named_modules():
            prefix = f"{owner}." if owner else ""
            tensors = [*module.named_parameters(recurse=False),
                       *((n, b) for n, b in module.named_buffers(recurse=False)
                         if n not in module._non_persistent_buffers_set)]
            left += [prefix + n for n, t in tensors
                     if t.is_meta and not (tied and prefix + n == "lm_head.weight")]
        return left

    def finish(self) -> nn.Module:
        """Tie the head, check that nothing is left empty."""
        model = self.model
        if model.config.tied_embeddings:
            if isinstance(model.tok_emb, Int8Embedding):
                model.lm_head = Int8TiedHead(model.tok_emb, "tok_emb")
            else:
                model.lm_head.weight = model.tok_emb.weight
        left = self.missing()
        if left:
            raise MemlmError(f"{self.source} has no tensor for {', '.join(left[:5])}"
                             + (f" and {len(left) - 5} more" if len(left) > 5 else ""), _HINT)
        if self.weight_format == "bf16":  # the position tables too, as model.to(torch.bfloat16) would
            model.to(torch.bfloat16)
        return_free_heap()
        return model.eval()

    def _module(self, name: str, key: str) -> nn.Module:
        try:
            return self.model.get_submodule(name) if name else self.model
        except AttributeError:
            raise MemlmError(f"{self.source}: tensor '{key}' has no place in the model", _HINT) from None


_HINT = "the weights do not match the model's config; re-export or re-download the model"
