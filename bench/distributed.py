"""One process against two (DDP, FSDP) on this machine's CPU, through memlm's one training loop.

Workload: the `tiny` preset widened to n_embd 512 (ffn 1,536; about 15M parameters), a BPE
tokenizer of 4,096 ids trained once on the default corpus, global micro-batch 8 x 128 tokens,
AdamW, fp32. Every row is a fresh run of `memlm.train.train` in fresh processes (a plain
subprocess for one process, torchrun for two), so each peak RSS is that run's alone. Rows:

    1 process, 1 thread     the reference
    1 process, 2 threads    the same two cores, used by one process
    2 x DDP, 1 thread each  a full copy per rank, gradients all-reduced (gloo)
    2 x FSDP, 1 thread each weights, gradients, optimizer states sharded over the ranks

Columns: tokens/s of the whole job (the global batch; the first step included, eval and
checkpoint saving excluded), peak RSS of the largest rank (VmHWM over the training session:
Python, torch and everything), the exact bytes of weights + gradients + optimizer states one
rank holds (TrainResult.state_bytes: FSDP's local shards), and the last loss (the same for all
rows up to float rounding: the runs are the same optimization).

Peak RSS is measured twice, in two runs of the row: with glibc's default allocator settings,
and with MALLOC_MMAP_THRESHOLD_=65536. By default glibc raises its mmap threshold each time a
large block is freed, after which blocks of that size come from the heap and stay resident when
freed; FSDP allocates and frees a block's gathered weights and gradients over and over, so its
RSS then says more about the allocator than about what is live. A fixed threshold gives every
large tensor back to the kernel when freed (the 2-thread row is left out of this pass: its
memory is the 1-thread row's).

    python bench/distributed.py                 # 20 steps per row
    python bench/distributed.py --steps 8 --n-embd 256
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402

MiB = 2**20
ROWS: list[dict[str, Any]] = [
    {"row": "1 process, 1 thread", "nproc": 1, "threads": 1, "strategy": "ddp"},
    {"row": "1 process, 2 threads", "nproc": 1, "threads": 2, "strategy": "ddp"},
    {"row": "2 x DDP, 1 thread each", "nproc": 2, "threads": 1, "strategy": "ddp"},
    {"row": "2 x FSDP, 1 thread each", "nproc": 2, "threads": 1, "strategy": "fsdp"},
]


def _worker(spec_path: str) -> None:
    """One rank (or the single process) of a row: train, and rank 0 writes the result."""
    from memlm.config import ModelConfig, TrainConfig
    from memlm.train import distributed, train

    spec = json.loads(Path(spec_path).read_text())
    result = train(TrainConfig.from_dict(spec["train"]), ModelConfig.from_dict(spec["model"]))
    distributed.shutdown()
    if distributed.is_main_process():
        Path(spec["result"]).write_text(json.dumps({**dataclasses.asdict(result), "run_dir": str(result.run_dir)}))


FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _run_row(row: dict[str, Any], model: dict, train_d: dict, tmp: Path, env: dict[str, str] | None = None
             ) -> dict[str, Any]:
    name = row["row"].replace(" ", "").replace(",", "-") + ("-fixed-mmap" if env else "")
    spec = tmp / f"{name}.json"
    result = tmp / f"{name}.result.json"
    train_d = {**train_d, "out_dir": str(tmp / name), "threads": row["threads"], "strategy": row["strategy"],
             "nproc": row["nproc"]}
    spec.write_text(json.dumps({"model": model, "train": train_d, "result": str(result)}))
    if row["nproc"] == 1:
        cmd = [sys.executable, __file__, "--worker", str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={row['nproc']}",
               __file__, "--worker", str(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(row["threads"]), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"{row['row']} failed:\n{proc.stderr[-4000:]}")
    r = json.loads(result.read_text())
    return {
        "row": row["row"],
        "processes": row["nproc"],
        "tokens_per_s": r["tokens_per_s"],
        "peak_rss_mib_per_rank": r["peak_bytes"] / MiB,
        "state_mib_per_rank": r["state_bytes"] / MiB,
        "last_loss": r["last_loss"],
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-embd", type=int, default=512)
    args = parser.parse_args()

    from memlm.config import preset
    from memlm.data import read_corpus
    from memlm.model import Decoder
    from memlm.tokenizer import train_bpe

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        tokenizer = train_bpe(read_corpus("default", "train"), 4096)
        tokenizer.save(tmp / "tok")
        model_cfg = preset("tiny", n_embd=args.n_embd, ffn_hidden=3 * args.n_embd, vocab_size=tokenizer.vocab_size)
        model = model_cfg.to_dict()
        train_d = dict(corpus="default", tokenizer=str(tmp / "tok"), steps=args.steps, micro_batch=8, seq_len=128,
                     lr=1e-3, min_lr=1e-4, warmup_steps=5, eval_every=0, eval_batches=1, save_every=0,
                     log_every=5, device="cpu", seed=1337)
        rows = []
        for row in ROWS:
            print(f"running {row['row']} ...", flush=True)
            rows.append(_run_row(row, model, train_d, tmp))
            if row["threads"] == 1:
                print(f"running {row['row']} with {FIXED_MMAP} ...", flush=True)
                fixed = _run_row(row, model, train_d, tmp, FIXED_MMAP)
                rows[-1]["peak_rss_mib_fixed_mmap"] = fixed["peak_rss_mib_per_rank"]
        ref = rows[0]
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / ref["tokens_per_s"]
            r["state_vs_1_process"] = r["state_mib_per_rank"] / ref["state_mib_per_rank"]
        params = Decoder(model_cfg).num_params()
        notes = (f"Model: `tiny` with n_embd {args.n_embd} ({params:,} parameters), vocab 4,096, global micro-batch "
                 f"8 x 128 tokens, AdamW fp32, {args.steps} steps per row; gloo on CPU. tokens/s is the whole job's; "
                 "peak RSS and state are per rank (the largest rank); peak RSS with glibc's defaults and with "
                 "MALLOC_MMAP_THRESHOLD_=65536 (see the bench's docstring). This 2-core machine was shared with other "
                 "benchmarks while it ran, so tokens/s are indicative; the state bytes are exact.")
        write_results("distributed", rows,
                      extra={"model": model, "train": train_d, "parameters": params},
                      columns=["row", "processes", "tokens_per_s", "speedup", "peak_rss_mib_per_rank",
                               "peak_rss_mib_fixed_mmap", "state_mib_per_rank", "state_vs_1_process", "last_loss"],
                      notes=notes)


if __name__ == "__main__":
    main()
