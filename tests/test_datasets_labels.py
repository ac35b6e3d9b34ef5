"""MeSH and CheXpert -> table labels, against hand-worked cases."""

import math

import pytest

from cxrlib.datasets.labels import (
    FINDING_LABELS,
    abnormal_from_findings,
    chexpert_findings,
    mesh_findings,
    mesh_is_abnormal,
    split_mesh,
)


def test_finding_labels_are_chexpert_order():
    assert FINDING_LABELS[0] == "No Finding" and FINDING_LABELS[-1] == "Support Devices"
    assert len(FINDING_LABELS) == 14 and len(set(FINDING_LABELS)) == 14
    assert FINDING_LABELS.index("Lung Opacity") == 3 and FINDING_LABELS.index("Pleural Effusion") == 10


def test_split_mesh():
    assert split_mesh("Cardiomegaly/borderline;Pulmonary Artery/enlarged") == ["Cardiomegaly/borderline",
                                                                               "Pulmonary Artery/enlarged"]
    assert split_mesh("Technical Quality of Image Unsatisfactory ;Lung") == [
        "Technical Quality of Image Unsatisfactory", "Lung"]
    assert split_mesh(float("nan")) == [] and split_mesh(None) == [] and split_mesh(" ; ") == []


def test_normal_study():
    f = mesh_findings(["normal"])
    assert f["No Finding"] == 1.0 and sum(f.values()) == 1.0
    assert mesh_is_abnormal(["normal"]) == 0


def test_abnormal_study_mapping_with_qualifiers():
    terms = ["Cardiomegaly/mild", "Costophrenic Angle/right/blunted", "Thickening/pleura/apex",
             "Density/lung/base/left", "Catheters, Indwelling", "Calcified Granuloma/lung", "Hydropneumothorax/left"]
    f = mesh_findings(terms)
    expect = {"Cardiomegaly", "Pleural Effusion", "Pleural Other", "Lung Opacity", "Support Devices", "Pneumothorax"}
    assert {k for k, v in f.items() if v == 1.0} == expect
    assert f["No Finding"] == 0.0 and f["Fracture"] == 0.0
    assert mesh_is_abnormal(terms) == 1


def test_qualifier_required():
    # costophrenic angle without "blunted", thickening not of the pleura: no finding
    f = mesh_findings(["Costophrenic Angle/right/obscured", "Thickening/bronchovascular"])
    assert all(v == 0.0 for v in f.values())
    assert mesh_is_abnormal(["Costophrenic Angle/right/obscured"]) == 1


def test_case_and_space_insensitive():
    assert mesh_findings(["pleural   EFFUSION/right"])["Pleural Effusion"] == 1.0


def test_no_indexing_choices():
    f = mesh_findings(["No Indexing"])
    assert all(math.isnan(v) for v in f.values())
    assert mesh_is_abnormal(["No Indexing"]) is None
    assert mesh_is_abnormal(["No Indexing"], "normal") == 0
    assert mesh_is_abnormal(["No Indexing"], "abnormal") == 1
    assert mesh_is_abnormal([]) is None
    with pytest.raises(ValueError, match="no_indexing"):
        mesh_is_abnormal(["normal"], "maybe")


def test_chexpert_uncertain_policies():
    vals = {"No Finding": float("nan"), "Edema": -1.0, "Cardiomegaly": 1.0, "Pneumonia": 0.0}
    pos, neg, nan = (chexpert_findings(vals, u) for u in ("positive", "negative", "nan"))
    assert pos["Edema"] == 1.0 and neg["Edema"] == 0.0 and math.isnan(nan["Edema"])
    assert pos["Cardiomegaly"] == 1.0 and pos["Pneumonia"] == 0.0 and math.isnan(pos["Fracture"])
    with pytest.raises(ValueError, match="Edema"):
        chexpert_findings({"Edema": 2.0})


def test_abnormal_rules():
    nf = {**dict.fromkeys(FINDING_LABELS, float("nan")), "No Finding": 1.0}
    assert abnormal_from_findings(nf) == 0 and abnormal_from_findings(nf, "no_positive") == 0
    sick = {**nf, "No Finding": float("nan"), "Edema": 1.0}
    assert abnormal_from_findings(sick) == 1 and abnormal_from_findings(sick, "no_positive") == 1
    silent = dict.fromkeys(FINDING_LABELS, float("nan"))  # nothing positive, no "No Finding"
    assert abnormal_from_findings(silent) is None and abnormal_from_findings(silent, "no_positive") == 0
    with pytest.raises(ValueError):
        abnormal_from_findings(nf, "whatever")
