"""`memlm sweep --budget 1GiB --time 10m` on the embedded corpus, as a user runs it (issue 17
part 4): the ladder the planner fits, each size's held-out loss, the recommendation; the table,
sweep.json and the plot go to bench/results/.

    python -m bench.sweep                     # --budget 1GiB --time 10m
    python -m bench.sweep --time 4m
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

from bench.architectures import memlm  # noqa: E402
from bench.common import RESULTS, load_average, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work" / "sweep"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", default="1GiB")
    parser.add_argument("--time", default="10m")
    args = parser.parse_args()
    if WORK.exists():
        shutil.rmtree(WORK)
    load_before = load_average()
    proc = memlm("sweep", "--budget", args.budget, "--time", args.time, "--out", str(WORK))
    result = json.loads((WORK / "sweep.json").read_text())
    rows = [{**r, "best": r["name"] == result["best"], "savers": "; ".join(r["savers"]) or "none"}
            for r in result["rungs"]]
    loads = f"load average before {load_before}, after {load_average()} (1/5/15 min) on this 2-core machine"
    recommended = next(line for line in proc.stdout.splitlines() if line.startswith("recommended"))
    notes = (f"`memlm sweep --budget {args.budget} --time {args.time}` on the embedded corpus (preset tiny's "
             f"flavour, default train settings, one BPE for all sizes, held-out loss on the fixed eval split); "
             f"{loads}. {recommended}")
    _, md = write_results("sweep", rows, {"budget": args.budget, "time": args.time, "load_average": loads},
                          columns=["name", "params", "steps", "train_tokens", "tokens_per_s", "eval_loss",
                                   "peak_bytes", "predicted_peak_bytes", "savers", "best"], notes=notes)
    shutil.copy(WORK / "sweep.png", RESULTS / md.name.replace(".md", ".png"))


if __name__ == "__main__":
    main()
