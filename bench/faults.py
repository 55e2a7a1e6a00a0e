"""The long fault-injection run (issue 15): what tests/faults does a few times, many times, counted.

  kills      one tiny `memlm train` run (a checkpoint every step) SIGKILLed at random moments
             (--kills, at least 50), resumed each time, then finished: its final weights, optimizer
             state and every loss must equal the same run done in one go, bit for bit
  disk       a run on a tmpfs turned read-only or filled up at random moments (--disk-faults of
             each), each one line + exit 2 with the committed checkpoint intact, resumed, then
             finished and compared the same way (needs root to mount; skipped otherwise)
  corrupt    a bit flipped at a random place in every file of a checkpoint and of a compressed
             model (--flips per file): each must be named on load
  fuzz       every reader of user files (tests/faults/readers.py) under atheris, coverage-guided,
             for --fuzz-seconds each (libFuzzer also stops on a hang over 10 s or a process over
             2 GiB); hypothesis instead where atheris is not installed (pip install 'memlm[fuzz]')

Writes bench/results/faults-<date>.json and .md with every count and the failures (0 to pass).
It runs only while /tmp/memlm-bench-running is absent (another benchmark measures speed then)
and records the load average, since the machine may be shared.

    python bench/faults.py                     # the full run (about 20 minutes on 2 cores)
    python bench/faults.py --kills 5 --disk-faults 1 --flips 2 --fuzz-seconds 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work" / "faults"
QUIET_FLAG = Path("/tmp/memlm-bench-running")


def wait_for_quiet() -> None:
    """Another benchmark is measuring speed while the flag exists: wait until it is gone."""
    while QUIET_FLAG.exists():
        print(f"{QUIET_FLAG} exists: waiting", flush=True)
        time.sleep(60)


def inputs() -> tuple[Path, Path]:
    """A corpus file and a tokenizer, as tests/conftest.py makes them."""
    from memlm.data import default_corpus_text
    from memlm.tokenizer import train_bpe

    corpus, tok = WORK / "corpus.txt", WORK / "tok"
    if not corpus.is_file():
        corpus.write_text(default_corpus_text()[:60_000], encoding="utf-8")
    if not (tok / "tokenizer.json").is_file():
        train_bpe([corpus.read_text(encoding="utf-8")], vocab_size=320).save(tok)
    return corpus, tok


# ------------------------------------------------------------------------------ phases


def kills(n: int, rng: random.Random) -> dict[str, Any]:
    from tests.faults.harness import TinyRun, assert_same_run, finish, inject, reference

    corpus, tok = inputs()
    spec = TinyRun(corpus, tok, steps=max(60, 8 * n))
    run, logs = WORK / "kills" / "run", WORK / "kills" / "logs"
    shutil.rmtree(run.parent, ignore_errors=True)
    logs.mkdir(parents=True)
    records, failures = [], []
    for i in range(n):
        wait_for_quiet()
        try:
            records.append(inject(spec, run, "SIGKILL", rng, logs / f"life-{i}.log"))
        except AssertionError as e:
            failures.append(f"kill {i}: {e}")
    try:
        finish(spec, run, logs / "last.log")
        assert_same_run(run, reference(spec, WORK / "kills" / "reference"))
        identical = True
    except AssertionError as e:
        failures.append(f"final run: {e}")
        identical = False
    return {"phase": "SIGKILL at random moments", "faults": len(records),
            "in_a_save": sum(r["in_a_save"] for r in records), "steps": spec.steps,
            "bit_identical": identical, "failures": failures}


def disk_faults(n: int, rng: random.Random) -> dict[str, Any]:
    from tests.faults.harness import TinyRun, assert_same_run, finish, inject, mount_disk, reference, unmount

    corpus, tok = inputs()
    spec = TinyRun(corpus, tok, steps=max(60, 16 * n))
    base = WORK / "disk"
    shutil.rmtree(base, ignore_errors=True)
    (base / "logs").mkdir(parents=True)
    disk = mount_disk(base / "mnt")
    if disk is None:
        return {"phase": "disk read-only / full at random moments", "skipped": "cannot mount a tmpfs (needs root)",
                "faults": 0, "failures": []}
    records, failures = [], []
    try:
        run = disk.mount_point / "run"
        plan = ["read-only", "full"] * n
        rng.shuffle(plan)
        for i, fault in enumerate(plan):
            wait_for_quiet()
            try:
                records.append(inject(spec, run, fault, rng, base / "logs" / f"life-{i}.log", disk))
            except AssertionError as e:
                failures.append(f"{fault} {i}: {e}")
        try:
            finish(spec, run, base / "logs" / "last.log")
            assert_same_run(run, reference(spec, base / "reference"))
            identical = True
        except AssertionError as e:
            failures.append(f"final run: {e}")
            identical = False
    finally:
        unmount(disk)
    return {"phase": "disk read-only / full at random moments", "faults": len(records),
            "read_only": sum(r["fault"] == "read-only" for r in records),
            "full": sum(r["fault"] == "full" for r in records),
            "in_a_save": sum(r["in_a_save"] for r in records), "bit_identical": identical, "failures": failures}


def corruption(flips: int, rng: random.Random) -> dict[str, Any]:
    from memlm.compress.storage import load_compressed
    from memlm.errors import MemlmError
    from memlm.train.checkpoint import CheckpointDamaged, latest_checkpoint, verify_checkpoint

    seeds = _seeds()
    targets = []
    for kind in ("run", "sharded"):
        ckpt = latest_checkpoint(seeds.root / kind)
        targets += [(kind, ckpt, p.relative_to(ckpt)) for p in sorted(ckpt.rglob("*")) if p.is_file()]
    compressed = seeds.root / "compressed"
    targets += [("compressed", compressed, p.relative_to(compressed)) for p in sorted(compressed.iterdir())]
    detected, unchanged, failures = 0, 0, []
    scratch = WORK / "corrupt"
    for kind, folder, name in targets:
        original = (folder / name).read_bytes()
        for _ in range(flips):
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.copytree(folder, scratch)
            data = bytearray(original)
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
            (scratch / name).write_bytes(bytes(data))
            if name.suffix == ".json" and _same_json(original, bytes(data)):
                unchanged += 1  # e.g. 1e-08 -> 1E-08: the same content
                continue
            try:
                verify_checkpoint(scratch) if kind != "compressed" else load_compressed(scratch)
                failures.append(f"{kind}/{name}: bit flipped at byte {at} was not noticed")
            except MemlmError as e:  # a checkpoint's damage is CheckpointDamaged; a compressed folder's, one line
                if name.name in e.message and (kind == "compressed" or isinstance(e, CheckpointDamaged)):
                    detected += 1
                else:
                    failures.append(f"{kind}/{name}: byte {at}: {e}")
    shutil.rmtree(scratch, ignore_errors=True)
    return {"phase": "a bit flipped in each file", "files": len(targets), "faults": detected + unchanged + len(failures),
            "detected": detected, "same_content": unchanged, "failures": failures}


def _same_json(a: bytes, b: bytes) -> bool:
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return False


def _seeds():
    from tests.faults.readers import Seeds

    root = WORK / "seeds"
    if not (root / "compressed" / "memlm_model.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        corpus, tok = inputs()
        return Seeds.make(root, corpus, tok)
    return Seeds(root)


def fuzz(seconds: float) -> list[dict[str, Any]]:
    from tests.faults.readers import SOURCES, TARGETS

    seeds = _seeds()
    try:
        import atheris  # noqa: F401
        engine = "atheris"
    except ImportError:
        engine = "hypothesis"
    rows = []
    for kind in sorted(TARGETS):
        wait_for_quiet()
        corpus_dir = WORK / "fuzz-corpus" / kind
        shutil.rmtree(corpus_dir, ignore_errors=True)
        corpus_dir.mkdir(parents=True)
        shutil.copy(seeds.root / SOURCES[kind], corpus_dir / "seed")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fuzz-worker", kind, "--engine", engine,
               "--fuzz-seconds", str(seconds), str(corpus_dir)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=WORK,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        wall = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        runs = re.findall(r"Done (\d+) runs", out) or re.findall(r"hypothesis cases: (\d+)", out)
        failed = proc.returncode != 0
        rows.append({"phase": f"fuzz {kind}", "engine": engine, "faults": int(runs[-1]) if runs else 0,
                     "seconds": round(wall, 1), "failures": [out[-3000:]] if failed else []})
        print(f"fuzz {kind}: {rows[-1]['faults']} cases in {wall:.0f} s, {'FAILED' if failed else 'ok'}", flush=True)
    return rows


def fuzz_worker(kind: str, engine: str, seconds: float, corpus_dir: str) -> None:
    """One reader under the fuzzer, in its own process (libFuzzer ends the process when done)."""
    import torch

    torch.set_num_threads(1)
    work = WORK / "fuzz-work" / kind
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if engine == "atheris":
        import atheris

        with atheris.instrument_imports(include=["memlm"]):
            import memlm.cli  # noqa: F401  every module a reader runs, instrumented for coverage
            import memlm.compress.storage  # noqa: F401
            import memlm.interop.gguf  # noqa: F401
            import memlm.interop.hf  # noqa: F401
            import memlm.train.checkpoint  # noqa: F401
            import memlm.train.dcp_storage  # noqa: F401
            from tests.faults.readers import Seeds, run_target
        seeds = Seeds(WORK / "seeds")

        def one_input(data: bytes) -> None:
            run_target(kind, seeds, data, work)  # anything but a one-line MemlmError is a crash

        atheris.Setup([sys.argv[0], corpus_dir, f"-max_total_time={int(seconds)}", "-timeout=10",
                       "-rss_limit_mb=2048", "-print_final_stats=1"], one_input)
        atheris.Fuzz()
    else:  # random inputs from the test suite's strategies, for as long as asked (no coverage guidance)
        import warnings

        from tests.faults import test_fuzz
        from tests.faults.readers import Seeds, run_target

        seeds = Seeds(WORK / "seeds")
        seed = seeds.bytes_of(kind)
        strategy = test_fuzz.json_mutations(seed) if kind in test_fuzz.JSON_KINDS else test_fuzz.mutations(seed)
        count, deadline = 0, time.monotonic() + seconds
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # .example() outside a test says it is meant for the shell
            while time.monotonic() < deadline:
                run_target(kind, seeds, strategy.example(), work)
                count += 1
        print(f"hypothesis cases: {count}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--disk-faults", type=int, default=10, help="read-only and full faults, each")
    ap.add_argument("--flips", type=int, default=20, help="bit flips per file")
    ap.add_argument("--fuzz-seconds", type=float, default=60, help="per reader")
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--fuzz-worker", help=argparse.SUPPRESS)
    ap.add_argument("--engine", help=argparse.SUPPRESS)
    ap.add_argument("corpus_dir", nargs="?", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fuzz_worker:
        fuzz_worker(args.fuzz_worker, args.engine, args.fuzz_seconds, args.corpus_dir)
        return
    if QUIET_FLAG.exists():
        sys.exit(f"{QUIET_FLAG} exists: another benchmark is measuring speed; run this once it is gone")

    import torch

    torch.set_num_threads(1)
    WORK.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    load_before, t0 = load_average(), time.monotonic()
    rows = [kills(args.kills, rng), disk_faults(args.disk_faults, rng), corruption(args.flips, rng),
            *fuzz(args.fuzz_seconds)]
    minutes = (time.monotonic() - t0) / 60
    failures = sum(len(r["failures"]) for r in rows)
    table = [{"phase": r["phase"], "faults or cases": r["faults"],
              "detail": ", ".join(f"{k} {v}" for k, v in r.items()
                                  if k not in ("phase", "faults", "failures")),
              "failures": len(r["failures"])} for r in rows]
    notes = (f"Seed {args.seed}; {minutes:.0f} minutes; load average {load_before} at the start, {load_average()} "
             f"at the end (a shared 2-core machine: the counts do not depend on speed). Failures: {failures}.")
    write_results("faults", table, extra={"rows_detail": rows, "seed": args.seed, "minutes": minutes,
                                          "load_before": load_before, "load_after": load_average(),
                                          "failures": failures}, notes=notes)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
