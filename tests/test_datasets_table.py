"""Study table: report text, duplicates, leak-free stratified splits, validation, atomic save/load."""

import numpy as np
import pandas as pd
import pytest

from cxrlib.datasets import load_study_table, save_study_table
from cxrlib.datasets.fixtures import write_image
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.table import (
    REQUIRED_COLUMNS,
    SkipLog,
    assemble,
    clean_text,
    compose_report,
    patient_splits,
    report_groups,
    splits_path,
    validate_table,
)


def test_clean_text_anonymisation_token():
    text = "There are no XXXX of a pleural effusion. Normal chest x-XXXX. Heart &gt; normal."
    assert clean_text(text) == "There are no of a pleural effusion. Normal chest x. Heart > normal."
    assert clean_text(text, "keep") == "There are no XXXX of a pleural effusion. Normal chest x-XXXX. Heart > normal."
    assert clean_text(text, "[redacted]").startswith("There are no [redacted] of")
    assert clean_text(float("nan")) == "" and clean_text(None) == ""
    assert clean_text("  a \n  b  ") == "a b"


@pytest.mark.parametrize("sections,f,i,expect", [
    ("findings+impression", "F.", "I.", ("F. I.", "findings+impression")),
    ("findings+impression", "", "I.", ("I.", "impression")),
    ("findings", "F.", "I.", ("F.", "findings")),
    ("findings", "", "I.", ("I.", "impression")),
    ("impression", "F.", "", ("F.", "findings")),
    ("longest", "short", "a longer one", ("a longer one", "impression")),
    ("longest", "zz", "aaaa", ("aaaa", "impression")),  # by length, not lexicographic max (CXR-CLIP #10)
    ("findings", "", "", ("", "")),
])
def test_compose_report(sections, f, i, expect):
    assert compose_report(f, i, sections) == expect


def test_compose_report_rejects_unknown():
    with pytest.raises(ValueError, match="text_sections"):
        compose_report("a", "b", "everything")


def test_report_groups_match_naive():
    reports = pd.Series(["No acute disease.", "no acute  disease", "Cardiomegaly.", "NO ACUTE DISEASE!", "x"])
    groups, sizes = report_groups(reports)
    norm = [" ".join("".join(c if c.isalnum() else " " for c in r.lower()).split()) for r in reports]
    for a in range(len(reports)):
        assert sizes[a] == sum(norm[a] == n for n in norm)
        for b in range(len(reports)):
            assert (groups[a] == groups[b]) == (norm[a] == norm[b])


def test_patient_splits_leak_free_stratified_seeded():
    rng = np.random.default_rng(0)
    pats = pd.Series([f"p{k}" for k in rng.integers(0, 300, 1000)])
    per_pat = {p: int(rng.random() < 0.35) for p in pats.unique()}
    labels = pats.map(per_pat)
    s = patient_splits(pats, labels, val_frac=0.1, test_frac=0.2, seed=3)
    assert set(s) == {"train", "val", "test"}
    assert (pd.DataFrame({"p": pats, "s": s}).groupby("p")["s"].nunique() == 1).all()
    by_pat = pd.DataFrame({"p": pats, "s": s, "y": labels}).drop_duplicates("p")
    frac = by_pat["s"].value_counts(normalize=True)
    assert abs(frac["test"] - 0.2) < 0.01 and abs(frac["val"] - 0.1) < 0.01
    rate = by_pat.groupby("s")["y"].mean()
    assert rate.max() - rate.min() < 0.03  # stratified by label
    assert s.equals(patient_splits(pats, labels, 0.1, 0.2, seed=3))
    assert not s.equals(patient_splits(pats, labels, 0.1, 0.2, seed=4))


def test_patient_splits_bad_fractions():
    with pytest.raises(ValueError):
        patient_splits(pd.Series(["a", "b"]), pd.Series([0, 1]), 0.5, 0.5)


def _candidates(tmp_path, n=30):
    studies = pd.DataFrame({
        "study_id": [f"S{k}" for k in range(n)], "patient_id": [f"P{k // 2}" for k in range(n)],
        "findings": ["Heart normal." if k % 3 else "" for k in range(n)],
        "impression": ["No acute disease." if k % 2 else f"Finding {k}." for k in range(n)],
        "label_abnormal": pd.array([k % 2 for k in range(n)], dtype="Int64"),
    })
    for name in FINDING_LABELS:
        studies[name] = np.float32(0)
    rows = []
    for k in range(n):
        for v, view in enumerate(("frontal", "lateral")):
            p = write_image(tmp_path / f"img{k}_{v}.png", seed=k)
            rows.append({"study_id": f"S{k}", "image_id": f"I{k}_{v}", "image_path": str(p), "view": view})
    return studies, pd.DataFrame(rows)


def test_assemble_schema_and_counts(tmp_path):
    studies, images = _candidates(tmp_path)
    skips = SkipLog()
    table = assemble(studies, images, skips, source="t", seed=0)
    assert list(table.columns[:len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    assert len(table) == 30 and (table["view"] == "frontal").all()
    assert skips.counts() == {"not_frontal": 30}
    assert table["label_abnormal"].dtype == np.int64 and table["No Finding"].dtype == np.float32
    dup = table[table["report"] == "Heart normal. No acute disease."]
    assert (dup["report_dup_count"] == len(dup)).all() and dup["report_group"].nunique() == 1
    assert table.loc[table["study_id"] == "S0", "text_sections"].item() == "impression"


def test_assemble_bad_inputs_are_counted(tmp_path):
    studies, images = _candidates(tmp_path)
    studies.loc[studies["study_id"] == "S0", ["findings", "impression"]] = ["", None]   # empty sections
    studies.loc[studies["study_id"] == "S1", "label_abnormal"] = pd.NA                  # no label
    images.loc[images["image_id"] == "I2_0", "image_path"] = str(tmp_path / "gone.png")  # missing file
    trunc = tmp_path / "img3_0.png"
    trunc.write_bytes(trunc.read_bytes()[:40])                                           # truncated image
    (tmp_path / "img4_0.png").write_text("not an image")                                 # corrupt image
    images.loc[images["image_id"] == "I5_0", "view"] = "oblique"                        # unknown view
    extra = pd.DataFrame([{"study_id": "S99", "image_id": "I99", "image_path": str(trunc), "view": "frontal"}])
    skips = SkipLog()
    table = assemble(studies, pd.concat([images, extra]), skips, source="t")
    counts = skips.counts()
    assert counts["empty_report"] == 1 and counts["no_label"] == 1
    assert counts["missing_image"] == 1 and counts["unreadable_image"] == 2 and counts["unknown_view"] == 1
    assert counts["image_without_report"] == 1 and counts["no_frontal_image"] == 1
    assert counts["no_readable_image"] == 3
    assert len(table) == 30 - 6
    log = skips.table()
    assert log.loc[log["reason"] == "missing_image", "item"].item() == "I2_0"


def test_assemble_says_why_a_study_has_no_image(tmp_path):
    studies, images = _candidates(tmp_path)
    images.loc[images["image_id"] == "I1_0", "view"] = "oblique"          # S1: lateral + unknown view
    images = images[images["image_id"] != "I2_0"]                         # S2: lateral only
    images.loc[images["study_id"] == "S3", "view"] = "oblique"            # S3: unknown views only
    images = images[images["study_id"] != "S4"]                           # S4: no image listed
    for view, reasons in (("frontal", {"S1": "no_frontal_image", "S2": "no_frontal_image",
                                       "S3": "no_known_view_image", "S4": "no_image"}),
                          (None, {"S3": "no_known_view_image", "S4": "no_image"})):
        skips = SkipLog()
        assemble(studies, images, skips, source="t", view=view, verify_images=False)
        log = skips.table()
        log = log[log["item"].str.startswith("S")].set_index("item")
        assert log["reason"].to_dict() == reasons
        assert "lists no image" in log.loc["S4", "detail"]
        assert "unknown_view" in log.loc["S3", "detail"] and "lists no image" not in log.loc["S3", "detail"]
        if view:
            assert "another view" in log.loc["S2", "detail"] and "unknown" not in log.loc["S2", "detail"]
            assert "unknown view" in log.loc["S1", "detail"]


def test_assemble_duplicate_ids_raise(tmp_path):
    studies, images = _candidates(tmp_path, 4)
    with pytest.raises(ValueError, match="duplicate study ids.*S1"):
        assemble(pd.concat([studies, studies.iloc[[1]]]), images, SkipLog(), source="t")
    with pytest.raises(ValueError, match="duplicate image ids.*I2_0"):
        assemble(studies, pd.concat([images, images.iloc[[4]]]), SkipLog(), source="t")


def test_assemble_max_studies_and_all_views(tmp_path):
    studies, images = _candidates(tmp_path)
    skips = SkipLog()
    t = assemble(studies, images, skips, source="t", view=None, one_image_per_study=False, max_studies=10,
                 verify_images=False)
    assert t["study_id"].nunique() == 10 and len(t) == 20 and set(t["view"]) == {"frontal", "lateral"}
    assert skips.counts() == {"max_studies": 20}
    t2 = assemble(studies, images, SkipLog(), source="t", view=None, max_studies=10, verify_images=False)
    assert len(t2) == 10 and set(t2["study_id"]) == set(t["study_id"])
    assert SkipLog().counts() == {}


def test_validate_table_catches_leaks_and_values(tmp_path):
    studies, images = _candidates(tmp_path, 12)
    table = assemble(studies, images, SkipLog(), source="t", val_frac=0.2, test_frac=0.2)
    validate_table(table)
    leak = table.copy()
    p = leak["patient_id"].iloc[0]
    leak.loc[leak["patient_id"] == p, "split"] = ["train", "test"][: (leak["patient_id"] == p).sum()]
    with pytest.raises(ValueError, match="patient_id in more than one split"):
        validate_table(leak)
    bad = table.copy()
    bad.loc[0, "Edema"] = 0.5
    with pytest.raises(ValueError, match="Edema"):
        validate_table(bad)
    with pytest.raises(ValueError, match="lacks columns"):
        validate_table(table.drop(columns=["report_group"]))


def test_save_load_roundtrip_and_atomic(tmp_path, monkeypatch):
    studies, images = _candidates(tmp_path, 12)
    table = assemble(studies, images, SkipLog(), source="t", val_frac=0.2, test_frac=0.2)
    path = tmp_path / "out" / "t.parquet"
    save_study_table(table, path)
    back = load_study_table(path)
    pd.testing.assert_frame_equal(back, table)
    ids = pd.read_csv(splits_path(path))
    assert splits_path(path).name == "t.splits.csv"
    assert list(ids.columns) == ["study_id", "patient_id", "image_id", "split"] and len(ids) == len(table)

    def boom(self, target, *a, **k):  # a crash half-way through writing
        open(target, "wb").write(b"PAR1 partial")
        raise OSError("disk full")

    new = tmp_path / "out" / "u.parquet"
    monkeypatch.setattr(pd.DataFrame, "to_parquet", boom)
    with pytest.raises(OSError, match="disk full"):
        save_study_table(table, new)
    assert not new.exists() and not splits_path(new).exists()
    assert sorted(p.name for p in new.parent.iterdir()) == ["t.parquet", "t.splits.csv"]
    with pytest.raises(FileNotFoundError, match="01_data_prep"):
        load_study_table(new)


def test_verify_all_threads_match_serial(tmp_path):
    from cxrlib.datasets.table import verify_all
    from cxrlib.images import verify_image

    paths = [write_image(tmp_path / f"{k}.png", seed=k) for k in range(40)]
    paths[3].write_bytes(paths[3].read_bytes()[:30])
    paths[7].write_text("text")
    paths.append(tmp_path / "absent.png")
    threaded = verify_all(paths, n_jobs=4)
    assert threaded == [verify_image(p) for p in paths] == verify_all(paths, n_jobs=1)
    assert [k for k, r in enumerate(threaded) if r] == [3, 7, 40] and threaded[40] == "file not found"
