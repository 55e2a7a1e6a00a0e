"""The command line: one typed function per verb; no logic beyond argument handling.

A user mistake (MemlmError) prints `error: ...` and `hint: ...` and exits with status 2.
"""

from __future__ import annotations

import json
import os
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
    kind: Annotated[Optional[str], typer.Option(
        help="Model kind: decoder | encdec | rnn | conv (without --preset: tiny, or tiny-<kind>).")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run folder.")] = None,
    task: Annotated[Optional[str], typer.Option(
        help="lm (text) | seq2seq (source -> target pairs: 'default' is the embedded code-to-summary task, "
             "or a .jsonl of {\"source\", \"target\"}).")] = None,
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
    nproc: Annotated[Optional[int], typer.Option(help="Processes on this machine (started through torchrun).")] = None,
    strategy: Annotated[Optional[str], typer.Option(help="With several processes: ddp | fsdp.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run folder's last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any key: model.n_layer=4, train.eval_every=50.")] = None,
):
    """Train a model from scratch or fine-tune one (flags override the config file)."""
    from memlm.train import distributed
    from memlm.train.loop import train as run_training

    flags = {"out_dir": out_dir, "task": task, "corpus": corpus, "steps": steps, "micro_batch": micro_batch,
             "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr, "precision": precision,
             "optimizer": optimizer, "init_from": init_from, "memory_budget": memory_budget, "device": device,
             "nproc": nproc, "strategy": strategy}
    overrides = _parse_set(set_ or [])
    overrides["train"].update({k: v for k, v in flags.items() if v is not None})
    if kind is not None:
        overrides["model"]["kind"] = kind
    if config is None and preset is None and "preset" not in overrides["model"] and not resume:
        preset = "tiny" if kind in (None, "decoder") else f"tiny-{kind}"
    if resume and config is None and out_dir:  # the run folder remembers everything
        config = Path(out_dir) / "config.toml"
    model_cfg, train_cfg = resolve_configs(config, preset, overrides)
    if (train_cfg.nproc > 1 or train_cfg.cpu_offload) and not distributed.launched_by_torchrun():
        _launch_torchrun(train_cfg, config, preset, flags, set_ or [], resume)
    result = run_training(train_cfg, model_cfg, resume=resume, console=console)
    distributed.shutdown()
    if distributed.is_main_process():
        out.print(f"trained {result.final_step} steps: last loss {result.last_loss:.4f}, "
                  f"{result.tokens_per_s:,.0f} tokens/s; run saved in {result.run_dir}")
        _report_peak(result.predicted_peak_bytes)


def _launch_torchrun(train_cfg, config: Optional[Path], preset: Optional[str], flags: dict, sets: list[str],
                     resume: bool) -> None:
    """Replace this process by torchrun running `memlm train` once per rank, with the same settings.

    The ranks get the settings as --config/--preset/--set, so this works however memlm was started;
    they find themselves under torchrun (RANK, WORLD_SIZE) and train instead of launching again.
    """
    from memlm.train import distributed
    from memlm.train.checkpoint import refuse_to_overwrite
    from memlm.train.loop import resolve_device

    # The mistakes we can see from here fail now, with one message, not once per rank.
    distributed.check_config(train_cfg, train_cfg.nproc, resolve_device(train_cfg.device))
    refuse_to_overwrite(train_cfg.out_dir, resume)
    args = ["train"]
    if config is not None:
        args += ["--config", str(config)]
    if preset is not None:
        args += ["--preset", preset]
    for item in sets:
        args += ["--set", item]
    for key, value in flags.items():
        if value is not None and key != "nproc":
            args += ["--set", f"train.{key}={json.dumps(value)}"]  # a JSON string or number is TOML too
    if resume:
        args.append("--resume")
    _exec_torchrun(train_cfg.nproc, args)


def _exec_torchrun(nproc: int, args: list[str]) -> None:
    """Replace this process by torchrun running `memlm ARGS` once per rank."""
    import os

    from memlm.train import distributed

    cmd = distributed.torchrun_command(nproc, args)
    console.print(f"starting {nproc} processes: {' '.join(cmd[1:])}", style="dim", markup=False)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def _report_peak(predicted: int, record: dict | None = None) -> dict:
    """The line every command ends with: the prediction it printed at the start vs the whole
    process's peak resident memory since it started (VmHWM on CPU), on stderr; also into
    `record` (for --json) as predicted_peak_bytes / peak_bytes."""
    from memlm.memory.measure import peak_report, process_peak_rss_bytes

    measured = process_peak_rss_bytes()
    console.print(f"peak memory: {peak_report(predicted, measured)}", style="dim")
    record = {} if record is None else record
    record.update(predicted_peak_bytes=predicted, peak_bytes=measured)
    return record


def _load_fitted(model: str, budget: Optional[str], context: Optional[int], batch: int = 1,
                 prompt_len: Optional[int] = None, compile: bool = False, adapter: Optional[str] = None):
    """Load a model, planned for a budget when one is given; print the one prediction."""
    from memlm.fit import load_for_inference

    fitted = load_for_inference(model, budget, context, batch, prompt_len, compile, adapter)
    console.print(fitted.describe(), style="dim")
    return fitted


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
Compile = Annotated[bool, typer.Option(
    "--compile/--no-compile",
    help="Compile the decode step with torch.compile (the first run of a shape pays the compile; "
         "kernels are cached in ~/.cache/memlm). Falls back to eager when compiling fails.")]


AdapterOpt = Annotated[Optional[str], typer.Option(
    help="A LoRA adapter folder (memlm finetune's run/adapter, or peft's) put on the model.")]


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
    memory_budget: Annotated[Optional[str], typer.Option(help="Quantize/cast the weights to fit e.g. 300MiB.")] = None,
    compile: Compile = False,
    adapter: AdapterOpt = None,
):
    """Continue a prompt, streaming the text to the terminal."""
    from memlm.fit import prompt_tokens_bound

    settings = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, stop, seed)  # checked first
    # The cache is sized for the prompt and the new tokens; the prompt's length is bounded by its
    # bytes before any tokenizer is loaded, so the plan (and its one prediction) comes first.
    room = prompt_tokens_bound(prompt) + (64 if chat else 0)  # the chat template's few tokens
    fitted = _load_fitted(model, memory_budget, room + max_new_tokens, prompt_len=room, compile=compile,
                          adapter=adapter)
    lm = fitted.lm
    text = lm.chat_prompt([{"role": "user", "content": prompt}]) if chat else prompt
    if not chat:  # a decoder continues the prompt; an encoder-decoder answers it
        out.print(prompt, end="\n-> " if lm.config.kind == "encdec" else "", style="bold")
    pieces = lm.stream_pieces(text, **vars(settings))
    if fitted.guard is not None:
        pieces = fitted.guard.watch(pieces)
    for piece in pieces:
        out.print(piece.text, end="", markup=False)
    out.print()
    _report_compile(lm.engine, compile)
    _report_peak(fitted.predicted_peak)


def _report_compile(engine, asked: bool = False) -> None:
    """The compile warm-up, apart from the generation it preceded (or, asked for where the fused
    block op runs instead, that nothing was compiled)."""
    if asked and engine is not None and engine.fused is not None:
        console.print("decode runs memlm's fused block op: --compile has nothing left to compile", style="dim")
    if engine is not None and engine.compiled and engine.compile_seconds:
        from memlm.infer.engine import inductor_cache_dir

        console.print(f"decode step compiled in {engine.compile_seconds:.1f} s (kernels cached in "
                      f"{inductor_cache_dir()})", style="dim")


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
    memory_budget: Annotated[Optional[str], typer.Option(help="Quantize/cast the weights to fit e.g. 300MiB.")] = None,
    context: Annotated[Optional[int], typer.Option(help="Longest conversation in tokens (default: the model's).")] = None,
    compile: Compile = False,
    adapter: AdapterOpt = None,
):
    """Talk to an instruct model. /reset clears the history, /exit leaves."""
    settings = _sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, [], seed)  # checked first
    fitted = _load_fitted(model, memory_budget, context, compile=compile, adapter=adapter)
    lm = fitted.lm
    lm.chat_prompt([{"role": "user", "content": "hi"}])  # fail now, not after the first question
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
        pieces = lm.stream_pieces(lm.chat_prompt(history), **vars(settings))
        if fitted.guard is not None:
            pieces = fitted.guard.watch(pieces)
        for piece in pieces:
            reply += piece.text
            out.print(piece.text, end="", markup=False)
        out.print()
        history.append({"role": "assistant", "content": reply.strip()})
    _report_compile(lm.engine, compile)
    _report_peak(fitted.predicted_peak)


@app.command()
def serve(
    model: ModelOpt = "smollm2-135m-instruct",
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    memory_budget: Annotated[Optional[str], typer.Option(
        help="Fit the server in e.g. 600MiB: the planner picks the weight format and sizes the KV pool.")] = None,
    context: Annotated[Optional[int], typer.Option(
        help="Longest request (prompt + completion) in tokens: each KV slot's length "
             "(default: the model's context, at most 2048).")] = None,
    slots: Annotated[int, typer.Option(help="Completions decoded together (KV pool slots); fewer when the "
                                            "budget holds fewer.")] = 8,
    queue: Annotated[int, typer.Option(help="Completions that may wait for a slot (429 beyond).")] = 64,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="MEMLM_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every route but /health and the chat page's files.")] = None,
    max_body: Annotated[str, typer.Option(help="Largest request body, e.g. 1MiB (413 beyond).")] = "1MiB",
    request_timeout: Annotated[float, typer.Option(help="Seconds a request may take, waiting included "
                                                        "(408 beyond).")] = 600.0,
    threads: Annotated[Optional[int], typer.Option(
        help="Torch threads for the model (default: torch's, one per core; on a machine busy with other "
             "jobs, 1 is often faster).")] = None,
    compile: Compile = False,
    adapter: AdapterOpt = None,
):
    """Serve a model over an OpenAI-compatible HTTP API with a chat page at / (needs: pip install 'memlm[serve]')."""
    from memlm.config import check_port, check_range
    from memlm.fit import load_for_serving
    from memlm.memory.measure import parse_size
    from memlm.serve.app import serve as run_server

    check_port(port)
    for name, value in (("--slots", slots), ("--queue", queue), ("--request-timeout", request_timeout),
                        ("--threads", threads or 1)):
        check_range("serve", name, value, low=0, low_open=True)
    if threads:
        import torch

        torch.set_num_threads(threads)
    fitted = load_for_serving(model, memory_budget, context, slots, compile, adapter)
    console.print(fitted.describe(), style="dim")
    run_server(fitted, Path(model).name, host, port, api_key=api_key or None, max_body=parse_size(max_body),
               queue_size=queue, request_timeout=request_timeout)
    _report_peak(fitted.predicted_peak)


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
    memory_budget: Annotated[Optional[str], typer.Option(help="Quantize/cast the weights to fit e.g. 300MiB.")] = None,
    adapter: AdapterOpt = None,
    task: Annotated[str, typer.Option(help="lm (perplexity) | classify (a memlm finetune --task classify run).")] = "lm",
    data: Annotated[str, typer.Option(help="classify: JSONL of text and label ('default': the held-out split).")] = "default",
    plot: Annotated[Optional[Path], typer.Option(help="classify: also draw the confusion matrix into this PNG.")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Seq2seq: score the first N pairs only (default: all).")] = None,
):
    """Perplexity of a model on a corpus (default: the embedded eval split, the W2 protocol); --task
    classify: accuracy, macro-F1 and the confusion matrix of a classifier; an encoder-decoder: loss,
    exact match and token F1 on pairs against the copy-the-name baseline."""
    if task == "classify":
        _evaluate_classifier(model, data, plot, as_json)
        return
    if task != "lm":
        raise MemlmError(f"unknown eval task {task!r}", "use --task lm or --task classify")
    from rich.progress import Progress

    from memlm.cleaning import CleanOptions
    from memlm.config import check_range
    from memlm.data import read_corpus
    from memlm.eval.perplexity import perplexity, window_plan
    from memlm.fit import load_for_scoring

    if split not in ("eval", "train", "all"):
        raise MemlmError(f"unknown split '{split}'", "use --split eval, train or all")
    for flag, value in (("--window", window), ("--stride", stride), ("--batch-size", batch_size)):
        if value is not None:
            check_range("eval", flag, value, low=1)
    fitted = load_for_scoring(model, memory_budget, window, batch_size, adapter)
    lm = fitted.lm
    if not as_json:
        console.print(fitted.describe(), style="dim")
    if lm.config.kind == "encdec":
        return _evaluate_pairs(lm, fitted, model, corpus, split, limit, as_json)
    window = min(window, lm.config.block_size)
    docs = read_corpus(corpus, None if split == "all" else split, CleanOptions())  # the default cleaning, as train
    ids = lm.tokenizer.encode("\n\n".join(docs), add_bos=False)
    del docs
    n_windows = len(window_plan(len(ids), window, stride))
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring windows", total=n_windows)
        result = perplexity(lm.model, ids, window, stride, batch_size, on_window=lambda n: bar.advance(task, n),
                            guard=fitted.guard)
    record = {"model": model, "corpus": corpus, "split": split, "window": window, "stride": stride or window,
              "tokens": len(ids), "windows": result.n_windows, "scored": result.n_scored,
              "ppl": result.ppl, "nll": result.nll, "tokens_per_s": result.tokens_per_s}
    if as_json:
        from memlm.memory.measure import process_peak_rss_bytes

        record.update(predicted_peak_bytes=fitted.predicted_peak, peak_bytes=process_peak_rss_bytes())
        out.print_json(json.dumps(record))
    else:
        out.print(f"perplexity {result.ppl:.3f} (nll {result.nll:.4f}) over {result.n_scored:,} tokens in "
                  f"{result.n_windows} windows of {window}; {result.tokens_per_s:,.0f} tokens/s")
        _report_peak(fitted.predicted_peak)


def _evaluate_pairs(lm, fitted, model: str, corpus: str, split: str, limit: Optional[int], as_json: bool) -> None:
    from rich.progress import Progress

    from memlm.cleaning import CleanOptions
    from memlm.eval.seq2seq import evaluate_pairs
    from memlm.pairs import read_pairs

    pairs = read_pairs(corpus, None if split == "all" else split, CleanOptions())[:limit]
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("scoring pairs", total=len(pairs))
        result = evaluate_pairs(lm.model, lm.tokenizer, pairs, on_batch=lambda n: bar.advance(task, n))
    record = {"model": model, "corpus": corpus, "split": split, "pairs": result.pairs, "loss": result.loss,
              "ppl": result.ppl, "exact_match": result.exact_match, "f1": result.f1,
              "baseline_exact_match": result.baseline_exact_match, "baseline_f1": result.baseline_f1,
              "examples": result.examples}
    if as_json:
        from memlm.memory.measure import process_peak_rss_bytes

        record.update(predicted_peak_bytes=fitted.predicted_peak, peak_bytes=process_peak_rss_bytes())
        out.print_json(json.dumps(record))
        return
    for ex in result.examples:
        out.print(f"[dim]source:[/] {ex['source'].strip().splitlines()[0]} ...", markup=True, highlight=False)
        out.print(f"  reference: {ex['reference']}\n  output:    {ex['output']}", markup=False)
    out.print(f"{result.pairs} pairs: loss {result.loss:.4f} (perplexity {result.ppl:.2f}), exact match "
              f"{100 * result.exact_match:.1f}%, token F1 {100 * result.f1:.1f}%; copy-the-name baseline: exact "
              f"match {100 * result.baseline_exact_match:.1f}%, F1 {100 * result.baseline_f1:.1f}%")
    _report_peak(fitted.predicted_peak)


def _evaluate_classifier(run: str, data: str, plot: Optional[Path], as_json: bool) -> None:
    from memlm.eval.classify import confusion_table, plot_confusion
    from memlm.finetune import evaluate_classifier

    result, baseline = evaluate_classifier(run, data)
    if as_json:
        out.print_json(json.dumps({"model": run, "data": data, **result.to_dict(), "baseline": baseline.to_dict()}))
    else:
        out.print(confusion_table(result))
        out.print(f"accuracy {result.accuracy:.4f}, macro-F1 {result.macro_f1:.4f} over {result.n:,} examples "
                  f"(majority class: accuracy {baseline.accuracy:.4f}, macro-F1 {baseline.macro_f1:.4f})")
    if plot is not None:
        console.print(f"confusion matrix drawn in {plot_confusion(result, plot)}", style="dim")


# ---- plan ----------------------------------------------------------------------------------------

@app.command()
def plan(
    model: Annotated[str, typer.Option("--model", "-m", help="A preset (gpt2, tiny, ...), known model or path.")],
    budget: Annotated[Optional[str], typer.Option(help="Memory per process, e.g. 2GiB (without: just predict).")] = None,
    task: Annotated[str, typer.Option(help="train | finetune | infer.")] = "train",
    seq_len: Annotated[Optional[int], typer.Option(help="Training length, or the context for infer.")] = None,
    global_batch_tokens: Annotated[Optional[int], typer.Option(help="Tokens per optimizer step.")] = None,
    world_size: Annotated[int, typer.Option(help="Processes (data parallel).")] = 1,
    device: Annotated[str, typer.Option(help="cpu | cuda.")] = "cpu",
    micro_batch: Annotated[Optional[int], typer.Option(help="Without --budget: sequences per forward pass (infer: concurrent sequences).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Without --budget: fp32 | bf16-autocast | bf16.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="Without --budget: adamw | adamw8bit | adafactor | sgd.")] = None,
    weight_format: Annotated[Optional[str], typer.Option(help="Without --budget, infer: fp32 | bf16 | int8 | int4.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Without --budget: any train key, e.g. train.loss_chunk=256.")] = None,
    lora_r: Annotated[Optional[int], typer.Option(help="finetune: LoRA rank (without: a full fine-tune).")] = None,
    lora_targets: Annotated[str, typer.Option(help="finetune: layers with adapters, or all-linear.")] = "q_proj,v_proj",
    quantize_base: Annotated[str, typer.Option(help="finetune with --lora-r: frozen base fp32 | int8 | int4.")] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
):
    """Predict peak memory: of exactly the settings given, or of the fastest ones that fit --budget."""
    from memlm.config import check_range
    from memlm.loading import model_config_of
    from memlm.memory.plan import plan_for_cli, predict_for_cli, render_plan

    if task not in ("train", "finetune", "infer"):
        raise MemlmError(f"unknown task '{task}'", "use --task train, finetune or infer")
    if device not in ("cpu", "cuda"):
        raise MemlmError(f"plan: unknown device '{device}'", "use --device cpu or --device cuda")
    check_range("plan", "--world-size", world_size, low=1)
    for flag, value in (("--seq-len", seq_len), ("--global-batch-tokens", global_batch_tokens),
                        ("--micro-batch", micro_batch)):
        if value is not None:
            check_range("plan", flag, value, low=1)
    model_cfg = model_config_of(model)
    finetune = None
    if task == "finetune" and lora_r is not None:
        from memlm.adapters.lora import parse_targets
        from memlm.config import PRESETS
        from memlm.loading import layout_of

        finetune = {"lora_r": lora_r, "lora_targets": parse_targets(lora_targets), "base_format": quantize_base,
                    "layout": None if model in PRESETS else (lambda f: {} if f == "fp32" else layout_of(model, f))}
    if budget is None:
        train_keys = _parse_set(set_ or [])["train"]
        flags = {"micro_batch": micro_batch, "precision": precision, "optimizer": optimizer}
        train_keys.update({k: v for k, v in flags.items() if v is not None})
        breakdown = predict_for_cli(model_cfg, task, seq_len, train_keys, world_size, device,
                                    weight_format=weight_format or "fp32", finetune=finetune)
        if as_json:
            out.print_json(json.dumps({"predicted_peak_bytes": breakdown.total, **breakdown.to_dict()}))
        else:
            out.print(breakdown.table())
        return
    chosen = plan_for_cli(model_cfg, task, budget, seq_len, global_batch_tokens, world_size, device, finetune)
    if as_json:
        out.print_json(chosen.to_json())
    else:
        out.print(render_plan(chosen))
    if not chosen.feasible:
        raise typer.Exit(1)


# ---- models in and out ---------------------------------------------------------------------------

@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A known model name or a path.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output folder (hf, safetensors) or .gguf file (gguf).")],
    to: Annotated[str, typer.Option(help="hf | gguf (decoders) | safetensors (any kind; memlm.load reads it).")] = "hf",
    qtype: Annotated[str, typer.Option(help="GGUF tensor type: F32 | F16 | Q8_0 | Q4_1 (int4-g32 models).")] = "F32",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
):
    """Write a model as a Hugging Face folder, a GGUF file or a memlm safetensors folder."""
    from memlm.interop.hf import save_hf
    from memlm.loading import load_model, save_safetensors

    if to not in ("hf", "gguf", "safetensors"):
        raise MemlmError(f"unknown export format '{to}'", "use --to hf, --to gguf or --to safetensors")
    if out_path.exists() and not force:
        raise MemlmError(f"{out_path} already exists", "choose another --out, or pass --force to replace it")
    lm, tokenizer = load_model(model)
    if to == "safetensors":
        save_safetensors(lm, tokenizer, out_path)
    elif to == "hf":
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


# ---- compress / distill --------------------------------------------------------------------------

@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="A known model name or a path.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output folder (loads with memlm.load).")],
    method: Annotated[list[str], typer.Option(
        "--method", help="int8 | int4 | int3 | gptq4 | gptq3 | prune | prune24 | prune-ffn | prune-heads | lowrank; "
                         "repeat to compose (applied in order, a quantization last).")],
    group_size: Annotated[int, typer.Option(help="int4/int3/gptq group size: 128, 64 or 32 (an upper bound).")] = 128,
    sparsity: Annotated[float, typer.Option(help="prune: fraction of weights zeroed.")] = 0.5,
    keep: Annotated[float, typer.Option(help="prune-ffn / prune-heads: fraction of neurons / KV heads kept.")] = 0.75,
    rank: Annotated[Optional[int], typer.Option(help="lowrank: one rank for every layer.")] = None,
    energy: Annotated[Optional[float], typer.Option(help="lowrank: keep this fraction of the spectrum (default 0.9).")] = None,
    act_order: Annotated[bool, typer.Option("--act-order", help="gptq: columns with the most input energy first.")] = False,
    calib_tokens: Annotated[int, typer.Option(help="Calibration tokens for gptq / prune-ffn / prune-heads.")] = 16384,
    calib_corpus: Annotated[str, typer.Option(help="Calibration text: 'default' or a path (its train split).")] = "default",
    quantize_embedding: Annotated[Optional[str], typer.Option(help="int8: quantize the embedding (and tied head) too.")] = None,
    eval_tokens: Annotated[Optional[int], typer.Option(help="Perplexity on the first N eval tokens only (default: all).")] = None,
    eval_corpus: Annotated[str, typer.Option(help="Perplexity text: 'default' or a path (its eval split).")] = "default",
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the perplexity before and after.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    memory_budget: Annotated[Optional[str], typer.Option(
        help="Fit the run in e.g. 900MiB: refused up front if it cannot; skips the float32 perplexity before "
             "(and loads straight into int8/int4) when only that fits.")] = None,
):
    """Compress a model (quantize, prune, factor) and save it; prints sizes, perplexity and memory."""
    from memlm.compress.pipeline import CompressOptions, compress_to_folder, plan_compress

    options = CompressOptions(
        group_size=group_size, sparsity=sparsity, keep=keep, rank=rank, energy=energy, act_order=act_order,
        calib_tokens=calib_tokens, calib_corpus=calib_corpus, quantize_embedding=quantize_embedding,
        eval=not no_eval, eval_corpus=eval_corpus, eval_tokens=eval_tokens, progress=not as_json,
    )
    plan = plan_compress(model, method, options, memory_budget)
    if not as_json:
        console.print(plan.describe(), style="dim")
    summary = compress_to_folder(model, out_path, method, options, console=console, plan=plan)
    if as_json:
        from memlm.memory.measure import process_peak_rss_bytes

        record = summary.to_dict()
        record.update(predicted_peak_bytes=plan.predicted_peak, peak_bytes=process_peak_rss_bytes())
        out.print_json(json.dumps(record))
        return
    out.print(summary.table())
    for note in summary.notes:
        out.print(f"note: {note}", style="dim")
    out.print(f"saved to {summary.out} ({summary.seconds:.1f} s compressing)")
    _report_peak(plan.predicted_peak)


@app.command()
def distill(
    teacher: Annotated[str, typer.Option(help="The teacher: a known model name or a path.")],
    student_config: Annotated[Optional[Path], typer.Option(help="TOML file with the student's model (and train) sections.")] = None,
    student_preset: Annotated[Optional[str], typer.Option(help="The student's model preset: tiny, ...")] = None,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run folder of the student.")] = None,
    corpus: Annotated[Optional[str], typer.Option(help="'default', a file, folder, glob or .jsonl.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps.")] = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="Sequences per forward pass.")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Training context length.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the soft targets.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the distillation term (1 - alpha: cross-entropy).")] = 0.5,
    teacher_quant: Annotated[Optional[str], typer.Option(help="int8 | int4: quantize the teacher to save memory.")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(help="Fit teacher + student training in e.g. 2GiB.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any key: model.n_layer=4, train.eval_every=50.")] = None,
):
    """Train a small student on a teacher's softened predictions (knowledge distillation)."""
    from memlm.train.distill import distill as run_distill

    if student_config is None and student_preset is None:
        raise MemlmError("no student model given", "pass --student-config FILE.toml or --student-preset NAME")
    flags = {"out_dir": out_dir, "corpus": corpus, "steps": steps, "micro_batch": micro_batch, "seq_len": seq_len,
             "lr": lr, "memory_budget": memory_budget}
    overrides = _parse_set(set_ or [])
    overrides["train"].update({k: v for k, v in flags.items() if v is not None})
    model_cfg, train_cfg = resolve_configs(student_config, student_preset, overrides)
    result = run_distill(teacher, train_cfg, model_cfg, temperature, alpha, teacher_quant, console=console)
    out.print(f"distilled {result.final_step} steps: last loss {result.last_loss:.4f}, "
              f"{result.tokens_per_s:,.0f} tokens/s; student saved in {result.run_dir}")
    _report_peak(result.predicted_peak_bytes)


# ---- sweep ---------------------------------------------------------------------------------------

@app.command()
def sweep(
    budget: Annotated[str, typer.Option(help="Memory per training run, e.g. 1GiB: only sizes that fit are tried.")],
    time: Annotated[str, typer.Option("--time", help="Training time for the whole ladder, e.g. 10m (equal shares).")],
    preset: Annotated[str, typer.Option(help="The flavour every size is scaled from.")] = "tiny",
    rungs: Annotated[int, typer.Option(help="How many sizes to train.")] = 4,
    out_dir: Annotated[str, typer.Option("--out", help="Folder of the sweep (a run folder per size).")] = "runs/sweep",
    corpus: Annotated[str, typer.Option(help="'default' or a path; held-out loss on its eval split.")] = "default",
    seq_len: Annotated[Optional[int], typer.Option(help="Training context length.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any key: model.positions=rope, train.lr=3e-3.")] = None,
):
    """Choose a model size by validation: train a ladder of sizes that fit the budget, each for its
    share of the time, and recommend the one with the lowest held-out loss (with a plot and its plan)."""
    from memlm.config import check_range
    from memlm.sweep import describe, parse_duration, recommendation
    from memlm.sweep import sweep as run_sweep

    check_range("sweep", "--rungs", rungs, low=1)
    seconds = parse_duration(time)
    overrides = _parse_set(set_ or [])
    overrides["train"].update({k: v for k, v in {"corpus": corpus, "seq_len": seq_len}.items() if v is not None})
    if Path(out_dir).exists():
        raise MemlmError(f"{out_dir} already exists", "choose another --out")
    base, train_cfg = resolve_configs(None, preset, overrides)
    result = run_sweep(base, train_cfg, budget, seconds, out_dir, rungs, console=console)
    out.print(describe(result), markup=False)
    out.print(f"recommended for {budget}: [bold]{result.best.name}[/] ({result.best.params:,} parameters, "
              f"held-out loss {result.best.eval_loss:.4f}); plot {result.plot}; results {Path(out_dir) / 'sweep.json'}")
    out.print(recommendation(result))


# ---- finetune / merge ----------------------------------------------------------------------------

DEMO_QUESTIONS = 3  # held-out questions answered before and after `memlm finetune` with no arguments
DEMO_BUDGET = "2GiB"  # ... and the memory budget it runs in (QLoRA int4 on SmolLM2 fits with room to spare)


@app.command()
def finetune(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="The base: a known model name or a path.")] = "smollm2-135m-instruct",
    data: Annotated[str, typer.Option(help="JSONL with 'text' or chat 'messages' (--task classify: 'text' and "
                                           "'label'); 'default': the embedded set.")] = "default",
    task: Annotated[str, typer.Option(help="lm | classify.")] = "lm",
    out_dir: Annotated[str, typer.Option("--out", help="Run folder.")] = "runs/finetune",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    lora_alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha / r).")] = 16.0,
    lora_dropout: Annotated[float, typer.Option(help="Dropout on the adapters' input.")] = 0.0,
    lora_targets: Annotated[str, typer.Option(help="Layers to adapt, e.g. q_proj,v_proj, or all-linear.")] = "q_proj,v_proj",
    quantize_base: Annotated[str, typer.Option(help="Frozen base format: int4 (QLoRA) | int8 | none.")] = "int4",
    full: Annotated[bool, typer.Option("--full", help="Train every weight (no adapters, float base).")] = False,
    pooling: Annotated[str, typer.Option(help="--task classify: last (real token) | mean.")] = "last",
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    micro_batch: Annotated[int, typer.Option(help="Sequences per forward pass.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    seq_len: Annotated[int, typer.Option(help="Longest example in tokens (longer ones are cut).")] = 512,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (default 2e-4 for LoRA, 5e-5 --full).")] = None,
    memory_budget: Annotated[Optional[str], typer.Option(
        help="Fit the run in e.g. 2GiB: the planner picks rank, checkpointing, base format and micro-batch.")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    nproc: Annotated[int, typer.Option(help="Processes on this machine (started through torchrun; DDP: each "
                                            "holds the base and takes its share of the micro-batch).")] = 1,
    strategy: Annotated[str, typer.Option(help="With several processes: ddp | fsdp (fsdp: --full only).")] = "ddp",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run folder's last checkpoint.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Any train key: train.eval_every=50.")] = None,
):
    """Fine-tune a pretrained model with LoRA / QLoRA adapters (or fully) on instruction or classification data."""
    from memlm.config import TrainConfig
    from memlm.finetune import FinetuneConfig, answers, finetune as run_finetune
    from memlm.train import distributed

    bare = len(sys.argv) <= 2 and not set_  # `memlm finetune` alone: the demo of the family
    if bare and memory_budget is None:
        memory_budget = DEMO_BUDGET  # a budget chosen for you: the planner fits the run inside it
    fcfg = FinetuneConfig(model=model, data=data, task=task, lora_r=lora_r, lora_alpha=lora_alpha,
                          lora_dropout=lora_dropout, lora_targets=lora_targets, full=full, pooling=pooling,
                          quantize_base=None if full or quantize_base == "none" else quantize_base)
    keys = {"out_dir": out_dir, "steps": steps, "micro_batch": micro_batch, "grad_accum": grad_accum,
            "seq_len": seq_len, "lr": lr if lr is not None else (5e-5 if full else 2e-4), "device": device,
            "memory_budget": memory_budget, "warmup_steps": max(1, steps // 10), "eval_every": steps,
            "save_every": max(1, steps // 2), "log_every": 5, "nproc": nproc, "strategy": strategy}
    keys["min_lr"] = keys["lr"] / 10
    keys.update(_parse_set(set_ or [])["train"])
    train_cfg = TrainConfig.from_dict(keys)
    if train_cfg.nproc > 1 and not distributed.launched_by_torchrun():
        _relaunch_finetune(ctx, fcfg, train_cfg, resume)
    result, ft = run_finetune(fcfg, train_cfg, resume=resume, console=console, before=DEMO_QUESTIONS if bare else 0)
    distributed.shutdown()
    if not distributed.is_main_process():
        return  # rank 0 alone reports
    out.print(f"fine-tuned {result.final_step} steps ({fcfg.method}): held-out loss "
              + (f"{ft.eval_before:.4f} -> " if ft.eval_before is not None else "")
              + f"{result.eval_losses[-1][1]:.4f}; {result.tokens_per_s:,.0f} tokens/s; run saved in {result.run_dir}")
    if ft.before_answers:
        from rich.table import Table

        table = Table(title="held-out questions: before and after fine-tuning (greedy)")
        for col in ("question", "before", "after", "reference"):
            table.add_column(col, overflow="fold")
        after = answers(ft.model, ft.tokenizer, [q for q, _ in ft.before_answers])
        for (q, before), a, ref in zip(ft.before_answers, after, ft.references):
            table.add_row(q, before, a, ref)
        out.print(table)
    _report_peak(result.predicted_peak_bytes)


def _relaunch_finetune(ctx: typer.Context, fcfg, train_cfg, resume: bool) -> None:
    """Replace this process by torchrun running this very `memlm finetune` once per rank (the
    ranks see that torchrun started them and fine-tune instead of launching again)."""
    from memlm.finetune import check_processes
    from memlm.train.checkpoint import refuse_to_overwrite

    check_processes(fcfg, train_cfg)  # the mistakes we can see from here fail now, once
    refuse_to_overwrite(train_cfg.out_dir, resume)
    # (the ranks learn their number from torchrun: WORLD_SIZE)
    _exec_torchrun(train_cfg.nproc, ["finetune", *_command_line(ctx, leave_out=("nproc",))])


def _command_line(ctx: typer.Context, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The options a command was called with, as arguments that give them again."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not getattr(param, "opts", None) or param.name in leave_out:
            continue
        if getattr(param, "is_flag", False):
            if value:
                args.append(param.opts[0])
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
            continue
        for item in (value if param.multiple else [value]):
            args += [param.opts[0], str(item)]
    return args


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="An adapter folder, or a memlm finetune run folder.")],
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Output folder (loads with memlm.load).")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="The base (default: the one the adapter names).")] = None,
    weight_format: Annotated[Optional[str], typer.Option(
        help="Merge into this base format: fp32 (exact) | int8 | int4 (default: what the run was trained on).")] = None,
    eval_tokens: Annotated[int, typer.Option(help="Perplexity before/after on this many eval tokens (0: skip).")] = 4096,
):
    """Fold a LoRA adapter into its base's weights and save the merged model."""
    from memlm.finetune import merge_adapter

    r = merge_adapter(adapter, out_path, model, weight_format, eval_tokens)
    out.print(f"merged {r.layers} adapted layers into a {r.weight_format} base; saved to {r.out}")
    if r.ppl_adapter is not None:
        exact = r.weight_format in ("fp32", "bf16")
        out.print(f"perplexity on {eval_tokens:,} eval tokens: adapter {r.ppl_adapter:.4f}, merged {r.ppl_merged:.4f} "
                  f"({100 * (r.ppl_merged / r.ppl_adapter - 1):+.3f}%); largest logit change {r.max_logit_diff:.2e}"
                  + (" (float: exact up to rounding)" if exact else f" (re-quantized to {r.weight_format})"))


# ---- demo ----------------------------------------------------------------------------------------

@app.command()
def demo(
    out_dir: Annotated[str, typer.Option("--out", help="Run folder.")] = "runs/demo",
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: what fits 150 s here).")] = None,
    memory_budget: Annotated[str, typer.Option(help="The whole demo stays inside this, e.g. 1GiB.")] = "1GiB",
):
    """The main job on the embedded default: train `tiny` on the Python reference, evaluate, sample."""
    from memlm.demo import run_demo

    result = run_demo(out_dir, steps, console, out, memory_budget)
    _report_peak(result["predicted_peak_bytes"])


def run() -> None:
    """The `memlm` program (console script and `python -m memlm`): main() in a process of its own."""
    if sys.argv[1:2] == ["serve"] and "OMP_WAIT_POLICY" not in os.environ:
        # A server's torch threads share the cores with its event loop, tokenizer and sockets.
        # OpenMP's threads spin after every parallel region by default and take a core from
        # them: SmolLM2 int4 over HTTP on 2 cores, 1 client 29 -> 41 tokens/s and 16 clients
        # 87 -> 139 with passive waiting (bench/serve_load). libgomp reads the policy when torch
        # loads it, already done by now, so the server starts again with it set. (A batch-1
        # generation is the other way round: its many small regions want the spinning, 36-49
        # tokens/s passive against 79-83.)
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.execv(sys.executable, [sys.executable, "-m", "memlm", *sys.argv[1:]])
    from memlm.memory.measure import note_start

    note_start()  # torch and memlm imported, no command run yet: see memlm.memory.estimate.runtime_bytes
    main()


def main() -> None:
    try:
        try:
            app()
        except OSError as e:  # a disk or a folder that failed where no command expected it: still one line
            from memlm.errors import io_error

            raise io_error(e, "read or write a file") from e
    except MemlmError as e:
        console.print(f"{e.label}: {e.message}", style="bold red", markup=False, soft_wrap=True)
        if e.hint:
            console.print(f"hint: {e.hint}", markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted", style="red")
        sys.exit(130)
