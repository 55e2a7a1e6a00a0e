"""Instruction data for fine-tuning: JSONL records, the chat template, loss on the answers only.

A data file has one JSON object per line, either

    {"text": "..."}                                   plain text: the loss is on every token
    {"messages": [{"role": "user", "content": ...},   a conversation, rendered with the model's
                  {"role": "assistant", "content": ...}, ...]}   own chat template; the loss is
                                                      on the assistant turns' tokens only

The last 10% of the records (at least one) are held out for evaluation, like a user corpus
(memlm.data); the embedded default set has its own fixed split.

Sequences are padded, not packed: each example is one row, right-padded to the longest row of
its micro-batch (at most seq_len + 1 tokens; longer ones are cut), padding and prompt tokens
carry the ignore label. The decoder has no per-document attention mask, so packing several
examples into one row would let an answer attend to the examples before it; padding keeps
every example on its own, at the price of computing over the padding (the examples here are
short). The memory plan sizes the longest row, so a batch of shorter ones only uses less.

The embedded default set (`default_instruct_records`) is real text shipped with every Python:
questions about the language reference and the standard library, answered from their own
documentation. "Explain the `with` statement." -> the first paragraph of that
`pydoc_data.topics` entry (and of each of its titled sections); "What does `textwrap.dedent`
do?" -> the first paragraph of its docstring, for the public functions and classes of a fixed
list of standard modules. The split is fixed by a hash of the question (1 in 10 held out), so it
does not move when a Python version adds or drops entries.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memlm.errors import MemlmError

IGNORE_INDEX = -100  # memlm.train.loss.IGNORE_INDEX: targets left out of the loss
EVAL_FRACTION = 0.1
DEFAULT = "default"

# The standard modules whose public functions and classes the embedded set asks about.
INSTRUCT_MODULES = (
    "textwrap", "string", "json", "os.path", "shutil", "pathlib", "glob", "fnmatch", "tempfile", "collections",
    "heapq", "bisect", "copy", "itertools", "functools", "operator", "math", "statistics", "random", "re",
    "difflib", "datetime", "calendar", "base64", "hashlib", "gzip", "zipfile", "tarfile", "csv", "urllib.parse",
    "html", "inspect", "contextlib", "dataclasses", "enum", "argparse", "logging", "threading", "queue",
    "subprocess", "shlex", "uuid", "fractions", "decimal", "secrets", "pprint", "traceback", "weakref",
)
MIN_ANSWER, MAX_ANSWER = 30, 600  # characters of an answer paragraph the set keeps


@dataclass
class Example:
    """One training row: token ids and, per token, whether the loss counts it."""

    ids: list[int]
    labels: list[int]  # the id where the loss counts the token, IGNORE_INDEX where it does not

    @property
    def n_target(self) -> int:  # tokens the loss counts (as targets: all but the first position)
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


# ------------------------------------------------------------------------------ the default set


def _paragraph(text: str) -> str:
    """The first paragraph of a docstring or topic body, on one line."""
    first = inspect.cleandoc(text).strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines()).strip()


def _quote_code(title: str) -> str:
    return re.sub(r'"([^"\s]+)"', r"`\1`", title)


def _topic_records() -> list[tuple[str, str]]:
    """(question, answer) for every pydoc topic and its '='-underlined sections."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        lines = topics[key].split("\n")
        for i in range(len(lines) - 2):
            title, rule = lines[i].strip(), lines[i + 1].strip()
            if not title or not rule or set(rule) - set("*=") or len(rule) < len(title) * 0.8:
                continue
            body = "\n".join(lines[i + 2:]).lstrip("\n")
            answer = _paragraph(body)
            if MIN_ANSWER <= len(answer) <= MAX_ANSWER and not answer.startswith(("::=", "**")):
                title = _quote_code(title)
                out.append((f"Explain {title[0].lower() + title[1:]}." if title.startswith("The ") else
                            f"Explain: {title}.", answer))
    return out


def _docstring_records() -> list[tuple[str, str]]:
    """(question, answer) for the public functions and classes of INSTRUCT_MODULES."""
    out = []
    for mod_name in INSTRUCT_MODULES:
        try:
            module = importlib.import_module(mod_name)
        except ImportError:
            continue
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(public)):
            obj = getattr(module, name, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.isbuiltin(obj)):
                continue
            doc = inspect.getdoc(obj)
            if not doc or (inspect.isclass(obj) and doc == inspect.getdoc(type)):
                continue
            answer = _paragraph(doc)
            if not (MIN_ANSWER <= len(answer) <= MAX_ANSWER) or "(" in answer.split(" ")[0] or "->" in answer:
                continue
            qualified = f"{mod_name}.{name}"
            question = f"What is `{qualified}`?" if inspect.isclass(obj) else f"What does `{qualified}` do?"
            out.append((question, answer))
    return out


def _held_out(question: str) -> bool:
    return int(hashlib.sha256(question.encode("utf-8")).hexdigest(), 16) % round(1 / EVAL_FRACTION) == 0


def default_instruct_records(split: str | None = None) -> list[dict[str, Any]]:
    """The embedded instruction set as chat records (see the module docstring); split "train",
    "eval" or None for all. Questions are unique (the first answer of a repeated one is kept)."""
    seen: set[str] = set()
    records = []
    for question, answer in _topic_records() + _docstring_records():
        if question in seen:
            continue
        seen.add(question)
        if split is None or (split == "eval") == _held_out(question):
            records.append({"messages": [{"role": "user", "content": question},
                                         {"role": "assistant", "content": answer}]})
    return records


# ------------------------------------------------------------------------------ reading files


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL data file, each checked: a string `text`, or `messages` with at least
    one assistant turn."""
    path = Path(path)
    if not path.is_file():
        raise MemlmError(f"data file not found: {path}", "pass a .jsonl file, or leave --data out for the embedded set")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise MemlmError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start})", "convert it to UTF-8") from None
    from memlm.data import jsonl_objects

    records = [_checked(obj, f"{path} line {lineno}") for lineno, obj in jsonl_objects(path, raw)]
    if not records:
        raise MemlmError(f"data file {path} is empty", 'add one JSON object per line: {"text": ...} or {"messages": [...]}')
    return records


def _checked(obj: Any, where: str) -> dict[str, Any]:
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        if not obj["text"]:
            raise MemlmError(f"{where}: 'text' is empty", "remove the line or give it some text")
        return obj
    if not isinstance(obj, dict) or "messages" not in obj:
        raise MemlmError(f"{where}: neither a string 'text' nor 'messages'",
                         'each line must look like {"text": "..."} or {"messages": [{"role": ..., "content": ...}]}')
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise MemlmError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} strings")
    if not any(m["role"] == "assistant" for m in messages):
        raise MemlmError(f"{where}: the conversation has no assistant turn, so there is nothing to learn",
                         "add the assistant's reply, or give the line as {\"text\": ...}")
    return obj


def split_records(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval): the last EVAL_FRACTION of the records (at least one) held out."""
    if len(records) < 2:
        raise MemlmError(f"{len(records)} record is too few to hold one out for evaluation", "add more examples")
    n_eval = max(1, round(len(records) * EVAL_FRACTION))
    return records[:-n_eval], records[-n_eval:]


def load_records(spec: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) records of `spec`: "default" (the embedded set) or a JSONL file."""
    if spec == DEFAULT:
        return default_instruct_records("train"), default_instruct_records("eval")
    return split_records(read_records(spec))


# ------------------------------------------------------------------------------ tokens and labels


def encode_record(record: dict[str, Any], tokenizer: Any, max_tokens: int) -> Example | None:
    """One record as tokens and labels, cut to `max_tokens`; None when the cut leaves nothing to learn."""
    if "text" in record:
        ids = tokenizer.encode(record["text"])
        if tokenizer.eos_id is not None:
            ids = ids + [tokenizer.eos_id]
        ids = ids[:max_tokens]
        example = Example(ids, list(ids))
    else:
        example = encode_conversation(record["messages"], tokenizer, max_tokens)
    return example if example.n_target > 0 else None


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any, max_tokens: int) -> Example:
    """The conversation rendered with the chat template, the loss on each assistant turn's text
    and what the template closes it with (e.g. `<|im_end|>`), so the model learns to stop.

    The rendering of the first i messages with the generation prompt is a prefix of the first
    i + 1 messages' rendering; what lies between is the i-th (assistant) turn. The pieces are
    tokenized one by one: templates put special tokens at these boundaries, so the tokens are
    those of the whole text."""
    if tokenizer.chat_template is None:
        raise MemlmError("the model has no chat template, so 'messages' records cannot be rendered",
                         'give the data as {"text": ...} lines, or fine-tune a chat model')
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not prompt.startswith(done) or not whole.startswith(prompt):
            raise MemlmError("the chat template does not render a conversation as a growing text",
                             "memlm finds the assistant turns as the text each one adds; use 'text' records")
        context = tokenizer.encode(prompt[len(done):], add_bos=None if not done else False)
        answer = tokenizer.encode(whole[len(prompt):], add_bos=False)
        ids += context + answer
        labels += [IGNORE_INDEX] * len(context) + answer
        done = whole
    return Example(ids[:max_tokens], labels[:max_tokens])


def encode_records(records: list[dict[str, Any]], tokenizer: Any, seq_len: int) -> tuple[list[Example], int]:
    """Every record that keeps something to learn within seq_len + 1 tokens; and how many were dropped."""
    examples = [encode_record(r, tokenizer, seq_len + 1) for r in records]
    kept = [e for e in examples if e is not None]
    return kept, len(examples) - len(kept)


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (B, T), T the longest example minus one: inputs right-padded with pad_id,
    targets the next token's label (IGNORE_INDEX on prompts and padding)."""
    T = max(len(e.ids) for e in examples) - 1
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.ids) - 1
        x[row, :n] = torch.tensor(e.ids[:-1])
        y[row, :n] = torch.tensor(e.labels[1:])
    return x, y


class ExampleBatches:
    """Micro-batches of examples as a pure function of (seed, index), like memlm.data.Batches:
    the examples are taken in a fresh permutation per epoch (seeded by seed and epoch), the
    global micro-batch `index` is positions [index * B, (index + 1) * B) of that endless order,
    and rank r of W takes its rows [r * B/W, (r+1) * B/W). All ranks pad to the global batch's
    longest row, so their shapes agree."""

    def __init__(self, examples: list, batch_size: int, seed: int, pad_id: int, collate_fn=None):
        if not examples:
            raise MemlmError("no training examples left", "the examples are longer than --seq-len, or have no answer")
        self.examples, self.batch_size, self.seed, self.pad_id = examples, batch_size, seed, pad_id
        self.collate = collate_fn or collate  # memlm.data_classify.collate for labelled examples
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._orders[epoch]

    def get(self, index: int, rank: int = 0, world_size: int = 1, batch_size: int | None = None):
        b = batch_size or self.batch_size
        n = len(self.examples)
        picked = []
        for pos in range(index * b, (index + 1) * b):
            picked.append(self.examples[self._order(pos // n)[pos % n]])
        x, y = self.collate(picked, self.pad_id)
        share = b // world_size
        return x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]


def eval_batches(examples: list, batch_size: int, pad_id: int, collate_fn=None):
    """Every held-out example once, in order, `batch_size` at a time."""
    for i in range(0, len(examples), batch_size):
        yield (collate_fn or collate)(examples[i:i + batch_size], pad_id)
