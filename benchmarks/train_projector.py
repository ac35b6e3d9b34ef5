"""Benchmark: train the default projector on 3,000 pairs of 512-d embeddings for 50 epochs on this CPU.

Target (issue 5): under 30 s wall and under 2 GiB peak memory. Early stopping is switched off
(patience = epochs) so all epochs run. Prints one JSON object on its last line; ``cpu_s`` (process CPU
time) and ``load_avg_1min`` tell a slow machine from a busy one (wall ~ cpu_s / threads when idle).

    .venv/bin/python benchmarks/train_projector.py [--pairs 3000] [--dim 512] [--epochs 50] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): a load-independent cost figure."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3000)
    ap.add_argument("--val", type=int, default=600)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cxrlib.train import TrainConfig, label_precision, synthetic_splits, train_projector

    splits = synthetic_splits(args.pairs, args.val, dim=args.dim, seed=args.seed)
    rss_before = peak_rss_mib()
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=args.epochs, seed=args.seed)
    t0, c0 = time.perf_counter(), cpu_seconds()
    result = train_projector(splits["train"], splits["val"], cfg, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    peak = peak_rss_mib()
    h = result.history
    figures = {
        "benchmark": "train_projector",
        "pairs": args.pairs, "val_pairs": args.val, "dim": args.dim, "epochs_run": int(h["epoch"].max()),
        "batch_size": args.batch_size, "kind": cfg.kind, "width": cfg.width,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0],
        "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
        "s_per_epoch": round(wall / max(1, int(h["epoch"].max())), 3),
        "peak_rss_mib": round(peak, 1), "peak_rss_before_training_mib": round(rss_before, 1),
        "target_wall_s": 30, "target_peak_mib": 2048,
        "meets_targets": bool(wall < 30 and peak < 2048),
        "frozen_val_p5": round(label_precision(splits["val"])["mean"], 4),
        "best_val_p5": round(result.best_metric, 4), "best_epoch": result.best_epoch,
        "torch": torch.__version__, "python": platform.python_version(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
