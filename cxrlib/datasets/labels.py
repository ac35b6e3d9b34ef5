"""Labels of the study table: the 14 CheXpert findings and the rules that derive them.

Open-I studies carry MeSH ``major`` terms (``Cardiomegaly/borderline``,
``Opacity/lung/apex/left``; ``normal`` for normal studies). :data:`MESH_RULES` maps a term's
heading (the part before the first ``/``), optionally only with one of some qualifiers (the parts
after it), onto a CheXpert finding. The mapping follows the CheXpert labeler's mention lists
(Irvin et al., AAAI 2019): e.g. pulmonary congestion and heart failure count as Edema, blunted
costophrenic angles as Pleural Effusion, pleural thickening or scarring as Pleural Other, indwelling
catheters, tubes, stents and implanted devices as Support Devices. Terms with no CheXpert
counterpart (calcified granuloma, degenerative spine, hyperinflation, ...) set no finding.

Open-I conventions used here:

* ``label_abnormal`` = 0 exactly when the major terms are ``normal`` (never combined with another
  term in the release; 35.8% of the 3,851 Kaggle studies), else 1.
* Findings: ``normal`` -> "No Finding" = 1 and the other 13 = 0; an indexed abnormal study ->
  "No Finding" = 0 and each finding 1 if some term maps to it, else 0 (MeSH indexing lists every
  finding of the report, so a missing term is a negative). ``No Indexing`` (92 studies, never
  indexed) has no label: every finding is NaN and the study's normal/abnormal label is a choice
  (:data:`NO_INDEXING_CHOICES`).

MIMIC-CXR studies carry CheXpert labels (1, 0, -1 uncertain, blank unmentioned);
:func:`chexpert_findings` turns them into the table's floats and :func:`abnormal_from_findings`
derives the binary label under a stated rule.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

#: the 14 CheXpert observations, in CheXpert's order (the finding columns of every study table)
FINDING_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)

#: MeSH heading (lower case) -> [(finding, qualifiers that must appear, or None for any)]
MESH_RULES: dict[str, list[tuple[str, frozenset[str] | None]]] = {
    "cardiomegaly": [("Cardiomegaly", None)],
    "cardiac shadow": [("Enlarged Cardiomediastinum", frozenset({"enlarged"}))],
    "mediastinum": [("Enlarged Cardiomediastinum", frozenset({"enlarged", "widened", "prominent"}))],
    "opacity": [("Lung Opacity", None)],
    "airspace disease": [("Lung Opacity", None)],
    "infiltrate": [("Lung Opacity", None)],
    "density": [("Lung Opacity", frozenset({"lung", "retrocardiac"}))],
    "pulmonary fibrosis": [("Lung Opacity", None)],
    "lung diseases, interstitial": [("Lung Opacity", None)],
    "nodule": [("Lung Lesion", None)],
    "mass": [("Lung Lesion", None)],
    "cavitation": [("Lung Lesion", None)],
    "pulmonary edema": [("Edema", None)],
    "pulmonary congestion": [("Edema", None)],
    "heart failure": [("Edema", None)],
    "consolidation": [("Consolidation", None)],
    "pneumonia": [("Pneumonia", None)],
    "pulmonary atelectasis": [("Atelectasis", None)],
    "volume loss": [("Atelectasis", None)],
    "pneumothorax": [("Pneumothorax", None)],
    "hydropneumothorax": [("Pneumothorax", None), ("Pleural Effusion", None)],
    "hemopneumothorax": [("Pneumothorax", None), ("Pleural Effusion", None)],
    "pleural effusion": [("Pleural Effusion", None)],
    "hemothorax": [("Pleural Effusion", None)],
    "costophrenic angle": [("Pleural Effusion", frozenset({"blunted"}))],
    "thickening": [("Pleural Other", frozenset({"pleura"}))],
    "cicatrix": [("Pleural Other", frozenset({"pleura"}))],
    "pleura": [("Pleural Other", None)],
    "fractures, bone": [("Fracture", None)],
    "catheters, indwelling": [("Support Devices", None)],
    "surgical instruments": [("Support Devices", None)],
    "implanted medical device": [("Support Devices", None)],
    "tube, inserted": [("Support Devices", None)],
    "medical device": [("Support Devices", None)],
    "stents": [("Support Devices", None)],
}

NORMAL_TERM = "normal"
NO_INDEXING_TERM = "no indexing"
#: what to do with Open-I studies indexed ``No Indexing``: skip them (default), or call them normal/abnormal
NO_INDEXING_CHOICES = ("skip", "normal", "abnormal")
#: how MIMIC's uncertain (-1) CheXpert labels count: as positive (U-Ones), negative (U-Zeros) or unknown (NaN)
UNCERTAIN_CHOICES = ("positive", "negative", "nan")
#: MIMIC normal/abnormal: normal iff "No Finding" == 1, or iff no other finding is positive
NORMAL_RULES = ("no_finding", "no_positive")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def split_mesh(mesh: str | float | None) -> list[str]:
    """``"A/b;C"`` -> ``["A/b", "C"]`` (stripped, empty parts dropped); NaN/None -> []."""
    if mesh is None or (isinstance(mesh, float) and math.isnan(mesh)):
        return []
    return [t.strip() for t in str(mesh).split(";") if t.strip()]


def mesh_findings(terms: Iterable[str]) -> dict[str, float]:
    """The 14 finding values of a study from its MeSH major terms (see the module docstring)."""
    terms = [_norm(t) for t in terms if t and t.strip()]
    if not terms or any(t == NO_INDEXING_TERM for t in terms):
        return dict.fromkeys(FINDING_LABELS, math.nan)
    if all(t == NORMAL_TERM for t in terms):
        return {name: float(name == "No Finding") for name in FINDING_LABELS}
    out = dict.fromkeys(FINDING_LABELS, 0.0)
    for term in terms:
        head, *quals = [p.strip() for p in term.split("/")]
        for finding, required in MESH_RULES.get(head, []):
            if required is None or required & set(quals):
                out[finding] = 1.0
    return out


def mesh_is_abnormal(terms: Iterable[str], no_indexing: str = "skip") -> int | None:
    """1 if any major term other than ``normal``; 0 if only ``normal``; None = skip (no label).

    ``No Indexing`` studies follow ``no_indexing`` (one of :data:`NO_INDEXING_CHOICES`).
    """
    if no_indexing not in NO_INDEXING_CHOICES:
        raise ValueError(f"no_indexing must be one of {NO_INDEXING_CHOICES}, got {no_indexing!r}")
    terms = [_norm(t) for t in terms if t and t.strip()]
    if not terms:
        return None
    if any(t == NO_INDEXING_TERM for t in terms):
        return {"skip": None, "normal": 0, "abnormal": 1}[no_indexing]
    return int(any(t != NORMAL_TERM for t in terms))


def chexpert_findings(values: Mapping[str, float], uncertain: str = "nan") -> dict[str, float]:
    """CheXpert-style values (1, 0, -1, NaN) -> table floats; -1 follows ``uncertain``.

    Columns missing from ``values`` and blank values are NaN (not mentioned = not derivable).
    """
    if uncertain not in UNCERTAIN_CHOICES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_CHOICES}, got {uncertain!r}")
    u = {"positive": 1.0, "negative": 0.0, "nan": math.nan}[uncertain]
    out = {}
    for name in FINDING_LABELS:
        v = values.get(name, math.nan)
        v = math.nan if v is None else float(v)
        if v == -1.0:
            v = u
        elif not math.isnan(v) and v not in (0.0, 1.0):
            raise ValueError(f"CheXpert value {v!r} for {name!r} is not 1, 0, -1 or blank")
        out[name] = v
    return out


def abnormal_from_findings(findings: Mapping[str, float], rule: str = "no_finding") -> int | None:
    """Binary label from finding values; None when the rule cannot decide (counted as a skip).

    ``no_finding``: normal iff "No Finding" == 1, abnormal iff some other finding == 1, else None.
    ``no_positive``: abnormal iff some finding other than "No Finding" == 1, else normal.
    """
    if rule not in NORMAL_RULES:
        raise ValueError(f"normal rule must be one of {NORMAL_RULES}, got {rule!r}")
    positive = any(findings.get(n) == 1.0 for n in FINDING_LABELS[1:])
    if rule == "no_positive":
        return int(positive)
    if findings.get("No Finding") == 1.0:
        return 0
    return 1 if positive else None
