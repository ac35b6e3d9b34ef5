"""MIMIC-CXR-JPG reader on fake trees with the real file formats."""

import gzip
import math

import pandas as pd
import pytest

from cxrlib.datasets import build_study_table, skip_counts
from cxrlib.datasets.fixtures import MIMIC_REPORT, make_fake_mimic
from cxrlib.datasets.mimic import findings_impression, report_sections


@pytest.fixture(scope="module")
def mimic_zip(tmp_path_factory):
    return make_fake_mimic(tmp_path_factory.mktemp("mimic") / "mimic-cxr-jpg")


def test_report_sections():
    text = MIMIC_REPORT.format(findings="Lungs clear.\n Heart normal.", impression="No acute process.")
    sec = report_sections(text)
    assert sec["FINDINGS"] == "Lungs clear. Heart normal." and sec["IMPRESSION"] == "No acute process."
    assert sec["INDICATION"] == "___ year old woman with cough."
    assert findings_impression(text) == ("Lungs clear. Heart normal.", "No acute process.")
    assert findings_impression(" FINAL REPORT\n IMPRESSION: Effusion.\n") == ("", "Effusion.")
    assert findings_impression("no headers at all") == ("", "")


def test_official_split_and_labels(mimic_zip):
    table, skips = build_study_table("mimic", root=mimic_zip)
    assert (table["view"] == "frontal").all() and table["image_id"].str.endswith("-pa").all()
    assert table["study_id"].str.match(r"^s\d+$").all() and table["patient_id"].str.match(r"^p\d+$").all()
    split = pd.read_csv(mimic_zip / "mimic-cxr-2.0.0-split.csv.gz").drop_duplicates("study_id")
    official = dict(zip("s" + split["study_id"].astype(str), split["split"].replace({"validate": "val"})))
    assert (table["split"] == table["study_id"].map(official)).all()
    # case 3 (only an uncertain finding) has no label under the defaults
    counts = skip_counts(skips).set_index("reason")["count"].to_dict()
    assert counts == {"no_label": 6, "not_frontal": 18}
    row = table[table["report"].str.startswith("Moderate cardiomegaly")].iloc[0]
    assert row["label_abnormal"] == 1 and row["Cardiomegaly"] == 1 and math.isnan(row["Edema"])
    assert row["report"] == "Moderate cardiomegaly. Possible mild edema. Cardiomegaly."
    normal = table[table["No Finding"] == 1]
    assert len(normal) == 6 and (normal["label_abnormal"] == 0).all()


def test_uncertain_and_normal_rule(mimic_zip):
    t, skips = build_study_table("mimic", root=mimic_zip, uncertain="positive")
    assert len(t) == 24 and t.loc[t["report"].str.contains("Possible pneumonia"), "label_abnormal"].eq(1).all()
    t, _ = build_study_table("mimic", root=mimic_zip, normal_rule="no_positive")
    assert t.loc[t["report"].str.contains("Possible pneumonia"), "label_abnormal"].eq(0).all()
    t, _ = build_study_table("mimic", root=mimic_zip, uncertain="negative")
    assert t.loc[t["report"].str.startswith("Moderate"), "Edema"].eq(0).all()
    t, _ = build_study_table("mimic", root=mimic_zip, uncertain="negative", labeler="negbio")
    assert t.loc[t["report"].str.startswith("Moderate"), "Edema"].eq(1).all()
    with pytest.raises(ValueError, match="labeler"):
        build_study_table("mimic", root=mimic_zip, labeler="manual")


def test_random_split_is_patient_level(mimic_zip):
    t, _ = build_study_table("mimic", root=mimic_zip, split="random", uncertain="positive", seed=2,
                             val_frac=0.2, test_frac=0.2)
    assert t.groupby("patient_id")["split"].nunique().max() == 1 and set(t["split"]) == {"train", "val", "test"}


def test_txt_reports_and_bad_input(tmp_path):
    root = make_fake_mimic(tmp_path / "m", n_patients=6, reports="txt")
    (root / "files" / "p10" / "p10000000" / "s50000000.txt").unlink()                     # no report
    (root / "files" / "p10" / "p10000037" / "s50001000.txt").write_text(" FINAL REPORT\n")  # no sections
    jpg = next((root / "files" / "p10" / "p10000074" / "s50002001").glob("*-pa.jpg"))
    jpg.write_bytes(jpg.read_bytes()[:100])                                                 # truncated
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    meta.loc[meta["dicom_id"].str.endswith("-pa") & (meta["study_id"] == 50003000), "ViewPosition"] = "AP AXIAL"
    with gzip.open(root / "mimic-cxr-2.0.0-metadata.csv.gz", "wt") as fh:
        meta.to_csv(fh, index=False)
    t, skips = build_study_table("mimic", root=root, uncertain="positive")
    counts = skip_counts(skips).set_index("reason")["count"].to_dict()
    assert counts["no_report_file"] == 1 and counts["empty_report"] == 1
    assert counts["unreadable_image"] == 1 and counts["unknown_view"] == 1
    assert len(t) == 12 - 4


def test_wrong_root(tmp_path, workdir):
    with pytest.raises(FileNotFoundError, match="MIMIC_ROOT"):
        build_study_table("mimic")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_study_table("mimic", root=tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="metadata.csv.gz is missing"):
        build_study_table("mimic", root=tmp_path / "empty")


def test_section_headers_in_any_case():
    """Lower- and title-case headers are sections (they were not: the study was dropped as empty_report)."""
    text = " FINAL REPORT\n indication: Cough.\n findings: Lungs clear.\n Impression: No acute process.\n"
    assert findings_impression(text) == ("Lungs clear.", "No acute process.")
    assert report_sections(text)["INDICATION"] == "Cough."


def test_organ_sub_headers_stay_in_findings():
    """``LUNGS:`` / ``HEART:`` inside FINDINGS are text of FINDINGS, not sections that swallow it."""
    text = MIMIC_REPORT.format(findings="LUNGS: Clear.\n HEART: Normal size.\n BONES: Intact.",
                               impression="No acute process.")
    assert findings_impression(text) == ("LUNGS: Clear. HEART: Normal size. BONES: Intact.", "No acute process.")
    assert set(report_sections(text)) == {"EXAMINATION", "INDICATION", "COMPARISON", "FINDINGS", "IMPRESSION"}


def test_lower_case_report_is_kept_in_the_table(tmp_path):
    root = make_fake_mimic(tmp_path / "m", n_patients=6, reports="txt")
    path = root / "files" / "p10" / "p10000000" / "s50000000.txt"
    path.write_text(" findings: Heart size normal.\n impression: No acute process.\n")
    t, skips = build_study_table("mimic", root=root, uncertain="positive")
    assert "s50000000" in set(t["study_id"]) and "s50000000" not in set(skips["item"])
    assert t.loc[t["study_id"] == "s50000000", "report"].item() == "Heart size normal. No acute process."


@pytest.mark.parametrize("change", ["drop", "rename"])
def test_missing_chexpert_column_is_an_error_naming_it(tmp_path, change):
    root = make_fake_mimic(tmp_path / "m", n_patients=4, reports="txt")
    path = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    chex = pd.read_csv(path)
    chex = chex.drop(columns=["Edema"]) if change == "drop" else chex.rename(columns={"Edema": "edema"})
    with gzip.open(path, "wt") as fh:
        chex.to_csv(fh, index=False)
    with pytest.raises(ValueError, match=r"chexpert.csv.gz lacks columns \['Edema'\]"):
        build_study_table("mimic", root=root)


def test_conflicting_chexpert_rows_for_one_study_are_an_error(tmp_path):
    root = make_fake_mimic(tmp_path / "m", n_patients=4, reports="txt")
    path = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    chex = pd.read_csv(path)
    same = pd.concat([chex, chex.iloc[[0]]])  # an identical repeated row is harmless
    with gzip.open(path, "wt") as fh:
        same.to_csv(fh, index=False)
    build_study_table("mimic", root=root, uncertain="positive")
    other = chex.iloc[[0]].assign(Edema=1.0 if chex["Edema"].iloc[0] != 1.0 else 0.0)
    with gzip.open(path, "wt") as fh:
        pd.concat([chex, other]).to_csv(fh, index=False)
    with pytest.raises(ValueError, match=rf"different labels for study s{chex['study_id'].iloc[0]}"):
        build_study_table("mimic", root=root)


def test_study_under_two_subjects_is_an_error(tmp_path):
    root = make_fake_mimic(tmp_path / "m", n_patients=4, reports="txt")
    path = root / "mimic-cxr-2.0.0-metadata.csv.gz"
    meta = pd.read_csv(path)
    meta.loc[1, "study_id"] = meta.loc[meta["subject_id"] != meta["subject_id"].iloc[1], "study_id"].iloc[0]
    with gzip.open(path, "wt") as fh:
        meta.to_csv(fh, index=False)
    with pytest.raises(ValueError, match=r"puts study s\d+ under several subjects"):
        build_study_table("mimic", root=root)
