"""The command line: one typed function per verb; no logic beyond argument handling.

A user mistake (MemlmError) prints `error: ...` and `hint: ...` and exits with status 2.
"""

from __future__ import annotations

import json
import sys

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from memlm.config import tomllib
from memlm.errors import MemlmError

app = typer.Typer(
    help="memlm: build, train, compress and serve transformer language models inside a memory budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="A known model name or a path (run folder, HF folder, .gguf).")]


# ---- train -----------------------------------------------------------------------------------

def _parse_set(items: list[str]) -> dict[str, dict]:
    """`model.n_layer=4` / `train.lr=3e-4` (values are TOML literals; bare words are strings)."""
    sections: dict[str, dict] = {"model": {}, "train": {}}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or section not in sections:
            raise MemlmError(f"--set '{item}' is not of the form model.KEY=VALUE or train.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        sections[section][name] = value
    return sections


def resolve_configs(config_file: Optional[Path], preset_name: Optional[str], overrides: dict[str, dict]):
    """File, then flags: [model] (with an optional `preset` base) and [train] sections."""
    from memlm.config import ModelConfig, TrainConfig, load_toml, preset

    data = load_toml(config_file) if config_file else {}
    unknown = set(data) - {"model", "train"}
    if unknown:
        raise MemlmError(f"config file: unknown section '{sorted(unknown)[0]}'", "valid sections: model, train")
    model_d = {**data.get("model", {}), **overrides.get("model", {})}
    base = preset_name or model_d.pop("preset", None)
    model_d.pop("preset", None)
    model_cfg = preset(base, **model_d) if base else ModelConfig.from_dict(model_d)
    train_cfg = TrainConfig.from_dict({**data.get("train", {}), **overrides.get("train", {})})
    return model_cfg, train_cfg


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML file with [model] and [train].")] = None,
    preset: Annotated[Optional[str], typer.Option(help="Model preset: tiny, gpt2, smollm2-135m, ...")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run folder.")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="'default', a file, folder, glob or .jsonl.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="Sequences per forward pass.")] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Training context length.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16-autocast | bf16.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw | adamw8bit | adafactor | sgd.")] = None,
    init_from: Annotated[Optional[str], typer.Option(help="Fine-tune from this model name or path.")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Let the planner fit the run in e.g. 2GiB.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run folder's last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any key: model.n_layer=4, train.eval_every=50.")] = None,
):
    """Train a model from scratch or fine-tune one (flags override the config file)."""
    from memlm.train.loop import train as run_training

    flags = {"out_dir": out_dir, "corpus": corpus, "steps": steps, "micro_batch": micro_batch,
             "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr, "precision": precision,
             "optimizer": optimizer, "init_from": init_from, "memory_budget": memory_budget, "device": device}
    overrides = _parse_set(set_ or [])
    overrides["train"].update({k: v for k, v in flags.items() if v is not None})
    if config is None and preset is None and "preset" not in overrides["model"] and not resume:
        preset = "tiny"
    if resume and config is None and out_dir:  # the run folder remembers everything
        config = Path(out_dir) / "config.toml"
    model_cfg, train_cfg = resolve_configs(config, preset, overrides)
    result = run_training(train_cfg, model_cfg, resume=resume, console=console)
    out.print(f"trained {result.final_step} steps: last loss {result.last_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s; run saved in {result.run_dir}")


# ---- generate / chat ---------------------------------------------------------------------------

def _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed):
    from memlm.infer.sampling import SamplingSettings

    return SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty, stop=list(stop or []), seed=seed)


MaxNew = Annotated[int, typer.Option(help="Most new tokens.")]
Temp = Annotated[float, typer.Option(help="0 = greedy.")]
TopK = Annotated[int, typer.Option(help="Keep the k likeliest tokens (0 = off).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
RepPen = Annotated[float, typer.Option(help="Penalty for tokens already present (1 = off).")]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop before this string (repeatable).")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: ModelOpt = "runs/demo",
    max_new_tokens: MaxNew = 128,
    temperature: Temp = 0.8,
    top_k: TopK = 0,
    top_p: TopP = 1.0,
    repetition_penalty: RepPen = 1.0,
    stop: Stop = None,
    seed: Seed = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as one user turn of the chat template.")] = False,
):
    """Continue a prompt, streaming the text to the terminal."""
    from memlm.loading import load

    lm = load(model)
    settings = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)
    text = lm.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    if not chat:
        out.print(prompt, end="", style="bold")
    for piece in lm.stream_pieces(text, **vars(settings)):
        out.print(piece.text, end="", markup=False)
    out.print()


@app.command()
def chat(
    model: ModelOpt = "smollm2-135m-instruct",
    system: Annotated[Optional[str], typer.Option(help="System prompt.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temp = 0.2,
    top_k: TopK = 0,
    top_p: TopP = 0.9,
    repetition_penalty: RepPen = 1.1,
    seed: Seed = None,
):
    """Talk to an instruct model. /reset clears the history, /exit leaves."""
    from memlm.loading import load

    lm = load(model)
    lm.chat_prompt([{"role": "user", "content": "hi"}])  # fail now, not after the first question
    settings = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, [], seed)
    history = [{"role": "system", "content": system}] if system else []
    start = list(history)
    console.print(f"chatting with {model}: /reset clears the history, /exit leaves", style="dim")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = list(start)
            console.print("(history cleared)", style="dim")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        out.print("bot> ", end="")
        for piece in lm.stream_pieces(lm.chat_prompt(history), **vars(settings)):
            reply += piece.text
            out.print(piece.text, end="", markup=False)
        out.print()
        history.append({"role": "assistant", "content": reply.strip()})


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
):
    """Serve a model over an OpenAI-compatible HTTP API (needs: pip install 'memlm[serve]')."""
    from memlm.loading import load
    from memlm.serve.app import serve as run_server

    run_server(load(model), Path(model).name, host, port)


# ---- eval ----------------------------------------------------------------------------------------

@app.command("eval")
def evaluate(
    model: ModelOpt = "runs/demo",
    corpus: Annotated[str, typer.Option(help="'default' or a path; see memlm train --help.")] = "default",
    split: Annotated[str, typer.Option(help="eval | train | all.")] = "eval",
    window: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="Window step (default: the window, no overlap).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Perplexity of a model on a corpus (default: the embedded eval split, the W2 protocol)."""
    from rich.progress import Progress

    from memlm.data import read_corpus
    from memlm.eval.perplexity import perplexity, window_plan
    from memlm.loading import load
    from memlm.memory.measure import PeakMemory, format_bytes

    lm = load(model)
    window = min(window, lm.config.block_size)
    docs = read_corpus(corpus, None if split == "all" else split)
    ids = lm.tokenizer.encode("\n\n".join(docs), add_bos=False)
    n_windows = len(window_plan(len(ids), window, stride))
    with PeakMemory() as pm, Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring windows", total=n_windows)
        result = perplexity(lm.model, ids, window, stride, batch_size, on_window=lambda n: bar.advance(task, n))
    record = {"model": model, "corpus": corpus, "split": split, "window": window, "stride": stride or window,
              "tokens": len(ids), "windows": result.n_windows, "scored": result.n_scored,
              "ppl": result.ppl, "nll": result.nll, "tokens_per_s": result.tokens_per_s,
              "peak_bytes": pm.peak_bytes}
    if as_json:
        out.print_json(json.dumps(record))
    else:
        out.print(f"perplexity {result.ppl:.3f} (nll {result.nll:.4f}) over {result.n_scored:,} tokens in "
                  f"{result.n_windows} windows of {window}; {result.tokens_per_s:,.0f} tokens/s; "
                  f"peak memory {format_bytes(pm.peak_bytes)}")


# ---- models in and out ---------------------------------------------------------------------------

@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A known model name or a path.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output folder (hf) or .gguf file (gguf).")],
    to: Annotated[str, typer.Option(help="hf | gguf.")] = "hf",
    qtype: Annotated[str, typer.Option(help="GGUF tensor type: F32 | F16 | Q8_0.")] = "F32",
):
    """Write a model as a Hugging Face folder or a GGUF file."""
    from memlm.interop.hf import save_hf
    from memlm.loading import load_model

    if to not in ("hf", "gguf"):
        raise MemlmError(f"unknown export format '{to}'", "use --to hf or --to gguf")
    lm, tokenizer = load_model(model)
    if to == "hf":
        save_hf(lm, out_path, tokenizer)
    else:
        from memlm.interop.gguf import save_gguf

        if tokenizer is None:
            raise MemlmError(f"model '{model}' has no tokenizer, which GGUF needs", "put a tokenizer.json beside it")
        save_gguf(lm, tokenizer, out_path, qtype=qtype)
    size = sum(p.stat().st_size for p in ([out_path] if out_path.is_file() else out_path.rglob("*")) if p.is_file())
    out.print(f"wrote {out_path} ({size / 2**20:,.1f} MiB)")


@app.command()
def models():
    """List the model names memlm knows (built-ins and folders under the models directory)."""
    from memlm.loading import BUILTIN, known_models, models_dirs

    for name, path in known_models().items():
        where = str(path) if path else f"not installed: {BUILTIN[name][1]}"
        out.print(f"{name:28s} {where}", markup=False)
    out.print(f"(model folders are looked up in {', '.join(str(d) for d in models_dirs())})", style="dim")


# ---- demo ----------------------------------------------------------------------------------------

@app.command()
def demo(
    out_dir: Annotated[str, typer.Option("--out", help="Run folder.")] = "runs/demo",
    steps: Annotated[int, typer.Option(help="Training steps.")] = 600,
):
    """The main job on the embedded default: train `tiny` on the Python reference, evaluate, sample."""
    from memlm.demo import run_demo

    run_demo(out_dir, steps, console, out)


def main() -> None:
    try:
        app()
    except MemlmError as e:
        console.print(f"error: {e.message}", style="bold red", markup=False, soft_wrap=True)
        if e.hint:
            console.print(f"hint: {e.hint}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", style="red")
        sys.exit(130)
