"""Synthetic radiographs and reports: determinism, findings where expected, labels match the text,
atomic and resumable file rendering, MeSH coverage on real Open-I terms, and learnability by a CNN."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrlib.datasets import synthetic
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.synthetic import (
    make_synthetic_studies,
    mesh_to_render,
    render_openi_images,
    render_radiograph,
)

S = 128  # test image size (drawn at full resolution: <= INTERNAL_MAX)


def arr(findings, view="frontal", seed=3, size=S) -> np.ndarray:
    return np.asarray(render_radiograph(findings, view, size, seed), dtype=np.float32)


# ---- the renderer ------------------------------------------------------------------------------

def test_render_is_deterministic_per_seed_and_varies_across_seeds():
    a, b = render_radiograph({"effusion", "cardiomegaly"}, "frontal", S, 11), \
        render_radiograph({"effusion", "cardiomegaly"}, "frontal", S, 11)
    assert a.mode == "L" and a.size == (S, S)
    assert a.tobytes() == b.tobytes()
    c = render_radiograph({"effusion", "cardiomegaly"}, "frontal", S, 12)
    assert np.abs(np.asarray(a, float) - np.asarray(c, float)).mean() > 2  # anatomy/exposure vary per seed
    # an explicit Generator and an int seed agree
    g = render_radiograph({"effusion", "cardiomegaly"}, "frontal", S, np.random.default_rng(11))
    assert g.tobytes() == a.tobytes()


def test_views_differ_and_sizes_follow_the_request():
    fr, la = arr(set(), "frontal"), arr(set(), "lateral")
    assert np.abs(fr - la).mean() > 15
    # two frontal images of different patients are closer to each other than a frontal to a lateral
    within = np.mean([np.abs(arr(set(), "frontal", s) - arr(set(), "frontal", s + 1)).mean() for s in range(4)])
    across = np.mean([np.abs(arr(set(), "frontal", s) - arr(set(), "lateral", s + 1)).mean() for s in range(4)])
    assert within < 0.7 * across, (within, across)
    assert render_radiograph(set(), "lateral", 224, 0).size == (224, 224)
    assert render_radiograph(set(), "frontal", 256, 0).size == (256, 256)  # half-resolution path


def _region(a: np.ndarray, x0, x1, y0, y1) -> np.ndarray:
    """A box given in fractions of width (x) and height (y)."""
    h, w = a.shape
    return a[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)]


# (findings, changed box, untouched box, sign of the change: +1 brighter, -1 darker). Patient right =
# image left (PA). Boxes are generous: anatomy shifts and rotates per image.
LOCAL_CASES = {
    "cardiomegaly": ({"cardiomegaly": {"severity": 1.0}}, (0.6, 0.85, 0.45, 0.7), (0.1, 0.3, 0.1, 0.4), +1),
    "effusion right": ({"effusion": {"side": "right", "severity": 1.0}}, (0.08, 0.42, 0.45, 0.7),
                       (0.58, 0.92, 0.45, 0.7), +1),
    "effusion left": ({"effusion": {"side": "left", "severity": 1.0}}, (0.58, 0.92, 0.45, 0.7),
                      (0.08, 0.42, 0.45, 0.7), +1),
    "opacity right upper": ({"opacity": {"side": "right", "zone": "upper", "severity": 1.0}},
                            (0.1, 0.45, 0.1, 0.45), (0.55, 0.9, 0.1, 0.45), +1),
    "mass left": ({"mass": {"side": "left", "zone": "middle"}}, (0.55, 0.9, 0.3, 0.6), (0.1, 0.45, 0.3, 0.6), +1),
    "pneumothorax left": ({"pneumothorax": {"side": "left", "severity": 1.0}}, (0.55, 0.95, 0.1, 0.6),
                          (0.05, 0.45, 0.1, 0.6), -1),
    "hyperinflation": ({"hyperinflation": {"severity": 1.0}}, (0.1, 0.9, 0.15, 0.55), (0.0, 1.0, 0.9, 1.0), -1),
    "pacemaker": ({"pacemaker"}, (0.6, 0.85, 0.05, 0.35), (0.05, 0.4, 0.05, 0.35), +1),
    "edema": ({"edema": {"severity": 1.0}}, (0.25, 0.75, 0.35, 0.6), (0.0, 1.0, 0.9, 1.0), +1),
    "atelectasis right": ({"atelectasis": {"side": "right", "severity": 1.0}}, (0.05, 0.45, 0.4, 0.7),
                          (0.55, 0.95, 0.1, 0.4), +1),
}


@pytest.mark.parametrize("name", sorted(LOCAL_CASES))
def test_findings_change_pixels_where_expected(name):
    findings, where, elsewhere, sign = LOCAL_CASES[name]
    changes = []
    for seed in (0, 1, 2):
        base, with_f = arr(set(), seed=seed), arr(findings, seed=seed)
        d = with_f - base
        changes.append((sign * _region(d, *where).mean(), np.abs(_region(d, *elsewhere)).mean()))
    inside = np.mean([c[0] for c in changes])
    outside = np.mean([c[1] for c in changes])
    assert inside > 2.0, (name, inside)
    assert inside > 3 * outside, (name, inside, outside)


def test_every_finding_renders_and_changes_the_image_in_both_views():
    for key in synthetic.RENDER_FINDINGS:
        for view in ("frontal",) if key == "scoliosis" else ("frontal", "lateral"):
            d = np.abs(arr({key}, view) - arr(set(), view))
            # small (granuloma) or subtle (scoliosis, degenerative spine) findings must still show somewhere
            assert d.max() > 15 and d.mean() > 0.02, (key, view, d.max(), d.mean())


def test_small_findings_are_local():
    base = arr(set(), seed=5, size=160)
    g = arr({"granuloma": {"count": 1}}, seed=5, size=160)
    changed = np.abs(g - base) > 10
    assert 2 <= changed.sum() < 0.01 * changed.size  # a few pixels: a small bright dot


def test_bad_findings_and_views_raise_naming_the_item():
    with pytest.raises(ValueError, match="pleurisy"):
        render_radiograph({"pleurisy"}, "frontal", S, 0)
    with pytest.raises(ValueError, match="oblique"):
        render_radiograph(set(), "oblique", S, 0)
    with pytest.raises(ValueError, match="side"):
        render_radiograph({"effusion": {"side": "middle"}}, "frontal", S, 0)
    # aliases resolve
    a = render_radiograph({"pleural effusion": {"side": "left", "severity": 1}}, "frontal", S, 0)
    b = render_radiograph({"effusion": {"side": "left", "severity": 1}}, "frontal", S, 0)
    assert a.tobytes() == b.tobytes()


# ---- MeSH mapping --------------------------------------------------------------------------------

def test_mesh_to_render_hand_worked_cases():
    f, un = mesh_to_render("Cardiomegaly/borderline;Pulmonary Artery/enlarged")
    assert f == {"cardiomegaly": {"severity": 0.25}} and un == ["Pulmonary Artery/enlarged"]
    f, un = mesh_to_render("Pleural Effusion/left/small;Opacity/lung/base/right;Lung/hyperdistention")
    assert f["effusion"] == {"side": "left", "severity": 0.35}
    assert f["opacity"] == {"side": "right", "zone": "lower"}
    assert "hyperinflation" in f and un == []
    f, _ = mesh_to_render("Pleural Effusion/left;Pleural Effusion/right")
    assert f["effusion"]["side"] == "bilateral"
    assert mesh_to_render("normal") == ({}, [])
    f, un = mesh_to_render("Lung/hypoinflation;Markings/bronchovascular")
    assert set(f) == {"hypoinflation"} and un == ["Markings/bronchovascular"]
    f, _ = mesh_to_render("Granulomatous Disease;Catheters, Indwelling;Thoracic Vertebrae/degenerative")
    assert set(f) == {"granuloma", "central_line", "spine_degenerative"} and f["granuloma"]["count"] == 3


def test_mesh_mapping_covers_real_openi_terms(openi_shared):
    reports = pd.read_csv(openi_shared / "indiana_reports.csv")
    abnormal = reports["MeSH"].dropna()
    abnormal = abnormal[~abnormal.str.lower().isin(["normal", "no indexing"])]
    drawn = [bool(mesh_to_render(m)[0]) for m in abnormal]
    unmapped = pd.Series([t.split("/")[0] for m in abnormal for t in mesh_to_render(m)[1]]).value_counts()
    print(f"\nabnormal Open-I studies with a drawn finding: {np.mean(drawn):.1%} of {len(drawn)}; "
          f"top unmapped headings: {unmapped.head(8).to_dict()}")
    assert np.mean(drawn) > 0.85
    for term in ["Cardiomegaly", "Opacity", "Pleural Effusion", "Pulmonary Atelectasis", "Calcified Granuloma",
                 "Granulomatous Disease", "Pulmonary Emphysema", "Nodule", "Mass", "Pneumothorax", "Pulmonary Edema",
                 "Consolidation", "Pneumonia", "Infiltrate", "Catheters, Indwelling", "Medical Device",
                 "Implanted Medical Device", "Fractures, Bone", "Airspace Disease"]:
        assert mesh_to_render(term)[0], term
    assert mesh_to_render("Spine/degenerative")[0] and mesh_to_render("Aorta/tortuous")[0]
    assert mesh_to_render("Lung/hyperdistention")[0] and mesh_to_render("Thoracic Vertebrae/degenerative")[0]


# ---- rendering to files --------------------------------------------------------------------------

def _openi_rows() -> pd.DataFrame:
    return pd.DataFrame({"image_id": ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_1_IM-0652-1001",
                                      "CXR3_1_IM-1384-2001"],
                         "view": ["frontal", "lateral", "frontal", "frontal"],
                         "mesh": ["Pleural Effusion;Cardiomegaly/mild", "Pleural Effusion;Cardiomegaly/mild",
                                  "normal", "Hernia, Hiatal;Nodule/lung/right"]})


def test_render_openi_images_writes_pngs_then_skips_existing(tmp_path):
    rows = _openi_rows()
    out = render_openi_images(rows, tmp_path / "png", size=S, seed=0, n_jobs=1)
    assert list(out["image_id"]) == list(rows["image_id"]) and (out["status"] == "rendered").all()
    for p in out["image_path"]:
        p = Path(p)
        assert p.is_absolute() and p.suffix == ".png"
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (S, S)
    assert out.loc[3, "unmapped"] == "Hernia, Hiatal" and out.loc[3, "drawn"] == "nodule"
    mtimes = [Path(p).stat().st_mtime_ns for p in out["image_path"]]
    # a truncated file and a wrong-size file are redone; valid ones are kept untouched
    Path(out["image_path"][0]).write_bytes(Path(out["image_path"][0]).read_bytes()[:100])
    Image.new("L", (S // 2, S // 2)).save(out["image_path"][1])
    again = render_openi_images(rows, tmp_path / "png", size=S, seed=0, n_jobs=1)
    assert list(again["status"]) == ["rendered", "rendered", "existing", "existing"]
    assert [Path(p).stat().st_mtime_ns for p in again["image_path"]][2:] == mtimes[2:]
    # the redone file is identical to the first rendering (deterministic per seed + image_id)
    fresh = render_openi_images(rows.iloc[[0]], tmp_path / "other", size=S, seed=0, n_jobs=1)
    assert Path(fresh["image_path"][0]).read_bytes() == Path(again["image_path"][0]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == sorted(f"{i}.png" for i in rows["image_id"])


def test_render_openi_images_parallel_equals_serial(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "_MIN_PARALLEL", 1)
    rows = _openi_rows()
    a = render_openi_images(rows, tmp_path / "a", size=64, seed=4, n_jobs=1)
    b = render_openi_images(rows, tmp_path / "b", size=64, seed=4, n_jobs=2)
    for pa, pb in zip(a["image_path"], b["image_path"]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()


def test_views_of_one_openi_study_agree_on_sides():
    f = {"effusion": {}, "nodule": {}}
    a = synthetic._fix_params(f, 0, synthetic._study_key("CXR7_1_IM-2263-1001"))
    b = synthetic._fix_params(f, 0, synthetic._study_key("CXR7_1_IM-2263-2001"))
    assert a == b and a["effusion"]["side"] in ("left", "right", "bilateral")


def test_render_openi_images_never_leaves_partial_pngs(tmp_path, monkeypatch):
    rows = _openi_rows()
    real_save = Image.Image.save

    def failing_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")  # half a file, then the crash
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        render_openi_images(rows, tmp_path / "png", size=64, n_jobs=1)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert list((tmp_path / "png").iterdir()) == []  # neither a partial PNG nor a temp file


def test_render_openi_images_bad_input_names_the_item(tmp_path):
    rows = _openi_rows()
    with pytest.raises(ValueError, match="mesh"):
        render_openi_images(rows.drop(columns="mesh"), tmp_path, size=64)
    with pytest.raises(ValueError, match="CXR1_1_IM-0001-3001"):
        render_openi_images(pd.concat([rows, rows.iloc[[0]]]), tmp_path, size=64)
    bad = rows.copy()
    bad.loc[2, "view"] = "AP"
    with pytest.raises(ValueError, match="CXR2_1_IM-0652-1001.*'AP'"):
        render_openi_images(bad, tmp_path, size=64)
    assert not any(tmp_path.glob("*.png"))


# ---- fully synthetic studies ----------------------------------------------------------------------

#: an independent, negation-aware keyword labeler (a sentence starting "No"/"There is no" is negated)
KEYWORDS = {
    "Cardiomegaly": r"cardiomegaly|enlarge",
    "Lung Opacity": r"opacity|airspace disease",
    "Lung Lesion": r"nodule|mass\b",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Pneumonia": r"pneumonia",
    "Atelectasis": r"atelectasis",
    "Pneumothorax": r"pneumothorax",
    "Pleural Effusion": r"effusion",
    "Fracture": r"fracture",
    "Support Devices": r"catheter|central line|pacemaker|endotracheal tube|sternotomy",
}


def keyword_labels(text: str) -> dict[str, int]:
    out = dict.fromkeys(KEYWORDS, 0)
    for sent in re.split(r"(?<=\.)\s+", text.lower()):
        if re.match(r"\s*(no|there is no|negative)\b", sent):
            continue
        for name, pat in KEYWORDS.items():
            if re.search(pat, sent):
                out[name] = 1
    return out


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> pd.DataFrame:
    return make_synthetic_studies(240, tmp_path_factory.mktemp("syn"), seed=7, size=64,
                                  views=("frontal", "lateral"), n_jobs=1)


def test_synthetic_studies_schema_and_proportions(studies):
    cols = ["study_id", "patient_id", "image_id", "image_path", "view", "findings", "impression", "mesh",
            "label_abnormal", *FINDING_LABELS]
    assert list(studies.columns[:len(cols)]) == cols
    assert len(studies) == 480 and studies["image_id"].is_unique
    per_study = studies.drop_duplicates("study_id")
    assert 0.28 <= 1 - per_study["label_abnormal"].mean() <= 0.46  # ~37% normal, like Open-I
    assert per_study.groupby("patient_id").size().max() > 1  # some patients have several studies
    assert per_study["study_id"].groupby(per_study["patient_id"]).nunique().sum() == len(per_study)
    top = per_study["impression"].value_counts()
    assert top.index[0] == "No acute cardiopulmonary abnormality." and top.iloc[0] >= 20  # verbatim repeats
    assert set(studies["view"]) == {"frontal", "lateral"}
    assert all(Path(p).is_file() for p in studies["image_path"])


def test_report_labels_match_the_text(studies):
    per_study = studies.drop_duplicates("study_id")
    mismatches = []
    for _, row in per_study.iterrows():
        kw = keyword_labels(row["findings"] + " " + row["impression"])
        for name, v in kw.items():
            if float(row[name]) != v:
                mismatches.append((row["study_id"], name, row[name], v, row["findings"], row["impression"]))
        normal = row["label_abnormal"] == 0
        assert normal == (row["mesh"] == "normal") == (row["No Finding"] == 1.0)
        if normal:
            assert not any(kw.values()), row["findings"]
    assert not mismatches, mismatches[:3]


def test_synthetic_studies_are_deterministic(tmp_path):
    a = make_synthetic_studies(12, tmp_path / "a", seed=3, size=64, n_jobs=1)
    b = make_synthetic_studies(12, tmp_path / "b", seed=3, size=64, n_jobs=1)
    pd.testing.assert_frame_equal(a.drop(columns="image_path"), b.drop(columns="image_path"))
    for pa, pb in zip(a["image_path"], b["image_path"]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
    c = make_synthetic_studies(12, tmp_path / "c", seed=4, size=64, n_jobs=1)
    assert not a[["findings", "impression"]].equals(c[["findings", "impression"]])
    with pytest.raises(ValueError, match="oblique"):
        make_synthetic_studies(3, tmp_path, views=("oblique",))


# ---- learnability --------------------------------------------------------------------------------

LEARN_TARGETS = {
    "abnormal": None, "cardiomegaly": {"cardiomegaly"}, "effusion": {"effusion"}, "opacity": {"opacity"},
    "nodule/mass": {"nodule", "mass"}, "pneumothorax": {"pneumothorax"}, "edema": {"edema"},
    "hyperinflation": {"hyperinflation"}, "atelectasis": {"atelectasis"},
    "device": {"pacemaker", "central_line", "ett", "sternotomy"},
}


@pytest.mark.slow
def test_small_cnn_learns_the_findings(tmp_path, one_torch_thread):
    """A 4-layer CNN trained for a fixed budget (8 epochs of 1000 images) on 64 px images tells findings apart
    on held-out studies, far above chance (AUROC 0.5). With seeds 0-2 for data and weights every bound below
    held with a wide margin (the test uses seed 0)."""
    import torch
    from torch import nn
    from torchmetrics.functional.classification import binary_auroc

    torch.manual_seed(0)  # one thread (one_torch_thread): it behaves on a shared machine
    size, n_test, epochs = 64, 400, 8
    t0 = time.perf_counter()
    table = make_synthetic_studies(1400, tmp_path, seed=0, size=size, n_jobs=1)
    render_s = time.perf_counter() - t0
    x = np.stack([np.asarray(Image.open(p), dtype=np.float32) / 255.0 for p in table["image_path"]])
    drawn = [set(filter(None, d.split(";"))) for d in table["drawn"]]
    y = np.array([[abn] + [bool(keys & d) for keys in list(LEARN_TARGETS.values())[1:]]
                  for abn, d in zip(table["label_abnormal"], drawn)], dtype=np.float32)
    X, Y = torch.from_numpy(x)[:, None], torch.from_numpy(y)
    X = (X - X.mean()) / X.std()
    Xtr, Ytr, Xte, Yte = X[n_test:], Y[n_test:], X[:n_test], Y[:n_test]

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))

    model = nn.Sequential(nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
                          block(16, 32), block(32, 48), block(48, 64),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, Y.shape[1]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * -(-len(Xtr) // 50))
    pos = Ytr.mean(0).clamp(0.02, 0.98)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=(1 - pos) / pos)
    t1 = time.perf_counter()
    for _ in range(epochs):  # a fixed budget, not a wall-clock one: the result must not depend on load
        model.train()
        perm = torch.randperm(len(Xtr))
        for i in range(0, len(perm), 50):
            idx = perm[i:i + 50]
            opt.zero_grad()
            loss_fn(model(Xtr[idx]), Ytr[idx]).backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        scores = model(Xte)
    aurocs = {name: float(binary_auroc(scores[:, j], Yte[:, j].long()))
              for j, name in enumerate(LEARN_TARGETS) if 0 < Yte[:, j].sum() < n_test}
    print(f"\nrendered {len(table)} images in {render_s:.1f}s; trained {epochs} epochs in "
          f"{time.perf_counter() - t1:.1f}s; held-out positives "
          f"{ {k: int(Yte[:, j].sum()) for j, k in enumerate(LEARN_TARGETS)} } of {n_test}; AUROC:")
    print({k: round(v, 3) for k, v in aurocs.items()})
    assert aurocs["abnormal"] > 0.75
    for name in ("cardiomegaly", "effusion", "device", "hyperinflation"):
        assert aurocs[name] > 0.75, (name, aurocs[name])
    assert np.mean(list(aurocs.values())) > 0.72


# ---- files keyed by what drew them (seed, findings, renderer) ------------------------------------

def test_more_studies_in_the_same_folder_redraw_what_changed(tmp_path):
    """``make_synthetic_studies(12)`` after ``(10)`` in one folder: study i's findings can change with n, and
    every image must show its own row's findings (the old reuse-by-name kept images of other findings)."""
    first = make_synthetic_studies(10, tmp_path / "same", seed=0, size=64, n_jobs=1)
    second = make_synthetic_studies(12, tmp_path / "same", seed=0, size=64, n_jobs=1)
    fresh = make_synthetic_studies(12, tmp_path / "fresh", seed=0, size=64, n_jobs=1)
    changed = first.merge(second, on="image_id")
    assert (changed["drawn_x"] != changed["drawn_y"]).any()  # the case really arises
    pd.testing.assert_frame_equal(second.drop(columns="image_path"), fresh.drop(columns="image_path"))
    for a, b in zip(second["image_path"], fresh["image_path"]):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)), err_msg=a)


def test_a_file_drawn_from_another_seed_or_renderer_is_redrawn(tmp_path, monkeypatch):
    rows = _openi_rows()
    render_openi_images(rows, tmp_path / "png", size=64, seed=0, n_jobs=1)
    other_seed = render_openi_images(rows, tmp_path / "png", size=64, seed=1, n_jobs=1)
    assert (other_seed["status"] == "redrawn").all()
    fresh = render_openi_images(rows, tmp_path / "fresh", size=64, seed=1, n_jobs=1)
    for a, b in zip(other_seed["image_path"], fresh["image_path"]):
        np.testing.assert_array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert (render_openi_images(rows, tmp_path / "png", size=64, seed=1, n_jobs=1)["status"] == "existing").all()
    changed_mesh = rows.assign(mesh=["normal", "normal", "Cardiomegaly", "normal"])
    st = render_openi_images(changed_mesh, tmp_path / "png", size=64, seed=1, n_jobs=1)["status"].tolist()
    assert st == ["redrawn", "redrawn", "redrawn", "redrawn"]  # row 3 loses its nodule, the others change too
    monkeypatch.setattr(synthetic, "RENDERER_DIGEST", "another-renderer")
    assert (render_openi_images(changed_mesh, tmp_path / "png", size=64, seed=1, n_jobs=1)["status"]
            == "redrawn").all()
    # a file without a key (written by an older version) is redrawn once, then kept
    Image.new("L", (64, 64)).save(tmp_path / "png" / f"{rows['image_id'][0]}.png")
    again = render_openi_images(changed_mesh, tmp_path / "png", size=64, seed=1, n_jobs=1)["status"].tolist()
    assert again == ["redrawn", "existing", "existing", "existing"]
