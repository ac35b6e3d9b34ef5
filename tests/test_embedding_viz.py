"""Embedding maps and their numbers: hand-built geometry, naive references, library references, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO
from nbexec import run_notebook

from cxrlib import embedding_viz as ev

# ---- helpers ---------------------------------------------------------------------------------------------


def _blobs(n: int = 60, d: int = 80, sep: float = 20.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] += sep * labels
    return x, labels


def _map_1nn_acc(xy, labels):
    """Share of points whose nearest other point on the 2-D map (Euclidean) has their label."""
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return float((labels[d.argmin(1)] == labels).mean())


def _naive_knn(query, gallery, gallery_labels, k, loo):
    """Plain loops: cosine similarity, drop the query itself when leave-one-out, majority of the k nearest
    (``Counter.most_common`` keeps first-seen order among equal counts: a tie goes to the nearest label)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    out = []
    for i in range(len(q)):
        sims = [(float(q[i] @ g[j]), j) for j in range(len(g)) if not (loo and j == i)]
        sims.sort(key=lambda t: -t[0])
        votes = Counter(gallery_labels[j] for _, j in sims[:k])
        out.append(votes.most_common(1)[0][0])
    return np.array(out)


def _naive_silhouette(x, labels):
    """Rousseeuw's definition with cosine distance, one point at a time."""
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - u @ u.T
    s = []
    for i in range(len(x)):
        same = [j for j in range(len(x)) if labels[j] == labels[i] and j != i]
        a = np.mean(dist[i, same]) if same else 0.0
        b = min(np.mean(dist[i, labels == c]) for c in set(labels) if c != labels[i])
        s.append(0.0 if not same else (b - a) / max(a, b))
    return float(np.mean(s))


# ---- project_2d ------------------------------------------------------------------------------------------


def test_tsne_sklearn_path_is_seeded_and_reduces_with_pca():
    x, labels = _blobs()
    info: dict = {}
    a = ev.project_2d(x, "tsne", seed=3, perplexity=10, pca_dims=20, info=info)
    b = ev.project_2d(x, "tsne", seed=3, perplexity=10, pca_dims=20)
    assert a.shape == (60, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert info["backend"] == "sklearn" and info["pca_dims"] == 20 and info["fallbacks"] == []
    # two far-apart blobs stay apart on the map: every point's nearest map neighbour shares its label
    assert _map_1nn_acc(a, labels) == 1.0


def test_tsne_opentsne_path_above_threshold():
    x, labels = _blobs(seed=1)
    info: dict = {}
    a = ev.project_2d(x, "tsne", seed=0, perplexity=10, opentsne_above=50, info=info)
    b = ev.project_2d(x, "tsne", seed=0, perplexity=10, opentsne_above=50)
    assert info["backend"] == "openTSNE"
    np.testing.assert_allclose(a, b)
    assert _map_1nn_acc(a, labels) == 1.0


def test_perplexity_too_large_falls_back_with_warning():
    x, _ = _blobs(n=13)
    info: dict = {}
    with pytest.warns(ev.ProjectionWarning, match="perplexity 30 is too large for 13 points"):
        xy = ev.project_2d(x, "tsne", perplexity=30, info=info)
    assert xy.shape == (13, 2) and np.isfinite(xy).all()
    assert info["perplexity"] == pytest.approx(4.0) and info["fallbacks"]


@pytest.mark.parametrize("n", [1, 2, 4])
def test_too_few_points_give_a_pca_map(n):
    x, _ = _blobs(n=n)
    info: dict = {}
    with pytest.warns(ev.ProjectionWarning, match=f"only {n} points"):
        xy = ev.project_2d(x, "umap", info=info)
    assert xy.shape == (n, 2) and info["backend"] == "pca"
    if n >= 2:  # PCA keeps the pairwise distance along the first axis
        from sklearn.decomposition import PCA

        ref = PCA(n_components=min(2, n)).fit_transform(x)
        np.testing.assert_allclose(np.abs(xy[:, 0]), np.abs(ref[:, 0]), rtol=1e-4, atol=1e-4)


def test_identical_points_do_not_crash():
    with pytest.warns(ev.ProjectionWarning, match="identical"):
        xy = ev.project_2d(np.ones((20, 8)), "tsne")
    np.testing.assert_array_equal(xy, np.zeros((20, 2)))


@pytest.mark.parametrize("x, kwargs, match", [
    (np.zeros(5), {}, "2-D array"),
    (np.zeros((0, 3)), {}, "no rows"),
    (np.array([[0.0, 1.0]] * 9 + [[np.nan, 1.0]]), {}, r"rows \[9\]"),
    (np.random.default_rng(0).normal(size=(10, 3)), {"method": "pca3d"}, "unknown projection method"),
    (np.random.default_rng(0).normal(size=(10, 3)), {"perplexity": 0}, "perplexity must be > 0"),
    (np.random.default_rng(0).normal(size=(10, 3)), {"method": "umap", "n_neighbors": 1}, "n_neighbors must be >= 2"),
])
def test_bad_input_is_named(x, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ev.project_2d(x, **kwargs)


def test_umap_is_not_imported_with_the_module():
    code = "import sys, cxrlib.embedding_viz; assert 'umap' not in sys.modules, 'umap imported eagerly'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.slow
def test_umap_seeded_separates_and_lowers_n_neighbors():
    x, labels = _blobs(n=40, d=16, sep=8.0)
    a = ev.project_2d(x, "umap", seed=0, n_neighbors=10)
    b = ev.project_2d(x, "umap", seed=0, n_neighbors=10)
    np.testing.assert_allclose(a, b)
    assert _map_1nn_acc(a, labels) >= 0.95
    info: dict = {}
    with pytest.warns(ev.ProjectionWarning, match="n_neighbors 15 needs more than 8 points: using 7"):
        xy = ev.project_2d(x[:8], "umap", n_neighbors=15, info=info)
    assert xy.shape == (8, 2) and info["n_neighbors"] == 7


# ---- k-NN and metrics ------------------------------------------------------------------------------------


def test_knn_vote_hand_cases():
    np.testing.assert_array_equal(ev.knn_vote(np.array([[1, 0, 0], [1, 1, 0]])), [0, 1])
    # a 2-2 tie goes to the label of the nearer neighbours
    np.testing.assert_array_equal(ev.knn_vote(np.array([[1, 0, 0, 1], [0, 1, 1, 0]])), [1, 0])
    np.testing.assert_array_equal(ev.knn_vote(np.array([["a", "b", "b"], ["c", "c", "a"]])), ["b", "c"])


@pytest.mark.parametrize("k", [1, 5, 7])
def test_knn_predict_equals_naive_loops(k):
    rng = np.random.default_rng(k)
    q, g = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    lq, lg = rng.integers(0, 2, 40), rng.integers(0, 2, 30)
    np.testing.assert_array_equal(ev.knn_predict(q, None, lq, k), _naive_knn(q, q, lq, k, loo=True))
    np.testing.assert_array_equal(ev.knn_predict(q, g, lg, k), _naive_knn(q, g, lg, k, loo=False))


def test_metrics_on_hand_built_geometry():
    # normal studies point along e1, abnormal along e2 (images), reports along e3/e4: perfect label clusters,
    # orthogonal modalities (centroid gap sqrt(2 * 0.5^2 * 2) = 1, pair cosine 0)
    labels = np.array([0, 0, 0, 1, 1, 1])
    eye = np.eye(4, dtype=np.float32)
    img = eye[labels]
    txt = eye[labels + 2]
    m = ev.embedding_metrics(img, txt, labels, k=1)
    assert m["image"]["silhouette"] == pytest.approx(1.0) and m["text"]["silhouette"] == pytest.approx(1.0)
    assert m["image"]["knn_acc"] == 1.0 and m["image"]["knn_balanced_acc"] == 1.0
    assert m["image"]["label_centroid_dist"] == pytest.approx(1.0)
    j = m["joint"]
    assert j["centroid_gap"] == pytest.approx(1.0) and j["pair_cosine"] == pytest.approx(0.0)
    assert j["silhouette_modality"] == pytest.approx(0.4)  # a = 3/5 (3 of 5 same-modality points at 1), b = 1
    assert m["knn_chance"] == 0.5 and m["notes"] == [] and m["seed"] == 0
    # reports identical to their images: no gap, perfect pairs
    m2 = ev.embedding_metrics(img, img * 3.0, labels, k=1)  # scale is irrelevant (cosine space)
    assert m2["joint"]["centroid_gap"] == pytest.approx(0.0) and m2["joint"]["pair_cosine"] == pytest.approx(1.0)
    assert m2["joint"]["knn_acc_i2t"] == 1.0


def test_metrics_equal_naive_references():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 50)
    img = rng.normal(size=(50, 8)) + labels[:, None]
    txt = rng.normal(size=(50, 8)) - labels[:, None]
    groups = np.where(labels == 0, "normal", rng.choice(["Edema", "Cardiomegaly", "multiple"], 50))
    m = ev.embedding_metrics(img, txt, labels, k=5, groups=groups)
    assert m["image"]["silhouette"] == pytest.approx(_naive_silhouette(img, labels), abs=1e-9)
    assert m["joint"]["silhouette"] == pytest.approx(
        _naive_silhouette(np.concatenate([img, txt]), np.concatenate([labels, labels])), abs=1e-9)
    assert m["text"]["knn_acc"] == pytest.approx((_naive_knn(txt, txt, labels, 5, True) == labels).mean())
    assert m["joint"]["knn_acc_t2i"] == pytest.approx((_naive_knn(txt, img, labels, 5, False) == labels).mean())
    single = groups != "multiple"
    ref = (_naive_knn(img[single], img[single], groups[single], 5, True) == groups[single]).mean()
    assert m["image"]["knn_acc_finding"] == pytest.approx(ref)
    u = img / np.linalg.norm(img, axis=1, keepdims=True)
    v = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    assert m["joint"]["centroid_gap"] == pytest.approx(np.linalg.norm(u.mean(0) - v.mean(0)))


def test_single_class_gives_nan_and_a_note_not_a_crash():
    x, _ = _blobs(n=20, d=4)
    with pytest.warns(ev.ProjectionWarning, match="only one"):
        m = ev.embedding_metrics(x, x + 1, np.zeros(20, int), k=3)
    assert np.isnan(m["image"]["silhouette"]) and np.isnan(m["image"]["knn_balanced_acc"])
    assert m["knn_chance"] == 1.0 and any("only one label" in n for n in m["notes"])
    assert np.isfinite(m["joint"]["centroid_gap"])


def test_metrics_bad_input():
    x, labels = _blobs(n=10, d=4)
    with pytest.raises(ValueError, match="differ in length"):
        ev.embedding_metrics(x, x[:9], labels)
    with pytest.raises(ValueError, match=r"all-zero rows \[2\]"):
        ev.embedding_metrics(np.where(np.arange(10)[:, None] == 2, 0.0, x), x, labels)
    with pytest.warns(ev.ProjectionWarning, match="dims differ"):
        m = ev.embedding_metrics(x, x[:, :3], labels, k=3)
    assert m["joint"] == {} and np.isfinite(m["text"]["knn_acc"])


def test_write_metrics_files_and_table(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(30) % 2
    before = ev.embedding_metrics(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)), labels, seed=7, k=3)
    after = ev.embedding_metrics(np.eye(2)[labels] + 0.01, np.eye(2)[labels], labels, seed=7, k=3)
    out = ev.write_metrics({"before": before, "after": after}, tmp_path, settings={"split": "test"})
    frame = pd.read_csv(out["csv"])
    assert set(frame.columns) == {"stage", "space", "metric", "value", "n", "k", "seed"}
    assert set(frame["stage"]) == {"before", "after"} and (frame["seed"] == 7).all()
    payload = json.loads(out["json"].read_text())
    assert payload["seed"] == 7 and payload["settings"] == {"split": "test"}
    md = out["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| image | silhouette |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    b, a = before["image"]["silhouette"], after["image"]["silhouette"]
    assert cells[2:] == [f"{b:.3f}", f"{a:.3f}", f"{round(a - b, 3) + 0.0:+.3f}"]
    assert "-0.000" not in md
    assert "seed = 7" in md


# ---- inputs ----------------------------------------------------------------------------------------------


def test_finding_groups_hand_case():
    names = ["No Finding", "Cardiomegaly", "Edema", "Fracture"]
    nan = np.nan
    f = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0],
                  [nan, nan, nan, nan], [0, 0, 0, 1]], dtype=np.float32)
    labels = np.array([0, 1, 1, 1, 1, 1, 1, 1])
    got = ev.finding_groups(f, names, labels, top=2)
    assert got.tolist() == ["normal", "Cardiomegaly", "Cardiomegaly", "Edema", "multiple", "other abnormal",
                            "unlabelled", "other abnormal"]  # Fracture is the third most frequent: not kept
    assert ev.finding_groups(None, names, labels).tolist()[:2] == ["normal", "other abnormal"]


def test_sample_rows():
    a = ev.sample_rows(100, 30, seed=1)
    assert len(a) == 30 and len(set(a)) == 30 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, ev.sample_rows(100, 30, seed=1))
    assert not np.array_equal(a, ev.sample_rows(100, 30, seed=2))
    for size in (None, 0, 100, 500):
        np.testing.assert_array_equal(ev.sample_rows(100, size, 0), np.arange(100))


def test_apply_projector_batches_equal_one_pass():
    from cxrlib.projector import build_projector

    torch.manual_seed(0)
    model = build_projector("mlp", 8, 8, out_dim=4, width=16, depth=1)
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(25, 8)).astype(np.float32), rng.normal(size=(25, 8)).astype(np.float32)
    a_img, a_txt = ev.apply_projector(model, img, txt, batch_size=7)
    assert model.training  # the caller's mode is restored; the projection itself ran in eval mode
    with torch.no_grad():
        ref = model.eval().encode_image(torch.from_numpy(img)).numpy()
    np.testing.assert_allclose(a_img, ref, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a_txt, axis=1), 1.0, atol=1e-5)


def _study_table(n: int) -> pd.DataFrame:
    from cxrlib.datasets.labels import FINDING_LABELS

    labels = np.arange(n) % 2
    table = pd.DataFrame({
        "study_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
        "image_id": [f"i{i}" for i in range(n)], "image_path": [f"/x/i{i}.png" for i in range(n)],
        "view": "frontal", "findings": "f", "impression": "i", "report": [f"report {i}" for i in range(n)],
        "text_sections": "findings+impression", "label_abnormal": labels,
        "split": np.where(np.arange(n) < n // 2, "test", "train"), "report_group": np.arange(n),
        "report_dup_count": 1, "source": "test"})
    for name in FINDING_LABELS:
        table[name] = np.float32(0)
    table["No Finding"] = (labels == 0).astype(np.float32)
    table["Edema"] = labels.astype(np.float32)
    return table


def _write_fixture(n: int, dataset: str = "toy", backbone: str = "open_clip:a:b", run: str = "main"):
    """A valid study table, unit-norm embeddings (text file in reverse id order) and an identity-start projector."""
    from cxrlib import paths
    from cxrlib.datasets.table import save_study_table
    from cxrlib.embstore import Embeddings, save_embeddings
    from cxrlib.projector import build_projector, save_projector

    table = _study_table(n)
    save_study_table(table, paths.study_table_path(dataset))
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, 6)).astype(np.float32) + 2.0 * table["label_abnormal"].to_numpy()[:, None]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    d = paths.embeddings_dir() / dataset / "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone)
    save_embeddings(d / "image.npz", Embeddings(table["image_id"], emb, {"backbone": backbone}))
    save_embeddings(d / "text.npz", Embeddings(table["study_id"][::-1], emb[::-1], {"backbone": backbone}))
    from cxrlib import dag

    ckpt = save_projector(paths.results_dir(dag.out_key("smoke", dataset)) / "models" / run / "projector.pt",
                          build_projector("residual_mlp", 6, 6, width=8), {"seed": 0})
    return table, ckpt


def test_load_viz_data_pairs_before_and_after(workdir):
    table, ckpt = _write_fixture(24)
    data = ev.load_viz_data("toy", "open_clip:a:b", ckpt, split="test", sample_size=8, seed=0)
    idx = ev.sample_rows(12, 8, 0)
    test_rows = table[table["split"] == "test"].reset_index(drop=True)
    assert data.n_split == 12 and list(data.study_ids) == test_rows["study_id"].iloc[idx].tolist()
    img, txt = data.spaces["before"]
    np.testing.assert_allclose(img, txt)  # the text file holds the same vectors in reverse id order
    # a residual MLP starts as the identity: after == before (both L2-normalised)
    np.testing.assert_allclose(data.spaces["after"][0], img, atol=1e-6)
    assert set(data.groups) <= {"normal", "Edema"} and (data.groups == "normal").sum() == (data.labels == 0).sum()
    maps, log = ev.project_views(data, ["tsne"], perplexity=2)
    assert set(maps) == {("tsne", s, sp) for s in ("before", "after") for sp in ("image", "text", "joint")}
    assert maps[("tsne", "after", "joint")].shape == (16, 2) and len(log) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.embedding_metrics(*data.spaces["after"], data.labels, k=3)
    # a projector of another backbone, or of other dims, is refused with its path named
    from cxrlib import paths
    from cxrlib.projector import build_projector, save_projector

    other = save_projector(paths.results_dir("smoke") / "models" / "x" / "projector.pt",
                           build_projector("linear", 6, 6), {"backbone": "clip"})
    with pytest.raises(ValueError, match="trained on backbone 'clip', not 'open_clip:a:b'"):
        ev.load_viz_data("toy", "open_clip:a:b", other)
    wide = save_projector(paths.results_dir("smoke") / "models" / "y" / "projector.pt",
                          build_projector("linear", 8, 8), {})
    with pytest.raises(ValueError, match=r"takes image/text dims \(8, 8\)"):
        ev.load_viz_data("toy", "open_clip:a:b", wide)


def test_plots_write_png_and_pdf(tmp_path):
    from cxrlib import plots

    plots.apply_style()
    rng = np.random.default_rng(0)
    labels = np.arange(20) % 2
    maps = {"before": rng.normal(size=(20, 2)), "after": rng.normal(size=(20, 2))}
    groups = np.where(labels == 0, "normal", np.where(np.arange(20) % 4 == 1, "Edema", "multiple"))
    figs = {
        "label": plots.plot_label_maps(maps, labels, "tsne", title="t", scores={"before": "s 0.1"}),
        "finding": plots.plot_finding_maps(maps, groups, "umap"),
        "joint": plots.plot_modality_maps({k: np.concatenate([v, v + 5]) for k, v in maps.items()}, labels, "tsne"),
    }
    assert figs["label"].axes[0].get_title() == "Frozen backbone\ns 0.1"
    assert figs["finding"].axes[0].get_xlabel() == "UMAP 1"
    legend = [t.get_text() for t in figs["finding"].legends[0].get_texts()]
    assert legend == ["normal (10)", "Edema (5)", "multiple (5)"]
    for name, fig in figs.items():
        written = plots.save_figure(fig, name, tmp_path, subtitle="SMOKE")
        assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)
    with pytest.raises(ValueError, match="expected 2 x 20"):
        plots.plot_modality_maps(maps, labels, "tsne")


def test_score_caption():
    m = {"k": 10, "image": {"silhouette": 0.1234, "knn_acc": 0.8}, "joint": {"centroid_gap": 0.5, "silhouette": -0.02}}
    assert ev.score_caption(m, "image") == "silhouette 0.12 · 10-NN acc. 0.80"
    assert ev.score_caption(m, "joint") == "centroid gap 0.50 · label silhouette -0.02"
    assert ev.score_caption(m, "text") == ""


@pytest.mark.slow
def test_notebook_04_runs_on_fixture(workdir):
    import nbformat

    _write_fixture(40, dataset="fixture", backbone="tiny", run="bce1-supcon0.5-clip1")
    nb = REPO / "notebooks" / "04_embedding_viz.ipynb"
    out = workdir / "04.out.ipynb"
    env = {"CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    # "fixture" is no registered data set: the run is given, as make passes it (dag names it from the recipe)
    params = {"profile": "smoke", "dataset": "fixture", "backbone": "tiny", "run": "bce1-supcon0.5-clip1",
              "methods": ["tsne"], "perplexity": 30, "sample_size": 0, "k": 3}
    run_notebook(nb.name, params, out, env)  # in this process (papermill runs 04 in the smoke DAG)
    res, fig = workdir / "results" / "smoke-fixture", workdir / "figures" / "smoke-fixture"
    frame = pd.read_csv(res / "embedding_metrics.csv")
    assert set(frame["stage"]) == {"before", "after"} and (frame["n"] == 20).all()
    payload = json.loads((res / "embedding_metrics.json").read_text())
    assert payload["seed"] == 0 and payload["settings"]["run"] == "bce1-supcon0.5-clip1"
    log = pd.read_csv(res / "embedding_maps.csv")
    assert len(log) == 6 and log["fallbacks"].str.contains("perplexity 30 is too large").all()
    stems = {p.stem for p in fig.glob("embedding_*.png")}
    assert stems == {f"embedding_tsne_{s}" for s in ("image_label", "image_finding", "text_label", "text_finding",
                                                     "joint_modality")}
    assert all((fig / f"{s}.pdf").is_file() for s in stems)
    executed = nbformat.read(out, as_version=4)
    assert any("SMOKE TEST" in "".join(o.get("text", "")) for c in executed.cells for o in c.get("outputs", []))


def test_warm_jit_maps_once_by_each_method_through_the_jit_libraries(monkeypatch, capsys):
    """``make env``'s warm-up (``python -m cxrlib.embedding_viz warm-jit``) maps by UMAP and by t-SNE on the
    openTSNE path (the two that JIT-compile), seeded, on float32 rows as the notebooks' embeddings are."""
    calls = []

    def fake(x, method, **kw):
        calls.append((method, x.dtype, x.shape, kw["opentsne_above"] < len(x), kw["seed"]))
        kw["info"]["backend"] = {"tsne": "openTSNE", "umap": "umap-learn"}[method]
        return np.zeros((len(x), 2), np.float32)

    monkeypatch.setattr(ev, "project_2d", fake)
    assert ev.main(["warm-jit"]) == 0
    assert sorted(calls) == [("tsne", np.float32, (200, 32), True, 0), ("umap", np.float32, (200, 32), True, 0)]
    assert "openTSNE" in capsys.readouterr().out


def test_make_env_warms_the_jit_cache():
    out = subprocess.run(["make", "-n", "-B", ".venv/.cxr-env-stamp"], cwd=REPO, capture_output=True, text=True,
                         check=True, env={k: v for k, v in os.environ.items() if k != "CONDA_PREFIX"})
    lines = out.stdout.splitlines()
    warm = [i for i, ln in enumerate(lines) if ln.endswith("-m cxrlib.embedding_viz warm-jit")]
    install = [i for i, ln in enumerate(lines) if "pip install" in ln and "-e" in ln]
    assert warm and install and warm[0] > install[-1]  # after the package is installed


def test_umap_is_imported_with_numba_caching_and_numba_restored():
    """In a fresh process (umap not yet imported): umap's and pynndescent's numba functions cache to disk
    (the next kernel skips their compilation), and numba's decorators are the originals afterwards."""
    import subprocess
    import sys

    code = (
        "import numba; njit, jit = numba.njit, numba.jit\n"
        "from numba.core.caching import NullCache\n"
        "from cxrlib import embedding_viz as ev\n"
        "umap = ev.import_umap()\n"
        "import pynndescent.utils as p, umap.umap_ as u\n"
        "def cached(m): return [n for n, f in vars(m).items() if hasattr(f, '_cache') and not isinstance(f._cache, NullCache)]\n"
        "assert cached(u) and cached(p), (cached(u), cached(p))\n"
        "assert numba.njit is njit and numba.jit is jit\n"
        "assert ev.import_umap() is umap\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
