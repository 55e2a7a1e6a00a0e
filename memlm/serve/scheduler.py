"""The one thread that runs the model for the server.

Requests never touch the model themselves: each completion is a `Sequence` handed to the
scheduler, which generates it and leaves its outputs in the request's `Mailbox`, from where
the request's asyncio handler reads them. A handler that goes away (the client disconnected,
the request timed out) cancels its sequences, and the scheduler drops them between two tokens:
nothing it holds (a lock, a thread, a KV slot) can be left behind by a client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from memlm.infer.generate import stream_text
from memlm.infer.sampling import SamplingSettings
from memlm.loading import LoadedModel

log = logging.getLogger("memlm.serve")


@dataclass
class Output:
    """New text of one completion (choice `index`); its last output has the finish reason
    ("stop": EOS or a stop string, "length", "error": the message is the text) and how many
    tokens it generated."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


class Sequence:
    """One completion to generate: prompt ids, its own sampling settings, where its outputs go
    (`deliver`, called on the scheduler thread)."""

    def __init__(self, prompt: list[int], settings: SamplingSettings, index: int,
                 deliver: Callable[[Output], None]):
        self.prompt, self.settings, self.index, self.deliver = prompt, settings, index, deliver
        self.cancelled = False  # set by the handler's thread, read by the scheduler's


class QueueFull(Exception):
    """More sequences than the waiting queue holds: the request is refused (429)."""


class Mailbox:
    """Where the scheduler thread leaves a request's outputs for the request's asyncio handler."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output | None] = asyncio.Queue()

    def deliver(self, out: Output) -> None:
        """Called on the scheduler thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def close(self) -> None:
        """Called on the event loop: the reader stops (the client has gone)."""
        self.queue.put_nowait(None)


def seeded(settings: SamplingSettings, index: int) -> SamplingSettings:
    """Completion `index` of a request: its own seed (seed + index), so choices differ and
    choice 0 samples what the same request with n=1 samples."""
    if settings.seed is None or index == 0:
        return settings
    return dataclasses.replace(settings, seed=(settings.seed + index + 2 ** 63) % 2 ** 64 - 2 ** 63)


class Scheduler:
    """Runs the sequences handed to `submit`, one at a time, on its own thread; at most
    `queue_size` wait."""

    def __init__(self, lm: LoadedModel, queue_size: int = 64):
        self.lm = lm
        self.queue_size = queue_size
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread()

    def start(self) -> None:
        """Start the thread (again, after a `stop`)."""
        with self._cond:
            self._stopping = False
        if not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="memlm-scheduler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` or none (QueueFull)."""
        with self._cond:
            if len(self._waiting) + len(seqs) > self.queue_size:
                raise QueueFull(f"the server is busy: {len(self._waiting)} completions are waiting")
            self._waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Drop `seqs` (waiting or running): the scheduler stops each before its next token."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._waiting = deque(s for s in self._waiting if not s.cancelled)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                seq = self._waiting.popleft()
            try:
                self._generate(seq)
            except Exception as e:  # noqa: BLE001 - a failed generation must not stop the server
                log.exception("generation failed")
                seq.deliver(Output(seq.index, f"generation failed: {e}", "error"))

    def _generate(self, seq: Sequence) -> None:
        lm = self.lm
        text = ""
        for piece in stream_text(lm.engine or lm.model, lm.tokenizer, seq.prompt, seq.settings, lm.cache_dtype):
            if seq.cancelled:
                return
            text += piece.text
            if piece.finish_reason is None:
                seq.deliver(Output(seq.index, piece.text))
            else:
                seq.deliver(Output(seq.index, piece.text, piece.finish_reason,
                                   len(lm.tokenizer.encode(text)) if text else 0))
