"""Open-I readers: NLM and Kaggle layouts on fake trees, bad input, and the real tables in ../shared."""

import warnings
from pathlib import Path

import pandas as pd
import pytest

from cxrlib.datasets import build_study_table, skip_counts
from cxrlib.datasets.fixtures import fake_openi_studies, make_fake_openi_kaggle, make_fake_openi_nlm
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.openi import (
    detect_layout,
    infer_nlm_views,
    kaggle_candidates,
    kaggle_image_id,
    nlm_candidates,
    openi_candidates,
    parse_report_xml,
    projection_views,
    read_nlm_reports,
    torchxrayvision_data,
)
from cxrlib.datasets.table import SkipLog

COMPARE = ["study_id", "patient_id", "image_id", "view", "report", "text_sections", "label_abnormal",
           *FINDING_LABELS, "split", "report_group", "report_dup_count"]


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("openi")
    return {"nlm": make_fake_openi_nlm(base / "nlm"), "kaggle": make_fake_openi_kaggle(base / "kaggle"),
            "tgz": make_fake_openi_nlm(base / "tgz", archive=True)}


def test_layouts_detected(trees):
    assert detect_layout(trees["nlm"]) == "nlm" and detect_layout(trees["tgz"]) == "nlm"
    assert detect_layout(trees["kaggle"]) == "kaggle"


def test_both_layouts_give_the_same_table(trees):
    tables = {k: build_study_table("openi", root=v, seed=1)[0] for k, v in trees.items()}
    for other in ("kaggle", "tgz"):
        pd.testing.assert_frame_equal(tables["nlm"][COMPARE], tables[other][COMPARE])
    t = tables["kaggle"]
    assert len(t) == 24 and (t["view"] == "frontal").all() and t["image_id"].str.endswith("-1001").all()
    assert t["image_path"].map(lambda p: Path(p).is_file()).all()
    assert (t.loc[t["study_id"] == "CXR1", "label_abnormal"] == 0).all()
    row = t[t["study_id"] == "CXR2"].iloc[0]
    assert row["label_abnormal"] == 1 and row["Cardiomegaly"] == 1 and row["Pleural Effusion"] == 1
    assert row["No Finding"] == 0 and row["mesh"] == "Cardiomegaly/mild;Pleural Effusion/right/small"
    row3 = t[t["study_id"] == "CXR3"].iloc[0]  # empty findings -> impression only, XXXX removed
    assert row3["report"] == "Normal chest x." and row3["text_sections"] == "impression"


def test_text_and_view_parameters(trees):
    t, skips = build_study_table("openi", root=trees["kaggle"], text_sections="impression", anon="keep",
                                 view="lateral")
    assert (t["view"] == "lateral").all() and t.loc[t["study_id"] == "CXR3", "report"].item() == "Normal chest x-XXXX."
    assert skip_counts(skips).set_index("reason")["count"].to_dict() == {"not_lateral": 24}
    t, _ = build_study_table("openi", root=trees["kaggle"], view=None, one_image_per_study=False)
    assert len(t) == 48


def test_wrong_root_and_wrong_layout(tmp_path, trees):
    with pytest.raises(FileNotFoundError, match="OPENI_ROOT.*make demo"):
        build_study_table("openi", root=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="Kaggle layout"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(ValueError, match="kaggle layout, not nlm"):
        build_study_table("openi", root=trees["kaggle"], layout="nlm")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "indiana_reports.csv").write_text("uid,MeSH,findings,impression\n")
    with pytest.raises(FileNotFoundError, match="indiana_projections.csv is missing"):
        build_study_table("openi", root=tmp_path / "half")
    with pytest.raises(ValueError, match="layout must be"):
        build_study_table("openi", root=trees["kaggle"], layout="zip")


def test_openi_root_from_environment(trees, workdir, monkeypatch):
    monkeypatch.setenv("OPENI_ROOT", str(trees["kaggle"]))
    t, _ = build_study_table("openi")
    assert len(t) == 24 and t["source"].eq("openi-kaggle").all()


def test_nlm_bad_input(tmp_path):
    specs = fake_openi_studies(16)
    specs[5]["images"] = [(specs[5]["images"][0][0], "Oblique"), specs[5]["images"][1]]  # unknown view
    specs[6]["findings"] = specs[6]["impression"] = ""                                  # empty sections
    specs[7]["mesh"] = ["No Indexing"]                                                  # no label
    root = make_fake_openi_nlm(tmp_path / "nlm", studies=specs)
    (root / "ecgen-radiology" / "3.xml").write_text("<eCitation><uId id='CXR3'>")        # malformed XML
    (root / "ecgen-radiology" / "4.xml").write_text("<eCitation><MeSH/></eCitation>")    # no uId
    (root / "NLMCXR_png" / "CXR9_IM-1009-1001.png").unlink()                             # missing image
    p = root / "NLMCXR_png" / "CXR10_IM-1010-1001.png"
    p.write_bytes(p.read_bytes()[:50])                                                   # truncated image
    table, skips = build_study_table("openi", root=root)
    counts = skip_counts(skips).set_index("reason")["count"].to_dict()
    assert counts["malformed_xml"] == 2 and counts["unknown_view"] == 1 and counts["no_frontal_image"] == 1
    assert counts["empty_report"] == 1 and counts["no_label"] == 1
    assert counts["missing_image"] == 1 and counts["unreadable_image"] == 1 and counts["no_readable_image"] == 2
    assert len(table) == 16 - 7 and not {"CXR3", "CXR4", "CXR6", "CXR7", "CXR8", "CXR9", "CXR10"} & set(table["study_id"])
    assert set(skips.loc[skips["reason"] == "malformed_xml", "item"]) == {"3.xml", "4.xml"}
    assert "malformed XML" in skips.loc[skips["item"] == "3.xml", "detail"].item()


def test_parse_report_xml_errors():
    with pytest.raises(ValueError, match="x.xml: malformed XML"):
        parse_report_xml(b"<a>", "x.xml")
    with pytest.raises(ValueError, match="y.xml: no <uId"):
        parse_report_xml(b"<eCitation/>", "y.xml")


def test_views_inferred_without_projections(tmp_path):
    root = make_fake_openi_nlm(tmp_path / "nlm", n_studies=8, projections=False)
    with pytest.warns(UserWarning, match="views inferred"):
        studies, images = openi_candidates(root)
    assert images.set_index("image_id")["view"].to_dict() == {
        i: ("frontal" if i.endswith("-1001") else "lateral") for i in images["image_id"]}


def test_kaggle_names():
    assert kaggle_image_id("10_IM-0002-1001.dcm.png") == "CXR10_IM-0002-1001"
    assert kaggle_image_id("1_IM-0001-4001.dcm.png") == "CXR1_1_IM-0001-4001"


# ---- the real Open-I tables (../shared/data/openi, no images) and the NLM reports of torchxrayvision ----

@pytest.fixture(scope="module")
def real(openi_shared):
    ks, ki = kaggle_candidates(openi_shared)
    skips = SkipLog()
    reports = read_nlm_reports(torchxrayvision_data("NLMCXR_reports.tgz"), skips)
    return ks, ki, reports, skips


def test_real_counts(real):
    ks, ki, reports, skips = real
    assert len(ks) == 3851 and ks["study_id"].is_unique
    assert len(ki) == 7466 and ki["image_id"].is_unique
    assert len(reports) == 3955 and skips.counts() == {}
    normal = (ks["mesh"] == "normal").mean()
    assert 0.34 < normal < 0.37


def test_real_layouts_agree(real, openi_shared):
    from cxrlib.datasets.openi import _label_studies

    ks, ki, reports, _ = real
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ks, _ = openi_candidates(openi_shared)
    ns, ni = nlm_candidates(reports, Path("/nowhere"), pd.Series(dtype=object))
    ns = _label_studies(ns, "skip")
    j = ks.merge(ns, on="study_id", suffixes=("_k", "_n"))
    assert len(j) == 3851
    assert (j["label_abnormal_k"] == j["label_abnormal_n"]).all()
    for name in FINDING_LABELS:
        a, b = j[f"{name}_k"], j[f"{name}_n"]
        assert ((a == b) | (a.isna() & b.isna())).all(), name
    assert set(ki["image_id"]) <= set(ni["image_id"])  # Kaggle images map onto the Open-I names


def test_real_view_inference_accuracy(real, openi_shared):
    _, ki, reports, _ = real
    truth = projection_views(openi_shared / "indiana_projections.csv")
    pred = infer_nlm_views([i for ids in reports["image_ids"] for i in ids])
    both = truth.index.intersection(pred.index)
    assert len(both) == 7466
    assert (pred[both] == truth[both]).mean() > 0.93
    assert (truth[both][pred[both] == "frontal"] == "frontal").mean() > 0.93


def test_real_kaggle_table_is_leak_free(openi_shared, tmp_path):
    import shutil

    for f in ("indiana_reports.csv", "indiana_projections.csv"):
        shutil.copy(openi_shared / f, tmp_path / f)
    table, skips = build_study_table("openi", root=tmp_path, verify_images=False, seed=0)
    counts = skip_counts(skips).set_index("reason")["count"].to_dict()
    assert counts["no_label"] == 92 and counts["no_frontal_image"] > 100
    assert len(table) + sum(counts[r] for r in ("no_label", "empty_report", "no_frontal_image")) == 3851
    assert table.groupby("patient_id")["split"].nunique().max() == 1
    frac = table["split"].value_counts(normalize=True)
    assert abs(frac["test"] - 0.2) < 0.01
    assert table.groupby("split")["label_abnormal"].mean().agg(lambda s: s.max() - s.min()) < 0.02
    imp, _ = build_study_table("openi", root=tmp_path, verify_images=False, text_sections="impression")
    assert imp["report_dup_count"].max() > 200  # "No acute cardiopulmonary abnormality." repeats


def test_duplicate_ids_in_a_layout_raise(tmp_path):
    root = make_fake_openi_kaggle(tmp_path / "k", n_studies=6)
    rep = pd.read_csv(root / "indiana_reports.csv")
    pd.concat([rep, rep.iloc[[2]]]).to_csv(root / "indiana_reports.csv", index=False)
    with pytest.raises(ValueError, match="duplicate study ids.*CXR3"):
        build_study_table("openi", root=root)
    nlm = make_fake_openi_nlm(tmp_path / "n", n_studies=4)
    (nlm / "ecgen-radiology" / "99.xml").write_text((nlm / "ecgen-radiology" / "2.xml").read_text())
    with pytest.raises(ValueError, match="duplicate study ids.*CXR2"):
        build_study_table("openi", root=nlm)


# ---- defects of an independent review: the anonymisation token, shared images, bad projection tables ----

def test_anonymisation_token_glued_to_other_characters_is_removed():
    from cxrlib.datasets.table import clean_text

    assert clean_text("Seen on 4XXXX at XXXXPM. ComparisXXXX: none.") == "Seen on at. none."
    assert clean_text("a, XXXX, b.") == "a, b." and clean_text("XXXX: stable.") == "stable."
    assert "XXXX" not in clean_text("broken 3rd-5XXXX XXXX XXXX. RADXXXX XXXXth")
    assert clean_text("Normal chest x-XXXX.") == "Normal chest x."  # the x-ray stem is kept
    assert clean_text("Seen on 4XXXX.", "[redacted]") == "Seen on [redacted]."
    assert clean_text("Seen on 4XXXX.", "keep") == "Seen on 4XXXX."


def test_real_reports_keep_no_token(openi_shared):
    from cxrlib.datasets.table import clean_text

    rep = pd.read_csv(openi_shared / "indiana_reports.csv")
    texts = pd.concat([rep[c] for c in ("findings", "impression", "indication", "comparison")]).dropna()
    glued = texts[texts.str.contains(r"[A-Za-z0-9]XXXX|XXXX[A-Za-z0-9]")]
    assert len(glued) >= 10  # the real tables do glue the token to other characters (4XXXX, XXXXPM, ...)
    assert not any("XXXX" in clean_text(t) for t in texts)


def test_report_of_only_tokens_is_an_empty_report(tmp_path):
    from cxrlib.datasets.table import clean_text

    assert clean_text("XXXX XXXX.") == "" and clean_text(" . , ") == ""
    specs = fake_openi_studies(8)
    specs[3]["findings"], specs[3]["impression"] = "XXXX XXXX.", "XXXX."
    root = make_fake_openi_kaggle(tmp_path / "k", studies=specs)
    t, skips = build_study_table("openi", root=root)
    assert "CXR4" not in set(t["study_id"]) and not (t["report"].str.strip(" .") == "").any()
    assert skips.loc[skips["item"] == "CXR4", "reason"].tolist() == ["empty_report"]


def _share_image(root: Path, specs: list[dict], owner: int, other: int) -> str:
    """Make report ``other`` also list the frontal image of report ``owner``; returns that image id."""
    from cxrlib.datasets.fixtures import report_xml

    s = specs[other - 1]
    shared = f"CXR{specs[owner - 1]['images'][0][0]}"
    ids = [f"CXR{stem}" for stem, _ in s["images"]] + [shared]
    (root / "ecgen-radiology" / f"{other}.xml").write_text(report_xml(other, s["mesh"], s["findings"],
                                                                      s["impression"], ids))
    return shared


@pytest.mark.parametrize("projections", [True, False], ids=["views_csv", "inferred_views"])
def test_image_listed_by_two_reports_is_a_counted_skip(tmp_path, projections):
    specs = fake_openi_studies(10)
    root = make_fake_openi_nlm(tmp_path / "n", studies=specs, projections=projections)
    shared = _share_image(root, specs, owner=2, other=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, skips = build_study_table("openi", root=root)
    row = skips[skips["item"] == shared]
    assert row["reason"].tolist() == ["image_in_several_reports"]
    assert "CXR2" in row["detail"].item() and "CXR5" in row["detail"].item()
    assert shared not in set(t["image_id"])
    assert "CXR5" in set(t["study_id"])  # report 5 keeps its own frontal image


def test_duplicate_projection_row_is_an_error_naming_the_image(openi_shared, tmp_path):
    proj = pd.read_csv(openi_shared / "indiana_projections.csv")
    name = proj["filename"].iloc[10]
    pd.concat([proj, proj.iloc[[10]]]).to_csv(tmp_path / "indiana_projections.csv", index=False)
    (tmp_path / "indiana_reports.csv").write_bytes((openi_shared / "indiana_reports.csv").read_bytes())
    with pytest.raises(ValueError, match=rf"image '{name}' is listed in rows \[12, {len(proj) + 2}\]"):
        build_study_table("openi", root=tmp_path, verify_images=False)
    with pytest.raises(ValueError, match=rf"image '{name}'"):
        projection_views(tmp_path / "indiana_projections.csv")
    # the same image under two reports (two uids) is the same error, in the NLM views_csv path too
    other = proj.iloc[[10]].assign(uid=proj["uid"].iloc[10] + 1)
    pd.concat([proj, other]).to_csv(tmp_path / "two_reports.csv", index=False)
    root = make_fake_openi_nlm(tmp_path / "n", n_studies=4)
    with pytest.raises(ValueError, match=rf"two_reports.csv: image '{name}'"):
        openi_candidates(root, views_csv=tmp_path / "two_reports.csv")


@pytest.mark.parametrize("column", ["filename", "uid", "projection"])
def test_projections_without_a_column_name_it(openi_shared, tmp_path, column):
    proj = pd.read_csv(openi_shared / "indiana_projections.csv").drop(columns=[column])
    proj.to_csv(tmp_path / "indiana_projections.csv", index=False)
    (tmp_path / "indiana_reports.csv").write_bytes((openi_shared / "indiana_reports.csv").read_bytes())
    with pytest.raises(ValueError, match=rf"indiana_projections.csv: .*lacks column\(s\) \['{column}'\]"):
        build_study_table("openi", root=tmp_path, verify_images=False)


def test_projection_row_without_filename_or_uid_is_an_error(openi_shared, tmp_path):
    proj = pd.read_csv(openi_shared / "indiana_projections.csv")
    proj.loc[5, "filename"] = None
    proj.loc[9, "uid"] = None
    proj.to_csv(tmp_path / "indiana_projections.csv", index=False)
    with pytest.raises(ValueError, match=r"rows \[7, 11\] have no uid or filename"):
        projection_views(tmp_path / "indiana_projections.csv")


def test_anonymisation_replacement_is_taken_verbatim():
    from cxrlib.datasets.table import clean_text

    assert clean_text("seen on 4XXXX.", r"\1[id]") == r"seen on \1[id]."


def test_report_left_without_image_by_sharing_is_not_called_imageless(tmp_path):
    reports = pd.DataFrame({"study_id": ["CXR1", "CXR2", "CXR3"], "findings": "", "impression": "",
                            "image_ids": [["CXR1_a", "CXR1_b"], ["CXR1_a"], []]})
    skips = SkipLog()
    studies, images = nlm_candidates(reports, tmp_path, pd.Series(dtype=object), skips)
    log = skips.table().set_index("item")
    assert log.loc["CXR1_a", "reason"] == "image_in_several_reports"
    assert log.loc["CXR2", "reason"] == "only_shared_images" and "another report" in log.loc["CXR2", "detail"]
    assert list(studies["study_id"]) == ["CXR1", "CXR3"] and list(images["image_id"]) == ["CXR1_b"]

    specs = fake_openi_studies(10)
    root = make_fake_openi_nlm(tmp_path / "n", studies=specs)
    from cxrlib.datasets.fixtures import report_xml

    s = specs[4]  # report 5 lists only report 2's frontal image
    (root / "ecgen-radiology" / "5.xml").write_text(report_xml(5, s["mesh"], s["findings"], s["impression"],
                                                               [f"CXR{specs[1]['images'][0][0]}"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t, skips = build_study_table("openi", root=root)
    assert skips.loc[skips["item"] == "CXR5", "reason"].tolist() == ["only_shared_images"]
    assert "CXR5" not in set(t["study_id"]) and "no_image" not in set(skips["reason"])
