"""Notebook-03 helpers: example queries and the figures they feed (model specs and projectors: test_models.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib import plots, retrieval
from cxrlib.pairs import PairedSplit


def _split(tmp_path, n=12, d=8, seed=0) -> PairedSplit:
    rng = np.random.default_rng(seed)
    txt = rng.standard_normal((n, d)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    img = txt + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    labels = np.arange(n) % 2
    paths = []
    for i in range(n):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8), "L").save(p)
        paths.append(str(p))
    table = pd.DataFrame({"image_path": paths, "label_abnormal": labels,
                          "report": [f"Report {i}: " + "lungs clear heart normal " * (i % 4 + 1) for i in range(n)]})
    ids = np.array([f"s{i}" for i in range(n)])
    return PairedSplit(img, txt, labels, ids, ids, ids, np.arange(n), None, table)


def test_example_queries_seeded_one_per_class():
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    a = retrieval.example_queries(labels, seed=3)
    assert a.tolist() == retrieval.example_queries(labels, seed=3).tolist()
    assert sorted(labels[a].tolist()) == [0, 1]
    assert len(retrieval.example_queries(np.zeros(4, int), seed=0, per_class=2)) == 2


def test_figures_render(tmp_path):
    sp = _split(tmp_path)
    df = retrieval.evaluate_pairs(sp, "frozen", ks=(1, 3, 5), n_boot=20)
    df = pd.concat([df, df.assign(model="tuned", value=df["value"] * 0.9)], ignore_index=True)
    figs = {"recall": plots.plot_metric_at_k(df, "recall"),
            "prec": plots.plot_metric_at_k(df, "label_precision"),
            "class": plots.plot_per_class(df, "label_precision", 3)}
    q = retrieval.example_queries(sp.labels, seed=0)
    s, i = retrieval.topk_similarity(sp.img[q], sp.txt, 5)
    figs["i2t"] = plots.plot_image_to_reports(sp.table, q, i, s, title="t")
    s, i = retrieval.topk_similarity(sp.txt[q], sp.img, 5)
    figs["t2i"] = plots.plot_report_to_images(sp.table, q, i, s)
    for name, fig in figs.items():
        written = plots.save_figure(fig, name, tmp_path / "fig", formats=("png",), subtitle="SMOKE")
        assert written[0].stat().st_size > 1000
        plots.plt.close(fig)
    with pytest.raises(ValueError, match="no rows"):
        plots.plot_metric_at_k(df, "finding_precision")
