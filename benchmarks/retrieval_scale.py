"""Scale of top-k retrieval: 2,000 queries against 200,000 512-d gallery items, top-10.

Also times ``evaluate_pairs`` (query_scores + summarise: every metric, both directions, bootstrap CIs)
on a 5,000-pair split, the size of the MIMIC-CXR test split (``--eval-pairs``, 0 skips it).

Each backend (chunked torch, faiss IndexFlatIP) runs in its own child process on the same seeded
data, so its peak resident memory (ru_maxrss, including the interpreter, torch and the data) is its
own; ``*_data_gib`` is that peak before the search starts. The machine's load average is recorded,
since wall time on a shared CPU depends on it (``*_cpu_seconds`` less so). Targets: under 10 s and under 2 GiB each,
and the same results on both paths. Prints one JSON object on the last line.

    .venv/bin/python benchmarks/retrieval_scale.py [--queries 2000] [--gallery 200000] [--dim 512] [--k 10]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_SECONDS = 10.0
TARGET_GIB = 2.0


def make_data(n_queries: int, n_gallery: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded unit vectors; queries are noisy copies of gallery items so top-k is not pure noise."""
    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    for s in range(0, n_gallery, 16384):  # in place, in chunks: no gallery-sized temporaries
        gallery[s:s + 16384] /= np.linalg.norm(gallery[s:s + 16384], axis=1, keepdims=True)
    queries = gallery[rng.integers(0, n_gallery, n_queries)] + 0.5 * rng.standard_normal((n_queries, dim),
                                                                                           dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return queries, gallery


def _eval_child(args) -> None:
    """Every metric of evaluate_pairs (both directions, CIs) on an N-pair split (MIMIC-CXR test scale)."""
    import pandas as pd

    from cxrlib.pairs import PairedSplit
    from cxrlib.retrieval import query_scores, summarise

    n, rng = args.eval_pairs, np.random.default_rng(args.seed)
    groups = rng.integers(0, max(1, n // 3), n)  # repeated reports, as in Open-I and MIMIC
    txt, img = make_data(n, n, args.dim, args.seed)[1], None
    txt = txt[groups]
    img = txt + 0.7 * rng.standard_normal(txt.shape, dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    ids = np.array([f"s{i}" for i in range(n)])
    split = PairedSplit(img, txt, rng.integers(0, 2, n), ids, (np.arange(n) // 2).astype(str), ids, groups,
                        (rng.random((n, 13)) < 0.1).astype(np.float32), pd.DataFrame())
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    scores = query_scores(split, "bench", (1, 5, 10))
    t1 = time.perf_counter()
    table = summarise(scores, n_boot=args.n_boot, seed=args.seed)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "metrics_seconds": t1 - t0, "cpu_seconds": cpu_seconds,
                      "rows": len(table), "peak_gib": peak / 2**20, "data_gib": base_rss / 2**20}))


def _child(args) -> None:
    from cxrlib.retrieval import topk_similarity

    queries, gallery = make_data(args.queries, args.gallery, args.dim, args.seed)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.perf_counter(), time.process_time()
    scores, indices = topk_similarity(queries, gallery, args.k, chunk_size=args.chunk_size, backend=args.backend)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    np.savez(args.out, scores=scores, indices=indices)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_gib": peak / 2**20, "data_gib": base_rss / 2**20}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--gallery", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-pairs", type=int, default=5000, help="pairs of the evaluate_pairs timing (0: skip)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the evaluate_pairs timing")
    ap.add_argument("--backend", choices=["torch", "faiss", "eval"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.backend:
        _eval_child(args) if args.backend == "eval" else _child(args)
        return {}
    result = {"queries": args.queries, "gallery": args.gallery, "dim": args.dim, "k": args.k,
              "threads": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2),
              "target_seconds": TARGET_SECONDS, "target_gib": TARGET_GIB}
    outs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("torch", "faiss", "eval"):
            if backend == "eval" and args.eval_pairs <= 0:
                continue
            out = Path(tmp) / f"{backend}.npz"
            cmd = [sys.executable, __file__, "--backend", backend, "--out", str(out),
                   *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("queries", "gallery", "dim", "k", "chunk_size", "seed", "eval_pairs", "n_boot")]]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            fig = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{backend}: {fig['seconds']:.2f} s, peak RSS {fig['peak_gib']:.2f} GiB "
                  f"(data alone {fig['data_gib']:.2f} GiB)", file=sys.stderr)
            prefix = f"evaluate_pairs_{args.eval_pairs}" if backend == "eval" else backend
            for key, v in fig.items():
                result[f"{prefix}_{key}"] = round(v, 3)
            if backend == "eval":
                result["evaluate_pairs_n_boot"] = args.n_boot
                continue
            with np.load(out) as z:
                outs[backend] = (z["scores"], z["indices"])
    (s_t, i_t), (s_f, i_f) = outs["torch"], outs["faiss"]
    same_rows = (i_t == i_f).all(1)
    result["indices_equal_fraction"] = float(same_rows.mean())
    result["max_abs_score_diff"] = float(np.abs(s_t - s_f).max())
    # rows that differ must differ only among near-equal scores (float summation order)
    gap = np.abs(s_t - s_f)[~same_rows].max() if (~same_rows).any() else 0.0
    result["results_equal"] = bool(same_rows.all() or gap < 1e-5)
    for backend in ("torch", "faiss"):
        result[f"{backend}_meets_targets"] = bool(result[f"{backend}_seconds"] < TARGET_SECONDS
                                                  and result[f"{backend}_peak_gib"] < TARGET_GIB)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
