"""Notebook-03 helpers: model specs, projector loading, example queries, and the figures they feed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
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


def test_model_spec_parse_and_placeholders():
    spec = retrieval.ModelSpec.parse({"name": "B + projector", "backbone": "{backbone}", "run": "{run}"},
                                     backbone="biomedclip", run="main")
    assert spec == retrieval.ModelSpec("B + projector", "biomedclip", "main")
    assert retrieval.ModelSpec.parse({"name": "B", "backbone": "clip"}).run is None
    for bad in ({"name": "x"}, {"name": "x", "backbone": "b", "epochs": 3}, "clip"):
        with pytest.raises(ValueError, match="model spec"):
            retrieval.ModelSpec.parse(bad)


def test_missing_checkpoint_names_path_and_make_target(workdir, monkeypatch):
    sp = _split(workdir)
    monkeypatch.setattr(retrieval, "load_eval_split", lambda *a, **k: sp)
    spec = retrieval.ModelSpec("tuned", "tiny", "main")
    with pytest.raises(FileNotFoundError, match=r"results/smoke/models/main/projector.pt.*make paper PROFILE=smoke"):
        retrieval.load_model_split(spec, "synthetic", "smoke")
    assert retrieval.load_model_split(retrieval.ModelSpec("frozen", "tiny"), "synthetic", "smoke") is sp


def test_apply_projector_uses_the_checkpoint(workdir):
    projector = pytest.importorskip("cxrlib.projector")
    sp = _split(workdir)
    model = projector.build_projector("linear", 8, 8)
    path = workdir / "p.pt"
    projector.save_projector(path, model, {"backbone": "tiny"})
    out, cfg = retrieval.apply_projector(sp, path, "tiny")
    with torch.no_grad():
        expected = model.encode_image(torch.from_numpy(sp.img)).numpy()
    np.testing.assert_allclose(out.img, expected, atol=1e-6)
    assert cfg["backbone"] == "tiny" and out.table is sp.table
    with pytest.raises(ValueError, match="trained on backbone 'tiny', not 'clip'"):
        retrieval.apply_projector(sp, path, "clip")


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


def test_load_eval_split_names_missing_embedding_ids(workdir):
    from test_retrieval_notebook import write_fixture

    from cxrlib import paths
    from cxrlib.embstore import Embeddings, load_embeddings, save_embeddings

    write_fixture(workdir)
    sp = retrieval.load_eval_split("fixture", "tiny", "test", ["Cardiomegaly", "Lung Opacity"])
    assert len(sp) == 36 and sp.findings.shape == (36, 2) and set(sp.table["split"]) == {"test"}
    tuned = retrieval.load_model_split(retrieval.ModelSpec("t", "tiny-adapted", "main"), "fixture", "smoke")
    assert np.allclose(np.linalg.norm(tuned.img, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="trained on backbone 'tiny-adapted', not 'tiny'"):
        retrieval.load_model_split(retrieval.ModelSpec("x", "tiny", "main"), "fixture", "smoke")
    path = paths.embeddings_dir() / "fixture" / "tiny" / "text.npz"
    emb = load_embeddings(path)
    keep = emb.ids != "s7"
    save_embeddings(path, Embeddings(emb.ids[keep], emb.emb[keep], emb.meta))
    with pytest.raises(KeyError, match="s7"):
        retrieval.load_eval_split("fixture", "tiny", "test")
