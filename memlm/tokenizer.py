"""Tokenizers for memlm, built on the Hugging Face `tokenizers` library.

`Tokenizer` wraps a `tokenizers.Tokenizer` and adds the few facts the rest of memlm needs and
that the `tokenizers` JSON does not record on its own: which ids are BOS / EOS / PAD, whether
to prepend BOS, and the chat template. Those live in a small sidecar `tokenizer_config.json`
next to `tokenizer.json`.

`train_bpe` trains a byte-level BPE: every byte has a token, so any UTF-8 string encodes and
decodes back exactly (no unknown token, no normalisation).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from memlm.errors import MemlmError
from memlm.integrity import read_json_object, write_text_atomic

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
DEFAULT_EOS = "<|endoftext|>"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus special-token ids, BOS policy and chat template.

    Built by `train_bpe`, `Tokenizer.load`, or directly around a `tokenizers.Tokenizer` made
    elsewhere (the GGUF importer does that)."""

    def __init__(
        self,
        tok: tokenizers.Tokenizer,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
    ):
        self._tok = tok
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
            if value is not None and (not isinstance(value, int) or not 0 <= value < vocab_size):
                raise MemlmError(
                    f"tokenizer: {name}={value} is outside the vocabulary (size {vocab_size})",
                    "fix the id in tokenizer_config.json",
                )
        if add_bos and bos_id is None:
            raise MemlmError("tokenizer: add_bos is set but the tokenizer has no BOS token", "set bos_id or add_bos=False")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = add_bos
        self.chat_template = chat_template

    # ----------------------------------------------------------------------------- basics

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (for exporters that need the vocab and merges)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding must be at least this)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self._tok.id_to_token(id)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; prepends BOS when `add_bos` (default: `self.add_bos`).

        Special tokens written literally in the text (e.g. "<|endoftext|>") become their special
        id, which is the `tokenizers` default. The backend's own post-processor is not run
        (add_special_tokens=False) so that BOS is added exactly once, by us.
        """
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._with_bos(ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """Encode many texts at once; `tokenizers` spreads the work over all CPU cores."""
        texts = list(texts)
        # encode_batch_fast skips offset tracking, which we never use; older versions lack it.
        fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [self._with_bos(e.ids, add_bos) for e in fn(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Byte-level tokenizers round-trip exactly: decode(encode(s)) == s."""
        ids = [int(i) for i in ids]
        vocab_size = self.vocab_size
        for i in ids:
            if not 0 <= i < vocab_size:
                raise MemlmError(f"cannot decode token id {i}: vocabulary size is {vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise MemlmError("cannot prepend BOS: this tokenizer has no BOS token", "call encode(..., add_bos=False)")
            return [self.bos_id, *ids]
        return ids

    def fingerprint(self) -> str:
        """sha256 of the tokenizer JSON: changes whenever the vocab, merges or pipeline change."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------------ save / load

    def config(self) -> dict[str, Any]:
        """What the sidecar tokenizer_config.json holds."""
        return {
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` and `tokenizer_config.json` into the folder `path`."""
        folder = Path(path)
        if folder.suffix == ".json":
            raise MemlmError(f"tokenizer save path {folder} looks like a file", "pass a folder; tokenizer.json is written inside it")
        folder.mkdir(parents=True, exist_ok=True)
        texts = {TOKENIZER_FILE: self._tok.to_str(pretty=False),  # compact: it counts in model sizes
                 CONFIG_FILE: json.dumps(self.config(), indent=2) + "\n"}
        for name, text in texts.items():
            write_text_atomic(folder / name, text)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a folder written by `save`, or from the path of its tokenizer.json.

        A tokenizer.json without the sidecar loads too, with no BOS/EOS/PAD and no template.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise MemlmError(f"tokenizer not found: {file}", "pass a folder holding tokenizer.json or the file itself")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for bad JSON
            raise MemlmError(f"cannot read tokenizer {file}: {e}", "the file must be a Hugging Face tokenizers JSON") from e
        cfg: dict[str, Any] = {}
        sidecar = file.parent / CONFIG_FILE
        if sidecar.is_file():
            cfg = read_json_object(sidecar, "fix or delete the file")
        return cls(
            tok,
            bos_id=cfg.get("bos_id"),
            eos_id=cfg.get("eos_id"),
            pad_id=cfg.get("pad_id"),
            add_bos=bool(cfg.get("add_bos", False)),
            chat_template=cfg.get("chat_template"),
        )

    # ----------------------------------------------------------------------------- chat

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's jinja2 template.

        The template runs in jinja2's immutable sandbox because templates ship inside model
        files that we did not write. Extra keyword arguments are passed to the template.
        """
        if self.chat_template is None:
            raise MemlmError(
                "this model has no chat template",
                "use plain completion, or set chat_template in tokenizer_config.json",
            )
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise MemlmError("chat messages must be a list of {'role': ..., 'content': ...} objects")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise MemlmError(f"chat template refused the messages: {message}", "check the roles and their order")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_id),
                eos_token=self._token_text(self.eos_id),
                **extra,
            )
        except jinja2.TemplateError as e:
            raise MemlmError(f"chat template failed: {e}", "fix chat_template in tokenizer_config.json") from e

    def _token_text(self, id: int | None) -> str:
        return "" if id is None else (self._tok.id_to_token(id) or "")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id}, add_bos={self.add_bos})"


def train_bpe(
    texts: Iterable[str],
    vocab_size: int = 4096,
    min_frequency: int = 2,
    special_tokens: Sequence[str] = (DEFAULT_EOS,),
) -> Tokenizer:
    """Train a byte-level BPE on `texts`.

    All 256 bytes are in the initial alphabet, so nothing is ever unknown and the round trip is
    exact. No prefix space is added (it would change the text). The EOS is "<|endoftext|>"
    when it is among `special_tokens`, else the first special token, else none. The vocabulary
    can come out smaller than `vocab_size` when the corpus has too few mergeable pairs.
    """
    special_tokens = list(special_tokens)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    smallest = len(alphabet) + len(special_tokens)
    if vocab_size < smallest:
        raise MemlmError(
            f"BPE vocab_size {vocab_size} is too small",
            f"byte-level BPE needs at least {smallest} (256 bytes + {len(special_tokens)} special tokens)",
        )
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    eos_text = DEFAULT_EOS if DEFAULT_EOS in special_tokens else (special_tokens[0] if special_tokens else None)
    eos_id = tok.token_to_id(eos_text) if eos_text is not None else None
    return Tokenizer(tok, eos_id=eos_id)


def unigram_baseline_nll(train_ids: Sequence[int] | np.ndarray, eval_ids: Sequence[int] | np.ndarray, vocab_size: int) -> float:
    """Mean negative log-likelihood (nats/token) of `eval_ids` under a unigram model of `train_ids`.

    Add-one (Laplace) smoothing: p(t) = (count(t) + 1) / (len(train_ids) + vocab_size), so ids
    never seen in training still get a finite cost. A language model that cannot beat
    exp(this) in perplexity has learnt nothing beyond token frequencies.
    """
    train = np.asarray(train_ids, dtype=np.int64).reshape(-1)
    evals = np.asarray(eval_ids, dtype=np.int64).reshape(-1)
    if vocab_size <= 0:
        raise MemlmError(f"unigram baseline: vocab_size must be positive, got {vocab_size}")
    if evals.size == 0:
        raise MemlmError("unigram baseline: no eval tokens", "pass a non-empty eval split")
    for name, ids in (("train", train), ("eval", evals)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise MemlmError(f"unigram baseline: {name} ids fall outside the vocabulary (size {vocab_size})")
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - math.log(train.size + vocab_size)
    return float(-log_p[evals].mean())
