"""The encoder-decoder on the embedded code-to-summary task (issue 17 part 2), through the CLI:
`memlm train --kind encdec --task seq2seq` for a fixed time, then `memlm eval --json` on the
eval split: loss, exact match and token F1 of greedy outputs against the copy-the-name baseline.

    python -m bench.seq2seq                 # 300 s of training
    python -m bench.seq2seq --train-s 120
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.architectures import _peak_line, memlm  # noqa: E402
from bench.common import load_average, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work" / "seq2seq"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-s", type=float, default=300.0)
    args = parser.parse_args()
    if WORK.exists():
        shutil.rmtree(WORK)
    load_before = load_average()
    proc = memlm("train", "--kind", "encdec", "--task", "seq2seq", "--out", str(WORK), "--steps", "100000",
                 "--set", f"train.max_time_s={args.train_s}", "--set", "train.eval_every=0",
                 "--set", "train.save_every=0", "--set", "train.log_every=20")
    predicted, measured = _peak_line(proc.stderr)
    metrics = [json.loads(line) for line in (WORK / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "tokens_per_s" in m]
    ev = json.loads(memlm("eval", "--model", str(WORK), "--json").stdout)
    from memlm.pairs import code_summary_pairs

    task = code_summary_pairs()
    row = {"model": "tiny-encdec", "train_pairs": len(task["train"]), "eval_pairs": len(task["eval"]),
           "train_s": args.train_s, "steps": steps[-1]["step"], "train_tok_s": steps[-1]["tokens_per_s"],
           "train_peak_mib": measured, "train_predicted_mib": predicted, "eval_loss": ev["loss"],
           "exact_match": ev["exact_match"], "f1": ev["f1"], "baseline_exact_match": ev["baseline_exact_match"],
           "baseline_f1": ev["baseline_f1"]}
    loads = f"load average before {load_before}, after {load_average()} (1/5/15 min) on this 2-core machine"
    notes = (f"`memlm train --kind encdec --task seq2seq` (preset tiny-encdec) for {args.train_s:.0f} s, then "
             f"`memlm eval` on the eval split: greedy outputs of up to 32 tokens; {loads}. Examples:\n\n"
             + "\n".join(f"- `{e['source'].strip().splitlines()[0]}` reference: {e['reference']!r}, "
                         f"output: {e['output']!r}" for e in ev["examples"]))
    write_results("seq2seq", [row], {"load_average": loads, "examples": ev["examples"]}, notes=notes)


if __name__ == "__main__":
    main()
