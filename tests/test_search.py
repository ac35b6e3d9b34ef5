"""cxrlib.search on a real (random-weight) tiny backbone: ranked lists against a numpy reference,
a fresh query equal to the cached one, the projector path, export, CLI and every bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cxrlib import paths, search
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.table import save_study_table

REPORTS = ["Small left pleural effusion.", "Heart size is enlarged.", "No acute cardiopulmonary abnormality.",
           "Right upper lobe opacity.", "No acute cardiopulmonary abnormality."]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """What `make smoke` leaves for search: the study table, caches `tiny` and `tiny-adapted` (from an
    adapted checkpoint) and the main projector run, in a temporary CXR_WORKDIR."""
    root = tmp_path_factory.mktemp("search")
    mp = pytest.MonkeyPatch()
    mp.setenv("CXR_WORKDIR", str(root))
    from cxrlib.backbones import load_backbone, save_adapted
    from cxrlib.embed import extract_embeddings
    from cxrlib.projector import build_projector, save_projector
    from cxrlib.retrieval import projector_path

    rng = np.random.default_rng(0)
    rows = []
    for i in range(20):
        path = root / "imgs" / f"i{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8), "L").save(path)
        report = REPORTS[i % len(REPORTS)]
        findings = {f: 0.0 for f in FINDING_LABELS}
        abnormal = int("No acute" not in report)
        findings["No Finding"] = float(not abnormal)
        findings["Pleural Effusion"] = float("effusion" in report)
        rows.append({"study_id": f"s{i}", "patient_id": f"p{i}", "image_id": f"i{i}", "image_path": str(path),
                     "view": "frontal", "findings": "", "impression": report, "report": report,
                     "text_sections": "impression", "label_abnormal": abnormal, **findings,
                     "split": "test" if i < 14 else "train", "report_dup_count": 1, "source": "fixture"})
    table = pd.DataFrame(rows)
    table["report_group"] = pd.factorize(table["report"])[0]
    save_study_table(table, paths.study_table_path("synthetic"))
    emb = paths.embeddings_dir() / "synthetic"
    extract_embeddings(table, "tiny", emb / "tiny", batch_size=8, num_workers=0, precision="fp32",
                       device="cpu", progress=False)
    adapted = load_backbone("tiny")
    with torch.no_grad():
        for p in adapted.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = save_adapted(paths.models_dir() / "synthetic" / "tiny-adapted.pt", adapted)
    extract_embeddings(table, "tiny", emb / "tiny-adapted", batch_size=8, num_workers=0, precision="fp32",
                       device="cpu", checkpoint=ckpt, name="tiny-adapted", progress=False)
    spec = search.model_specs("smoke")["tiny-adapted + projector"]
    torch.manual_seed(0)
    # a linear map keeps random embeddings spread out (a fresh residual MLP maps them nearly together)
    proj = build_projector("linear", adapted.embed_dim, adapted.embed_dim)
    save_projector(projector_path("smoke", spec.run), proj, {"backbone": "tiny-adapted", "dataset": "synthetic"})
    yield root, table
    mp.undo()


@pytest.fixture
def env(built, monkeypatch):
    monkeypatch.setenv("CXR_WORKDIR", str(built[0]))
    return built


def _reference_scores(query: np.ndarray, gallery: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """Naive cosine of the query with each gallery item, in float64."""
    q = query / np.linalg.norm(query)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return {str(i): float(v) for i, v in zip(ids, g.astype(np.float64) @ q.astype(np.float64))}


def _assert_ranked_as(got: list[str], scores: dict[str, float], atol: float = 1e-5) -> None:
    """``got`` is a best-first top-k of ``scores``: the item at each rank scores what the naive ranking's
    item at that rank scores (ties, equal up to float rounding, may come in either order), no repeats."""
    best = sorted(scores.values(), reverse=True)
    assert len(set(got)) == len(got)
    for rank, sid in enumerate(got):
        assert abs(scores[sid] - best[rank]) <= atol, (rank, sid, scores[sid], best[:len(got)])


def test_models_named_as_notebook_03(env):
    assert list(search.model_specs("smoke")) == ["tiny (frozen)", "tiny-adapted (frozen)", "tiny-adapted + projector"]


def test_by_study_matches_numpy_reference_and_marks_duplicates(env):
    r = search.Retriever.from_run("smoke", "tiny-adapted + projector", device="cpu")
    assert len(r.gallery) == 14 and set(r.gallery.table["split"]) == {"test"}
    out = r.by_study("s3", k=6)
    ref = out["study_id"].tolist()
    _assert_ranked_as(ref, _reference_scores(r.gallery.img[3], r.gallery.txt, r.gallery.study_ids))
    assert list(out.columns) == list(search.RESULT_COLUMNS) and out["rank"].tolist() == [1, 2, 3, 4, 5, 6]
    assert out["score"].is_monotonic_decreasing
    assert out["is_query_study"].tolist() == [s == "s3" for s in ref]
    for _, row in out.iterrows():  # a duplicate names the first higher rank with the same report text
        earlier = out[(out["rank"] < row["rank"]) & (out["report"] == row["report"])]
        assert (pd.isna(row["same_text_as_rank"]) and earlier.empty) or row["same_text_as_rank"] == earlier["rank"].min()
    labels = dict(zip(r.gallery.study_ids, r.gallery.labels))
    assert out["label_abnormal"].tolist() == [labels[s] for s in ref]


def _same_ranking(fresh, ref, k: int, atol: float = 1e-5) -> None:
    """``fresh`` (top k) ranks as ``ref`` (top k + more): equal scores rank by rank, and each item is one
    the reference scores the same. Identical reports tie, and a fresh encoding may order a tie by ~1e-6."""
    np.testing.assert_allclose(fresh["score"], ref["score"][:k], atol=atol)
    for sid, score in zip(fresh["study_id"], fresh["score"]):
        tied = ref.loc[(ref["score"] - score).abs() <= atol, "study_id"].tolist()
        assert sid in tied, (sid, score, ref.head(k + 5))


def test_fresh_queries_equal_the_cached_ones(env):
    """A typed report / an image file is encoded by the backbone that made the cache (the adapted
    checkpoint), then projected: the ranking equals the one from the study's cached embedding."""
    _, table = env
    r = search.Retriever.from_run("smoke", "tiny-adapted + projector", device="cpu")
    sid = "s1"
    row = table.set_index("study_id").loc[sid]
    _same_ranking(r.by_text(row["report"], k=5), r.by_study(sid, k=10, modality="text"), 5)
    by_image = r.by_image(row["image_path"], k=5)
    _same_ranking(by_image, r.by_study(sid, k=10), 5)
    arr = np.asarray(Image.open(row["image_path"]))
    _same_ranking(r.by_image(arr, k=5), r.by_study(sid, k=10), 5)


def test_batched_queries(env):
    r = search.Retriever.from_run("smoke", "tiny (frozen)", device="cpu")
    r.batch_size = 2
    many = r.by_text(REPORTS[:3], k=4)
    assert many["query"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for q, text in enumerate(REPORTS[:3]):
        one = r.by_text(text, k=4)
        assert many[many["query"] == q]["study_id"].tolist() == one["study_id"].tolist()


def test_frozen_model_uses_the_raw_cache(env):
    r = search.Retriever.from_run("smoke", "tiny (frozen)", device="cpu")
    assert r.projector is None
    out = r.by_study("s0", k=3, modality="text")
    _assert_ranked_as(out["study_id"].tolist(), _reference_scores(r.gallery.txt[0], r.gallery.img, r.gallery.study_ids))


def test_export_parquet(env, tmp_path):
    r = search.Retriever.from_run("smoke", "tiny-adapted + projector", device="cpu")
    written = r.export(tmp_path / "exp", k=3)
    emb = pd.read_parquet(written["embeddings"])
    assert len(emb) == 14 and np.allclose(np.stack(emb["image_embedding"]), r.gallery.img, atol=1e-6)
    ranked = pd.read_parquet(written["ranked_image_to_text"])
    assert len(ranked) == 14 * 3
    first = ranked[ranked["query"] == 0].reset_index(drop=True)  # one batched ranking vs one query alone:
    _same_ranking(first, r.by_study(str(r.gallery.study_ids[0]), k=6), k=3)  # near-ties may swap by ~1e-7


def _cli(*args: str, root) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "CXR_WORKDIR": str(root), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cxrlib.search", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_table_and_json(env, capsys):
    root, _ = env
    out = _cli("--profile", "smoke", "--model", "tiny-adapted + projector", "--text", "small left pleural effusion",
               "-k", "3", root=root)  # the entry point in a process of its own
    assert out.returncode == 0, out.stderr
    assert "rank" in out.stdout and "study_id" in out.stdout and len(out.stdout.strip().splitlines()) == 5
    capsys.readouterr()  # the same main() in this process: no second interpreter start
    assert search.main(["--profile", "smoke", "--model", "tiny (frozen)", "--image", str(root / "imgs" / "i2.png"),
                        "-k", "2", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in records] == [1, 2] and {"study_id", "score", "report", "label_abnormal"} <= set(records[0])


@pytest.mark.parametrize("args,message", [
    (["--profile", "nope", "--model", "x", "--text", "a"], "unknown profile 'nope'"),
    (["--profile", "smoke", "--model", "BiomedCLIP", "--text", "a"], "choose one of ['tiny (frozen)'"),
    (["--profile", "smoke", "--model", "tiny (frozen)", "--text", "   "], "empty"),
    (["--profile", "smoke", "--model", "tiny (frozen)", "--image", "/no/such.png"], "file not found"),
    (["--profile", "smoke", "--model", "tiny (frozen)", "--study", "s999"], "not in the gallery"),
])
def test_cli_bad_input(env, capsys, args, message):
    assert search.main(args) == 2
    assert message in capsys.readouterr().err


def test_unreadable_image_and_bad_array(env, tmp_path):
    r = search.Retriever.from_run("smoke", "tiny (frozen)", device="cpu")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(search.SearchError, match="bad.png"):
        r.by_image(bad)
    with pytest.raises(search.SearchError, match="shape"):
        r.by_image(np.zeros(5))


def test_missing_embeddings_name_the_make_target(env, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_EMBEDDINGS_DIR", str(tmp_path / "none"))
    with pytest.raises(search.SearchError) as err:
        search.Retriever.from_run("smoke", "tiny (frozen)")
    assert "`make embed PROFILE=smoke`" in str(err.value)
    dry = subprocess.run(["make", "-n", "embed", "PROFILE=smoke"], cwd=paths.repo_root(), capture_output=True,
                         text=True, env={"PATH": "/usr/bin:/bin", "CXR_WORKDIR": str(tmp_path)})
    assert dry.returncode == 0 and "embed tiny" in dry.stdout, dry.stdout[-1500:] + dry.stderr[-1500:]
