"""Continuous batching: the one thread that runs the model for the server.

Requests never touch the model themselves: each completion is a `Sequence` handed to
`Scheduler.submit`, and the scheduler leaves its outputs in the request's `Mailbox`, from where
the request's asyncio handler reads them. The scheduler's loop, one iteration per step (the
shape of vLLM's engine step, kept small):

1. retire: sequences whose handler cancelled them (a disconnect, a timeout) leave their slot;
2. admit: waiting sequences take free slots of the KV pool;
3. prefill: admitted prompts run through the model together (right-padded, each at its own
   positions: memlm.infer.engine.prefill), PREFILL_TOKENS padded tokens a step when nothing
   else runs, only what STEP_TOKENS leaves beside the running rows while they decode: a long
   prompt is prefilled a piece per step (chunked prefill, as vLLM and Sarathi interleave it). A
   sequence whose prompt is in samples its first token from the last piece's logits;
4. decode: ONE batched forward for every running sequence (engine.decode_step: each row its
   own slot and position), then each row samples with its own settings, emits its text, and
   leaves at once when it ends (EOS, a stop string, max_tokens).

While sequences decode and prompts wait, steps 3 and 4 are one forward (a mixed batch, as in
vLLM: engine.decode_and_prefill): each weight is read once for the running rows' tokens and the
piece's, so the running sequences' next token waits for one step, not a step and a piece.

The pool is allocated once, at its full size (slots x context, the bytes the memory plan
counted); a step attends only over the positions its rows have reached (a window of the pool),
so short sequences in a long pool cost what they hold. Nothing a client does can leave
anything behind: a cancelled sequence is dropped before the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from memlm.config import PREFILL_CHUNK, cache_length
from memlm.infer.engine import as_engine
from memlm.infer.generate import TextStream
from memlm.infer.sampling import SamplingSettings, sample_next
from memlm.loading import LoadedModel
from memlm.model.kv_cache import CacheWindow

log = logging.getLogger("memlm.serve")

PREFILL_TOKENS = PREFILL_CHUNK  # padded prompt tokens a prefill step runs while nothing decodes
# ... and while sequences decode, a step runs at most STEP_TOKENS tokens in all: one per running
# row, the rest (at least MIN_PIECE) for the prompts' pieces, as vLLM's chunked prefill budgets a
# step's tokens. Each running token waits for one such step, so the step must stay short: on the
# 2-core AMD EPYC (SmolLM2, 15 decoding rows, 2026-12-03) a mixed step with a 16-token piece took
# 120-154 ms in fp32 (81-104 int4), with a 32-token piece 198-207 (123-142; measured when fp32
# layers ran oneDNN's packed matmul in row buckets, before memlm's float kernel).
STEP_TOKENS = 32
MIN_PIECE = 8


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
        self.submitted = time.monotonic()


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


@dataclass(eq=False)
class _Row:
    """A sequence while it holds a slot: the token it feeds next and at which position."""

    seq: Sequence
    slot: int
    text: TextStream
    generator: torch.Generator | None
    position: int = 0  # where the next token goes (prefilling: the prompt's next token)
    token: int = 0
    generated: list[int] = field(default_factory=list)
    last_emit: float = 0.0
    done: bool = False


@dataclass
class Stats:
    """What the scheduler has done, for /metrics (counters only grow)."""

    steps: int = 0
    tokens: int = 0  # generated
    prompt_tokens: int = 0  # prefilled
    prefill_steps: int = 0  # prefill forwards (a prompt may take several: STEP_TOKENS)
    mixed_steps: int = 0  # forwards that were a decode step and a prefill piece at once
    sequences: int = 0  # finished or cancelled
    peak_rows: int = 0  # the most rows one decode step has run
    peak_mixed_tokens: int = 0  # the most tokens one mixed step has run: decode rows + padded pieces
    on_first_token: Callable[[float], None] | None = None  # seconds from submit to the first token
    on_token_gap: Callable[[float], None] | None = None  # seconds between two tokens of a sequence


class Scheduler:
    """Continuous batching over a pool of `slots` sequences of up to `context` tokens; at most
    `queue_size` sequences wait for a slot (see the module docstring)."""

    def __init__(self, lm: LoadedModel, slots: int, context: int, queue_size: int = 64):
        self.lm = lm
        self.engine = as_engine(lm.engine or lm.model, lm.cache_dtype)
        self.pool = self.engine.cache(slots, context)  # allocated now, at its full size
        self.engine.release_cache()  # the pool is the scheduler's alone
        self.context = context
        self.queue_size = queue_size
        self.eos_id = lm.tokenizer.eos_id
        self.stats = Stats()
        self._free = list(range(slots - 1, -1, -1))  # pop() takes the lowest
        self._rows: list[_Row] = []  # decoding
        self._prefilling: list[_Row] = []  # holding a slot, prompt not yet all in the cache
        self._waiting: deque[Sequence] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread()

    # ---- the handlers' side (any thread)

    @property
    def slots(self) -> int:
        return self.pool.slots

    @property
    def running(self) -> int:
        """Slots in use."""
        return self.pool.slots - len(self._free)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

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

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue all of `seqs` or none (QueueFull). Sequences wait only when every slot is taken."""
        for s in seqs:
            if len(s.prompt) + s.settings.max_new_tokens > self.pool.max_len:
                raise ValueError(f"a sequence of {len(s.prompt)} + {s.settings.max_new_tokens} tokens does not fit "
                                 f"the pool's {self.pool.max_len}")
        with self._cond:
            room = self.queue_size + len(self._free) - len(self._waiting)
            if len(seqs) > room:
                raise QueueFull(f"the server is busy: room for {max(room, 0)} more completions, {len(seqs)} asked for "
                                f"({self.slots} slots, at most {self.queue_size} waiting)")
            self._waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: list[Sequence]) -> None:
        """Drop `seqs`, waiting or running: a running one leaves its slot before the next step."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            self._cond.notify()

    # ---- the scheduler's thread

    def _run(self) -> None:
        while True:
            with self._cond:
                self._retire_cancelled()
                while not self._waiting and not self._rows and not self._prefilling and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._admit()
            try:
                if self._prefilling and self._rows and self.engine.mixes:
                    self._decode_and_prefill()
                else:
                    if self._prefilling:
                        self._prefill()
                    if self._rows:
                        self._decode()
            except Exception as e:  # noqa: BLE001 - a failed step must not stop the server
                log.exception("a generation step failed")
                for row in self._prefilling + self._rows:
                    self._finish(row, "error", f"generation failed: {e}")
                self._rows, self._prefilling = [], []

    def _retire_cancelled(self) -> None:
        for row in self._prefilling + self._rows:
            if row.seq.cancelled:
                self._release(row)
        self._rows = [r for r in self._rows if not r.done]
        self._prefilling = [r for r in self._prefilling if not r.done]

    def _admit(self) -> None:
        """Waiting sequences into free slots, first come first served."""
        while self._waiting and self._free:
            seq = self._waiting.popleft()
            s = seq.settings
            generator = torch.Generator(device=self.engine.device).manual_seed(s.seed) if s.seed is not None else None
            self._prefilling.append(_Row(seq, self._free.pop(), TextStream(self.lm.tokenizer, s.stop), generator))

    def _prefill(self) -> None:
        """The next piece of the prefilling prompts, alone in a forward (nothing decodes, or the
        engine cannot mix the two)."""
        rows, pieces, ids, lengths, starts, slots, window = self._next_pieces(len(self._rows))
        self._prefilled(rows, pieces, self.engine.prefill(ids, lengths, window, slots, starts))

    def _decode(self) -> None:
        """One forward for every running row."""
        rows, tokens, positions, window = self._next_tokens()
        self._decoded(rows, self.engine.decode(tokens, positions, window))

    def _decode_and_prefill(self) -> None:
        """The running rows' next token and the next piece of the prefilling prompts in ONE
        forward (engine.decode_and_prefill): the running rows wait for one step, not a step and a
        piece. The rows are picked before either is applied, so a prompt that completes here
        decodes from the next step on."""
        rows, tokens, positions, window = self._next_tokens()
        prefilled, pieces, ids, lengths, starts, slots, prefill_window = self._next_pieces(len(tokens))
        stepped, last = self.engine.decode_and_prefill(tokens, positions, window, ids, lengths, prefill_window,
                                                       slots, starts)
        self.stats.mixed_steps += 1
        self.stats.peak_mixed_tokens = max(self.stats.peak_mixed_tokens, len(tokens) + ids.numel())
        self._decoded(rows, stepped)
        self._prefilled(prefilled, pieces, last)

    def _next_pieces(self, decoding: int):
        """The prefilling prompts' next pieces, oldest first, as many rows as fit the step's
        padded-token budget (always at least one): the rows, their pieces and the prefill's
        arguments. `decoding` is the rows the step's decode runs beside them: in a mixed step the
        decode batch's, free and parked slots below the top one included, since those rows are
        computed too."""
        budget = max(STEP_TOKENS - decoding, MIN_PIECE) if decoding else PREFILL_TOKENS
        rows: list[_Row] = []
        width, room = 0, self.pool.max_len
        for row in self._prefilling:
            piece = min(len(row.seq.prompt) - row.position, budget)
            w, r = max(width, piece), min(room, self.pool.max_len - row.position)
            if rows and (w * (len(rows) + 1) > budget or w > r):
                break
            rows.append(row)
            width, room = w, r
        device = self.engine.device
        pieces = [r.seq.prompt[r.position:r.position + width] for r in rows]
        # Padding repeats the piece's first token at positions after it: a row's own later
        # tokens overwrite them, and no query sees a key ahead of its own position.
        ids = torch.tensor([p + [p[0]] * (width - len(p)) for p in pieces], dtype=torch.long, device=device)
        lengths = torch.tensor([len(p) for p in pieces], device=device)
        starts = torch.tensor([r.position for r in rows], device=device)
        slots = torch.tensor([r.slot for r in rows], device=device)
        return rows, pieces, ids, lengths, starts, slots, self._window(int(starts.max()) + width)

    def _prefilled(self, rows: list[_Row], pieces: list[list[int]], logits: torch.Tensor) -> None:
        """The pieces are in the cache: a row whose prompt is then all in samples its first token
        (from its piece's last logits) and joins the decoding rows."""
        self.stats.prompt_tokens += sum(len(p) for p in pieces)
        self.stats.prefill_steps += 1
        for i, (row, piece) in enumerate(zip(rows, pieces)):
            row.position += len(piece)
            if row.position == len(row.seq.prompt):
                self._rows.append(row)
                self._advance(row, logits[i:i + 1])
        self._prefilling = [r for r in self._prefilling if not r.done and r.position < len(r.seq.prompt)]
        self._rows = [r for r in self._rows if not r.done]

    def _next_tokens(self):
        """The decode step's batch: the pool's first `top` slots, the lowest slots being taken
        first. A slot between two running ones that is free feeds a dummy token into itself (its
        content is garbage anyway, and the next prefill there starts at position 0); a slot whose
        prompt is half prefilled takes it at the position its next piece overwrites. So the step
        attends over a view of the pool, never a copy of the rows' keys and values."""
        device = self.engine.device
        rows = list(self._rows)
        whole = self.engine.compiled  # one static shape for the compiled step: the whole pool
        top = self.pool.slots if whole else max(r.slot for r in rows) + 1
        parked = [r for r in self._prefilling if r.slot < top]  # fed a dummy token, see above
        length = self.pool.max_len if whole else max(r.position for r in rows + parked) + 1
        tokens, positions = [0] * top, [0] * top
        for r in parked:
            positions[r.slot] = r.position
        for r in rows:
            tokens[r.slot], positions[r.slot] = r.token, r.position
        return (rows, torch.tensor(tokens, device=device), torch.tensor(positions, device=device),
                self._window(length, top))

    def _decoded(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row samples its next token from its slot's logits."""
        self.stats.steps += 1
        self.stats.peak_rows = max(self.stats.peak_rows, len(rows))
        for row in rows:
            row.position += 1
            self._advance(row, logits[row.slot:row.slot + 1])
        self._rows = [r for r in self._rows if not r.done]

    def _window(self, needed: int, top: int | None = None):
        """The pool's first `top` slots (all: None) and first positions, enough for `needed`
        (rounded up: few distinct shapes)."""
        length = cache_length(needed, self.pool.max_len)
        top = self.pool.slots if top is None else top
        if length >= self.pool.max_len and top == self.pool.slots:
            return self.pool
        return CacheWindow(self.pool, top, length)

    def _advance(self, row: _Row, logits: torch.Tensor) -> None:
        """Sample the row's next token from its logits (1, V) with its own settings; emit its
        text; finish it when it has ended."""
        s = row.seq.settings
        if row.seq.cancelled:
            self._release(row)
            return
        if s.ignore_eos and self.eos_id is not None:
            logits[:, self.eos_id] = float("-inf")
        context = (torch.tensor([row.seq.prompt + row.generated], device=logits.device) if s.penalizes
                   else logits.new_empty(1, 0, dtype=torch.long))
        token = int(sample_next(logits, context, s, row.generator, generated=len(row.generated)))
        self._timed(row)
        if token == self.eos_id and not s.ignore_eos:
            self._finish(row, "stop", row.text.flush())
            return
        row.generated.append(token)
        self.stats.tokens += 1
        piece = row.text.push(token)
        if row.text.stopped:
            self._finish(row, "stop", piece)
        elif len(row.generated) >= s.max_new_tokens:
            self._finish(row, "length", piece + row.text.flush())
        else:
            if piece:
                row.seq.deliver(Output(row.seq.index, piece))
            row.token = token

    def _timed(self, row: _Row) -> None:
        now = time.monotonic()
        hook = self.stats.on_token_gap if row.last_emit else self.stats.on_first_token
        if hook is not None:
            hook(now - (row.last_emit or row.seq.submitted))
        row.last_emit = now

    def _finish(self, row: _Row, reason: str, text: str = "") -> None:
        self._release(row)
        row.seq.deliver(Output(row.seq.index, text, reason, len(row.generated)))

    def _release(self, row: _Row) -> None:
        if not row.done:
            row.done = True
            self._free.append(row.slot)
            self._free.sort(reverse=True)
            self.stats.sequences += 1
