"""Cost of scoring every retrieval protocol (cxrlib.protocols) against the package's former metric set.

On a seeded N-pair split (512-d, reports repeated so galleries merge, 13 finding labels) it times
``retrieval.query_scores`` (raw + merged exact pair, label match, finding overlap) and
``protocols.protocol_scores`` with every protocol (adds duplicate_positive, graded nDCG/label-F1 and the
chance level of each), then both tidy summaries with ``--n-boot`` patient-bootstrap resamples. The
machine's load average is recorded (wall time on a shared CPU depends on it). Prints one JSON object on
the last line.

    .venv/bin/python benchmarks/protocols_scale.py [--pairs 2000] [--dim 512] [--n-boot 200]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pandas as pd


def make_split(n: int, dim: int, seed: int):
    from cxrlib.datasets.table import report_groups
    from cxrlib.pairs import PairedSplit

    rng = np.random.default_rng(seed)
    reports = pd.Series([f"report {i % max(1, n // 3)}" for i in range(n)])
    base = rng.standard_normal((n, dim))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    findings = (rng.random((n, 13)) < 0.2).astype(np.float32)
    ids = np.array([f"s{i}" for i in range(n)])
    return PairedSplit(norm(base + rng.standard_normal((n, dim))), norm(base), (findings.sum(1) > 0).astype(np.int64),
                       ids, np.array([f"p{i // 2}" for i in range(n)]), ids, report_groups(reports)[0], findings,
                       pd.DataFrame({"report": reports}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n-boot", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from cxrlib import protocols, retrieval

    split = make_split(args.pairs, args.dim, args.seed)
    out = {"pairs": args.pairs, "dim": args.dim, "n_boot": args.n_boot, "load_average_1min": os.getloadavg()[0],
           "cpu_count": os.cpu_count()}
    t = time.perf_counter()
    qs = retrieval.query_scores(split, "bench", (1, 5, 10))
    out["query_scores_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    ps = protocols.protocol_scores(split, "bench", None, (1, 5, 10))
    out["protocol_scores_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    a = retrieval.summarise(qs, n_boot=args.n_boot, seed=args.seed)
    out["summarise_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    b = protocols.summarise(ps, n_boot=args.n_boot, seed=args.seed)
    out["protocol_summarise_seconds"] = round(time.perf_counter() - t, 3)
    out.update(rows_before=len(a), rows_protocols=len(b), protocols=sorted(set(b["protocol"])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
