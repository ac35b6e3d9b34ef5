"""Wall time of the 2-D maps and the embedding metrics at the sizes notebook 04 meets.

Random L2-normalised 512-d embeddings with a weak label direction (no data needed). Prints progress, then one
JSON object on the last line: seconds per (method, backend, n), UMAP's one-off import + JIT cost, and the
metrics' seconds per n. ``--sizes 800 2000`` picks the sizes; ``--no-umap`` skips UMAP (its import is ~20 s).

    python benchmarks/embedding_viz.py --sizes 800 1600 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from cxrlib import embedding_viz as ev


def _data(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.65).astype(int)
    direction = rng.normal(size=dim)
    img = rng.normal(size=(n, dim)) + 0.5 * labels[:, None] * direction
    txt = img + rng.normal(size=(n, dim)) + 2.0
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    return norm(img), norm(txt), labels


def _timed(fn, *args, **kwargs) -> float:
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return round(time.perf_counter() - t0, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[800, 1600])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-umap", action="store_true")
    args = ap.parse_args()
    out: dict = {"dim": args.dim, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
                 "tsne_sklearn_s": {}, "tsne_opentsne_s": {}, "umap_s": {}, "metrics_s": {}}
    if not args.no_umap:
        t0 = time.perf_counter()
        ev.project_2d(_data(50, 16, 0)[0], "umap", n_neighbors=10)  # import + numba JIT, paid once per process
        out["umap_import_and_jit_s"] = round(time.perf_counter() - t0, 3)
    for n in args.sizes:
        img, txt, labels = _data(n, args.dim, n)
        out["tsne_sklearn_s"][n] = _timed(ev.project_2d, img, "tsne", opentsne_above=10**9, n_jobs=args.threads)
        out["tsne_opentsne_s"][n] = _timed(ev.project_2d, img, "tsne", opentsne_above=0, n_jobs=args.threads)
        if not args.no_umap:
            out["umap_s"][n] = _timed(ev.project_2d, img, "umap")
        out["metrics_s"][n] = _timed(ev.embedding_metrics, img, txt, labels, k=10)
        print(f"n={n}: " + ", ".join(f"{k}={v[n]}" for k, v in out.items() if isinstance(v, dict) and n in v),
              flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
