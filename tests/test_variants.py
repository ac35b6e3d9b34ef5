"""Report variants: every rule on hand-written sentences; equivalent rewrites keep the labels and
laterality the checking labeler reads; each error variant changes labels, laterality, a measurement
or the devices; seeded determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrlib import variants as v

R = v.Report
RNG = np.random.default_rng(0)

REPORTS = [
    R("There is a small left pleural effusion. The heart size is normal. No pneumothorax.",
      "Small left pleural effusion."),
    R("Mild cardiomegaly. Right lower lobe consolidation. No pleural effusion.",
      "Right lower lobe pneumonia with mild cardiomegaly."),
    R("Lungs are clear. No pleural effusion or pneumothorax. Osseous structures are within normal limits.",
      "No acute cardiopulmonary abnormality."),
    R("PA and lateral views. There is a 1.2 cm nodule in the left upper lobe. No PTX.",
      "Left upper lobe nodule; CT recommended."),
    R("An endotracheal tube terminates 4 cm above the carina. Bilateral airspace disease. s/p CABG.",
      "Bilateral airspace disease, likely CHF."),
]


def labels(text: str):
    return v.text_findings(text), v.text_laterality(text)


# ---- the checking labeler on hand-written sentences ---------------------------------------------

def test_labeler_reads_presence_negation_and_sides():
    f = v.text_findings("Small left pleural effusion. No pneumothorax. Heart size is normal.")
    assert f["Pleural Effusion"] == 1.0 and f["Pneumothorax"] == 0.0 and math.isnan(f["Cardiomegaly"])
    assert f["No Finding"] == 0.0
    assert v.text_findings("Pneumothorax is not seen.")["Pneumothorax"] == 0.0
    assert v.text_findings("Without focal consolidation, pneumothorax or large pleural effusion.")[
        "Pleural Effusion"] == 0.0
    assert v.text_findings("Effusion on the left; no pneumothorax.")["Pleural Effusion"] == 1.0
    assert v.text_laterality("Right lower lobe consolidation. Left pleural effusion.") == {
        "Consolidation": frozenset({"right"}), "Pleural Effusion": frozenset({"left"})}
    assert v.text_laterality("RLL consolidation.")["Consolidation"] == {"right"}
    assert v.text_findings("No acute cardiopulmonary abnormality.")["No Finding"] == 1.0


# ---- equivalent rules ----------------------------------------------------------------------------

def test_abbreviation_expansion_and_contraction_hand_worked():
    r = R("PA and lateral views. No PTX. s/p CABG. b/l effusions, CHF.", "")
    assert v.expand_abbreviations(r).findings == ("Posteroanterior and lateral views. No pneumothorax. "
                                                  "Status post CABG. Bilateral effusions, congestive heart failure.")
    c = v.contract_abbreviations(R("Right lower lobe opacity. Status post sternotomy. No pneumothorax.", ""))
    assert c.findings == "RLL opacity. s/p sternotomy. No PTX."
    # capitals only: "pa" inside a word, or "ap" in lower case, are not abbreviations
    assert v.expand_abbreviations(R("Apparent opacity, capacity normal.", "")) is None


def test_abbreviation_table_round_trips():
    for abbr, phrase in v.ABBREVIATIONS.items():
        if abbr in ("w/", "w/o"):
            continue
        expanded = v.expand_abbreviations(R(f"Finding {abbr} here.", "")).findings
        assert expanded == f"Finding {phrase} here.", abbr
        assert v.contract_abbreviations(R(expanded, "")).findings == f"Finding {abbr} here.", abbr


def test_section_rules():
    r = REPORTS[0]
    assert v.impression_only(r) == R("", r.impression)
    assert v.findings_only(r) == R(r.findings, "")
    assert v.impression_only(R("Only findings.", "")) is None


def test_reorder_keeps_the_sentences_and_changes_the_order():
    r = R("A one. B two. C three.", "D four. E five.")
    new = v.reorder_sentences(r, np.random.default_rng(3))
    assert new.text() != r.text()
    assert sorted(v.split_sentences(new.findings)) == sorted(v.split_sentences(r.findings))
    assert sorted(v.split_sentences(new.impression)) == sorted(v.split_sentences(r.impression))
    assert v.split_sentences("1. Left lower lobe opacity. 2. No effusion.") == [
        "1. Left lower lobe opacity.", "2. No effusion."]


def test_negation_paraphrase_both_directions():
    assert v.negation_paraphrase(R("No pleural effusion.", "")).findings == "Pleural effusion is not seen."
    assert v.negation_paraphrase(R("There are no pleural effusions.", "")).findings == "Pleural effusions are not seen."
    assert v.negation_paraphrase(R("Pneumothorax is not seen.", "")).findings == "No pneumothorax."
    assert v.negation_paraphrase(R("Small effusion.", "")) is None


def test_synonyms_either_direction():
    assert v.synonyms(R("Mild cardiomegaly.", "")).findings == "Mild enlarged cardiac silhouette."
    assert v.synonyms(R("Enlarged cardiac silhouette.", "")).findings == "Cardiomegaly."
    assert v.synonyms(R("Bony structures are intact.", "")).findings == "Osseous structures are intact."


@pytest.mark.parametrize("rule", ["expand_abbreviations", "contract_abbreviations", "reorder_sentences",
                                  "negation_paraphrase", "synonyms"])
@pytest.mark.parametrize("report", REPORTS, ids=range(len(REPORTS)))
def test_equivalent_rules_keep_labels_and_laterality(rule, report):
    new = v.EQUIVALENT_RULES[rule](report, np.random.default_rng(1))
    if new is None:
        return
    (f0, l0), (f1, l1) = labels(report.text()), labels(new.text())
    assert v.same_labels(f0, f1), (rule, report.text(), new.text())
    assert l0 == l1, (rule, report.text(), new.text())


@pytest.mark.parametrize("style", sorted(v.STYLES))
def test_styles_keep_labels_on_consistent_reports(style):
    for report in REPORTS:
        var = v.rewrite(report, style, seed=2)
        base = report.impression if style == "impression_only" else report.text()
        assert v.same_labels(v.text_findings(base), v.text_findings(var.text)), (style, var)
        assert var.rules and var.kind == style


def test_rewrite_is_seeded():
    r = R("A one. B two. C three. D four.", "")
    assert v.rewrite(r, "reordered", seed=5) == v.rewrite(r, "reordered", seed=5)
    assert len({v.rewrite(r, "reordered", seed=s).text for s in range(6)}) > 1
    with pytest.raises(ValueError, match="abbreviated"):
        v.rewrite(r, "casual", seed=0)


# ---- error rules ---------------------------------------------------------------------------------

def _what_changed(old: str, new: str) -> set[str]:
    out = set()
    if not v.same_labels(v.text_findings(old), v.text_findings(new)):
        out.add("labels")
    if v.text_laterality(old) != v.text_laterality(new):
        out.add("laterality")
    if v.measurements(old) != v.measurements(new):
        out.add("measurement")
    if v.devices(old) != v.devices(new):
        out.add("devices")
    return out


EXPECTED_CHANGE = {"negation_flip": "labels", "laterality_swap": "laterality", "finding_swap": "labels",
                   "measurement_change": "measurement", "device_added": "devices", "device_removed": "devices",
                   "severity_change": None}


@pytest.mark.parametrize("report", REPORTS, ids=range(len(REPORTS)))
def test_every_error_variant_changes_something_clinical(report):
    for var in v.error_variants(report, seed=3):
        changed = _what_changed(report.text(), var.text)
        want = EXPECTED_CHANGE[var.kind]
        if want is None:  # severity words are not labels: exactly one word differs
            diff = [(a, b) for a, b in zip(report.text().split(), var.text.split()) if a != b]
            assert len(diff) == 1 and diff[0][1].lower().strip(".,;") in v.SEVERITY_SWAPS.values(), var
        else:
            assert want in changed, (var.kind, report.text(), var.text)


def test_error_rules_hand_worked():
    r = R("There is a small left pleural effusion. No pneumothorax.", "")
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    assert v.laterality_swap(r, rng())[0].findings == "There is a small right pleural effusion. No pneumothorax."
    assert v.severity_change(r, rng())[0].findings == "There is a large left pleural effusion. No pneumothorax."
    assert v.finding_swap(r, rng())[0].findings == "There is a small left pneumothorax. No pneumothorax."
    flipped = v.negation_flip(r, rng())[0].findings
    assert flipped in ("There is no small left pleural effusion. No pneumothorax.",
                       "There is a small left pleural effusion. There is pneumothorax.")
    m = v.measurement_change(R("A 1.2 cm nodule.", ""), rng())[0].findings
    assert m in ("A 2.4 cm nodule.", "A 3.6 cm nodule.")
    added = v.device_added(r, rng())[0]
    assert v.devices(added.text()) and not v.devices(r.text())
    removed = v.device_removed(R("Endotracheal tube in place. No effusion.", "Tube in good position."), rng())[0]
    assert removed.text() == "No effusion."
    assert v.device_removed(r, rng()) is None and v.measurement_change(r, rng()) is None


def test_error_variants_one_per_applicable_kind_and_seeded():
    r = REPORTS[3]
    a, b = v.error_variants(r, seed=7), v.error_variants(r, seed=7)
    assert a == b
    kinds = [x.kind for x in a]
    assert len(kinds) == len(set(kinds)) and "measurement_change" in kinds and "device_removed" not in kinds
    assert all(x.text != r.text() for x in a)
    with pytest.raises(ValueError, match="negation_flip"):
        v.error_variants(r, kinds=("typo",))
