"""Synthetic radiographs: rendering speed and a comparison grid next to real radiographs.

    .venv/bin/python benchmarks/synthetic_render.py [OUT_DIR] [--n 400] [--size 256] [--jobs 2]

Times :func:`cxrlib.datasets.synthetic.render_openi_images` on ``--n`` Open-I-like rows (MeSH
terms drawn from frequent real ones), projects the time for the offline profile's ~7,500 images,
and writes ``OUT_DIR/synthetic_grid.png``: one panel per finding (frontal), lateral views, and
real radiographs from ``../shared/data/covid-cxr-sample`` when that folder is present.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxrlib import paths  # noqa: E402
from cxrlib.datasets.synthetic import render_openi_images, render_radiograph  # noqa: E402

MESH = ["normal"] * 7 + ["Cardiomegaly/mild", "Opacity/lung/base/left", "Pleural Effusion/right/small",
                         "Calcified Granuloma/lung/upper lobe/right", "Pulmonary Atelectasis/base/left",
                         "Lung/hyperdistention;Pulmonary Emphysema", "Nodule/lung/middle lobe/right",
                         "Catheters, Indwelling;Cardiomegaly", "Spine/degenerative;Aorta/tortuous",
                         "Pneumothorax/left/small", "Pulmonary Edema;Cardiomegaly/severe"]
PANELS = [("normal", set()), ("cardiomegaly", {"cardiomegaly"}), ("effusion (R)", {"effusion": {"side": "right"}}),
          ("consolidation", {"opacity"}), ("nodule + granuloma", {"nodule", "granuloma"}), ("mass", {"mass"}),
          ("atelectasis", {"atelectasis"}), ("pneumothorax (L)", {"pneumothorax": {"side": "left", "severity": 1}}),
          ("edema + cardiomegaly", {"edema", "cardiomegaly"}), ("hyperinflation", {"hyperinflation"}),
          ("pacemaker, line, wires", {"pacemaker", "central_line", "sternotomy"}), ("rib fracture + ETT", {"fracture", "ett"})]


def _grid(out: Path, size: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    real_dir = paths.shared_data_dir() / "covid-cxr-sample" / "images"
    real = sorted(real_dir.glob("*.png"))[:40:5] if real_dir.is_dir() else []
    lateral = [("lateral normal", set()), ("lateral cardiomegaly", {"cardiomegaly"}),
               ("lateral effusion", {"effusion"}), ("lateral pacemaker", {"pacemaker"})]
    cells = [(t, render_radiograph(f, "frontal", size, i)) for i, (t, f) in enumerate(PANELS)]
    cells += [(t, render_radiograph(f, "lateral", size, 100 + i)) for i, (t, f) in enumerate(lateral)]
    cells += [(f"REAL {p.stem[:14]}", Image.open(p).convert("L").resize((size, size))) for p in real]
    ncol = 6
    nrow = -(-len(cells) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.2 * ncol, 2.35 * nrow))
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, im) in zip(axes.flat, cells):
        ax.imshow(np.asarray(im), cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=8, color="firebrick" if title.startswith("REAL") else "black")
    fig.tight_layout()
    path = out / "synthetic_grid.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="/tmp")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    views = np.where(rng.random(args.n) < 0.5, "frontal", "lateral")
    table = pd.DataFrame({"image_id": [f"CXR{i // 2 + 1}_{i % 2 + 1}_IM-{i:04d}-1001" for i in range(args.n)],
                          "view": views, "mesh": rng.choice(MESH, args.n)})
    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        first = render_openi_images(table, Path(tmp), size=args.size, n_jobs=args.jobs)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        again = render_openi_images(table, Path(tmp), size=args.size, n_jobs=args.jobs)
        rescan = time.perf_counter() - t1
        mb = sum(os.path.getsize(p) for p in again["image_path"]) / 2**20
    grid = _grid(out, args.size)
    print(json.dumps({"n": args.n, "size": args.size, "jobs": args.jobs, "wall_s": round(wall, 2),
                      "images_per_s": round(args.n / wall, 1), "projected_7500_s": round(7500 * wall / args.n, 1),
                      "parent_cpu_s": round(time.process_time() - c0, 2),
                      "worker_cpu_ms_per_image": round(1000 * first.attrs["cpu_s"] / args.n, 1),
                      "projected_7500_s_at_2_free_cores": round(7500 * first.attrs["cpu_s"] / args.n / 2, 1), "rescan_existing_s": round(rescan, 2),
                      "all_existing_on_rerun": bool((again["status"] == "existing").all()),
                      "mb_per_1000": round(mb / args.n * 1000, 1), "load_avg_1min": os.getloadavg()[0],
                      "grid": str(grid)}))


if __name__ == "__main__":
    main()
