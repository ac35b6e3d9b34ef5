"""Wall time of ``make demo`` from an empty cache, node by node, then of a rerun after one loss weight changes.

    .venv/bin/python benchmarks/demo_timing.py --workdir /tmp/demo1 [--rerun W_SUPCON=0.5] [--py-spy out.txt]

The work folder must be empty or absent (empty cache: no study table, no embeddings, no adapted tower).
Runs ``make demo CXR_WORKDIR=<workdir>`` and then ``make demo <rerun>``, and reports for each the total wall
time, the nodes that ran (from ``build/offline/timings.jsonl``: only records written during that make) with
their seconds, the paper's nodes (00-05 and the embeddings) summed apart from the others, and the load
average before and after (the machine may be shared). ``--py-spy`` records the first run with py-spy
(``--subprocesses``, raw collapsed stacks) for a where-does-the-time-go profile. Prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PAPER_NODES = ("00_adapt_backbone", "01_data_prep", "02_train", "03_retrieval_eval", "04_embedding_viz",
               "05_loss_ablation")


def _records(log: Path, since: datetime) -> list[dict]:
    if not log.is_file():
        return []
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in recs if datetime.fromisoformat(r["finished"]) >= since]


def timed_make(args: list[str], workdir: Path, py_spy: str | None = None) -> dict:
    since = datetime.now(timezone.utc).replace(microsecond=0)
    load0 = os.getloadavg()
    cmd = ["make", "--no-print-directory", "demo", *args, f"CXR_WORKDIR={workdir}"]
    if py_spy:
        cmd = [str(Path(sys.executable).parent / "py-spy"), "record", "--subprocesses", "-r", "20", "-f", "raw",
               "-o", py_spy, "--", *cmd]
    t0 = time.perf_counter()
    code = subprocess.call(cmd, cwd=REPO)
    wall = time.perf_counter() - t0
    recs = _records(workdir / "build" / "offline" / "timings.jsonl", since)
    nodes = {r["node"]: r["seconds"] for r in recs}
    paper = {k: v for k, v in nodes.items() if k in PAPER_NODES or k.startswith("embed-")}
    return {"make": " ".join(["make demo", *args]), "exit_code": code, "wall_s": round(wall, 1),
            "nodes_ran": list(nodes), "node_seconds": nodes, "paper_nodes_s": round(sum(paper.values()), 1),
            "other_nodes_s": round(sum(v for k, v in nodes.items() if k not in paper), 1),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--rerun", nargs="*", default=["W_SUPCON=0.5"], help="make variables of the second run")
    ap.add_argument("--py-spy", default=None, help="record the first run with py-spy into this file")
    ap.add_argument("--rerun-only", action="store_true",
                    help="only the second run, on a work folder a first run filled (e.g. after make readme)")
    args = ap.parse_args()
    if args.rerun_only:
        runs = [timed_make(args.rerun, args.workdir)]
        print(json.dumps({"benchmark": "demo_timing", "workdir": str(args.workdir), "runs": runs}))
        return 0 if runs[0]["exit_code"] == 0 else 1
    if args.workdir.exists() and any(args.workdir.iterdir()):
        print(f"error: {args.workdir} is not empty: the first run must start from an empty cache", file=sys.stderr)
        return 2
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = [timed_make([], args.workdir, args.py_spy)]
    print(json.dumps(runs[0]), flush=True)
    if runs[0]["exit_code"] == 0 and args.rerun:
        runs.append(timed_make(args.rerun, args.workdir))
    print(json.dumps({"benchmark": "demo_timing", "workdir": str(args.workdir), "runs": runs}))
    return 0 if all(r["exit_code"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
