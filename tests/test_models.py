"""cxrlib.models: model specs, projector checkpoints, and the one projector application every caller uses."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cxrlib import embedding_viz, models, train
from cxrlib.pairs import PairedSplit
from cxrlib.projector import build_projector, save_projector


def _split(n=12, d=8, seed=0) -> PairedSplit:
    rng = np.random.default_rng(seed)
    txt = rng.standard_normal((n, d)).astype(np.float32)
    img = (txt + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    labels = np.arange(n) % 2
    ids = np.array([f"s{i}" for i in range(n)])
    return PairedSplit(img, txt, labels, ids, ids, ids, np.arange(n), None, pd.DataFrame({"label_abnormal": labels}))


def test_model_spec_parse_and_placeholders():
    spec = models.ModelSpec.parse({"name": "B + projector", "backbone": "{backbone}", "run": "{run}"},
                                  backbone="biomedclip", run="main")
    assert spec == models.ModelSpec("B + projector", "biomedclip", "main")
    assert models.ModelSpec.parse({"name": "B", "backbone": "clip"}).run is None
    for bad in ({"name": "x"}, {"name": "x", "backbone": "b", "epochs": 3}, "clip"):
        with pytest.raises(ValueError, match="model spec"):
            models.ModelSpec.parse(bad)


def test_missing_checkpoint_names_path_and_make_target(workdir, monkeypatch):
    sp = _split()
    monkeypatch.setattr(models, "load_eval_split", lambda *a, **k: sp)
    with pytest.raises(FileNotFoundError, match=r"results/smoke/models/main/projector.pt.*make paper PROFILE=smoke"):
        models.load_model_split(models.ModelSpec("tuned", "tiny", "main"), "synthetic", "smoke")
    assert models.load_model_split(models.ModelSpec("frozen", "tiny"), "synthetic", "smoke") is sp
    assert models.projector_path("smoke", "main") == workdir / "results" / "smoke" / "models" / "main" / "projector.pt"


def test_every_projector_application_equals_the_direct_forward(tmp_path):
    """Evaluation, embedding maps and the trainer's validation give what ``encode_*`` gives on the whole
    array at once (the reference), whatever the batch size; a training-mode model stays in training mode."""
    torch.manual_seed(0)
    model = build_projector("residual_mlp", 8, 8, width=16, dropout=0.5)
    with torch.no_grad():  # move off the zero-initialised identity start
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sp = _split(n=25)
    model.eval()
    with torch.no_grad():
        ref_img = model.encode_image(torch.from_numpy(sp.img)).numpy()
        ref_txt = model.encode_text(torch.from_numpy(sp.txt)).numpy()
    assert not np.allclose(ref_img, sp.img / np.linalg.norm(sp.img, axis=1, keepdims=True), atol=1e-3)
    path = save_projector(tmp_path / "p.pt", model, {"backbone": "tiny"})

    model.train()
    got = {"project": models.project(model, sp.img, sp.txt, batch_size=7),
           "viz": embedding_viz.apply_projector(model, sp.img, sp.txt, batch_size=4)}
    assert model.training  # restored
    t = train.project_split(sp, model)
    got["train"] = (t.img, t.txt)
    out, cfg = models.apply_projector(sp, path, "tiny", batch_size=3)
    got["eval"] = (out.img, out.txt)
    for name, (img, txt) in got.items():
        assert img.dtype == np.float32 and img.shape == (25, 8), name
        np.testing.assert_allclose(img, ref_img, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(txt, ref_txt, atol=1e-6, err_msg=name)
    assert cfg["backbone"] == "tiny" and out.table is sp.table and out.study_ids is sp.study_ids
    empty_img, _ = models.project(model, sp.img[:0], sp.txt[:0])
    assert empty_img.shape == (0, 8)


def test_checked_projector_refuses_other_backbone_dataset_or_width(tmp_path):
    sp = _split()
    path = save_projector(tmp_path / "p.pt", build_projector("linear", 8, 8), {"backbone": "tiny", "dataset": "a"})
    with pytest.raises(ValueError, match="trained on backbone 'tiny', not 'clip'"):
        models.apply_projector(sp, path, "clip")
    with pytest.raises(ValueError, match="trained on dataset 'a', not 'b'"):
        models.load_checked_projector(path, "tiny", "b")
    with pytest.raises(ValueError, match=r"takes image/text dims \(8, 8\), the embeddings have \(6, 8\)"):
        models.load_checked_projector(path, dims=(6, 8))
    models.load_checked_projector(path, "tiny", "a", (8, 8))


def test_load_eval_split_and_model_split_on_cached_embeddings(workdir):
    from test_retrieval_notebook import write_fixture

    from cxrlib import paths
    from cxrlib.embstore import Embeddings, load_embeddings, save_embeddings

    write_fixture(workdir)
    sp = models.load_eval_split("fixture", "tiny", "test", ["Cardiomegaly", "Lung Opacity"])
    assert len(sp) == 36 and sp.findings.shape == (36, 2) and set(sp.table["split"]) == {"test"}
    from cxrlib import dag

    out = dag.out_key("smoke", "fixture")  # results of another dataset live beside the profile's own
    tuned = models.load_model_split(models.ModelSpec("t", "tiny-adapted", "main"), "fixture", out)
    assert np.allclose(np.linalg.norm(tuned.img, axis=1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="trained on backbone 'tiny-adapted', not 'tiny'"):
        models.load_model_split(models.ModelSpec("x", "tiny", "main"), "fixture", out)
    with pytest.raises(FileNotFoundError, match="make paper PROFILE=smoke DATASET=fixture"):
        models.load_model_split(models.ModelSpec("x", "tiny", "other-run"), "fixture", out)
    path = paths.embeddings_dir() / "fixture" / "tiny" / "text.npz"
    emb = load_embeddings(path)
    keep = emb.ids != "s7"
    save_embeddings(path, Embeddings(emb.ids[keep], emb.emb[keep], emb.meta))
    with pytest.raises(KeyError, match="s7"):
        models.load_eval_split("fixture", "tiny", "test")


def test_the_visualisation_loader_refuses_embeddings_of_another_backbone(workdir):
    """Notebook 04 reads embeddings through pairs.load_paired, which checks the cache's backbone."""
    from test_retrieval_notebook import write_fixture

    from cxrlib import paths
    from cxrlib.embstore import Embeddings, load_embeddings, save_embeddings

    write_fixture(workdir)
    data = embedding_viz.load_viz_data("fixture", "tiny", None, split="test")
    assert data.n_split == 36
    path = paths.embeddings_dir() / "fixture" / "tiny" / "image.npz"
    emb = load_embeddings(path)
    save_embeddings(path, Embeddings(emb.ids, emb.emb, {**emb.meta, "backbone": "clip"}))
    with pytest.raises(ValueError, match="clip"):
        embedding_viz.load_viz_data("fixture", "tiny", None, split="test")


def test_retrieval_still_exports_the_moved_names():
    from cxrlib import retrieval

    assert retrieval.ModelSpec is models.ModelSpec and retrieval.load_model_split is models.load_model_split
