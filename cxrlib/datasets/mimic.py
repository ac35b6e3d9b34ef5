"""MIMIC-CXR-JPG 2.x: images, CheXpert labels, official split, and reports with section extraction.

Size: 377,110 images of 227,827 studies from 65,379 patients. Labels: CheXpert labeler outputs
(1 positive, 0 negative, -1 uncertain, blank not mentioned) per study. Access: credentialed
(PhysioNet, data use agreement): this package never downloads it; users give the folder
(``MIMIC_ROOT``). Cite: Johnson et al., MIMIC-CXR-JPG (PhysioNet 2019) and Sci Data 6:317 (2019).

Layout read as published::

    <root>/files/pXX/p<subject>/s<study>/<dicom_id>.jpg
    <root>/mimic-cxr-2.0.0-metadata.csv.gz   (dicom_id, subject_id, study_id, ViewPosition, ...)
    <root>/mimic-cxr-2.0.0-split.csv.gz      (dicom_id, study_id, subject_id, split: train/validate/test)
    <root>/mimic-cxr-2.0.0-chexpert.csv.gz   (subject_id, study_id, 14 observations; or -negbio.csv.gz)
    reports: <root>/mimic-cxr-reports.zip (files/pXX/p<subject>/s<study>.txt) or those .txt files under
             <root>/files/ (or a ``reports`` folder/zip given explicitly)

Ids: ``study_id`` = ``s<study>``, ``patient_id`` = ``p<subject>``, ``image_id`` = the DICOM id.
Views: PA/AP -> frontal, LATERAL/LL -> lateral, anything else (AP AXIAL, LAO, blank, ...) is an
unknown view (a counted skip). Split: the official one by default (validate -> val; it is
patient-level), or a seeded stratified patient split. Normal/abnormal and the role of uncertain
labels are parameters (:mod:`cxrlib.datasets.labels`).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pandas as pd

from cxrlib import paths
from cxrlib.datasets.labels import FINDING_LABELS, abnormal_from_findings, chexpert_findings
from cxrlib.datasets.table import SkipLog, assemble

PREFIX = "mimic-cxr-2.0.0"
VIEW_MAP = {"PA": "frontal", "AP": "frontal", "LATERAL": "lateral", "LL": "lateral"}
#: which label table to read: the CheXpert labeler's or NegBio's (same columns and values)
LABELERS = ("chexpert", "negbio")
SPLIT_MAP = {"train": "train", "validate": "val", "val": "val", "test": "test"}
#: a ``Name:`` at the start of a line, in any case (``FINDINGS:``, ``Findings:``, ``findings:``)
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&(),-]{1,40}):", re.MULTILINE)
FINDINGS_HEADERS = {"FINDINGS", "FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "FINDING"}
IMPRESSION_HEADERS = {"IMPRESSION", "CONCLUSION", "IMPRESSIONS", "CONCLUSIONS"}
#: the section names of MIMIC-CXR reports (the frequent ones of the MIT-LCP ``section_parser``); only these
#: start a section: any other ``Name:`` (organ sub-headers such as ``LUNGS:`` or ``HEART:`` inside
#: FINDINGS, ``Dr. ___:``) is text of the section it stands in
SECTION_HEADERS = FINDINGS_HEADERS | IMPRESSION_HEADERS | {
    "FINAL REPORT", "EXAMINATION", "EXAM", "TYPE OF EXAMINATION", "INDICATION", "INDICATIONS",
    "CLINICAL INDICATION", "HISTORY", "CLINICAL HISTORY", "PATIENT HISTORY", "CLINICAL INFORMATION",
    "REASON FOR EXAMINATION", "REASON FOR EXAM", "TECHNIQUE", "PROCEDURE", "COMPARISON", "COMPARISONS",
    "COMPARISON EXAM", "COMPARISON FILM", "REFERENCE EXAM", "RECOMMENDATION", "RECOMMENDATIONS",
    "RECOMMENDATION(S)", "NOTIFICATION", "ADDENDUM", "WET READ", "COMMENT", "COMMENTS", "DATE",
}


def report_sections(text: str) -> dict[str, str]:
    """Split a MIMIC report into its sections -> {"FINDINGS": ..., "IMPRESSION": ..., ...} (names upper case).

    A section starts at a known name (:data:`SECTION_HEADERS`) followed by ``:`` at the start of a line,
    in any case; other ``Name:`` lines (``LUNGS: Clear.``) stay in the text of their section.
    """
    marks = [m for m in _HEADER.finditer(text) if " ".join(m.group(1).split()).upper() in SECTION_HEADERS]
    out: dict[str, str] = {}
    for m, nxt in zip(marks, [*marks[1:], None]):
        body = text[m.end(): nxt.start() if nxt else len(text)]
        name = " ".join(m.group(1).split()).upper()
        out[name] = (out.get(name, "") + " " + " ".join(body.split())).strip()
    return out


def findings_impression(text: str) -> tuple[str, str]:
    """(findings, impression) of a MIMIC report; "" for a section that is absent."""
    sec = report_sections(text)
    f = " ".join(v for k, v in sec.items() if k in FINDINGS_HEADERS)
    i = " ".join(v for k, v in sec.items() if k in IMPRESSION_HEADERS)
    return f.strip(), i.strip()


def _read_csv(root: Path, name: str, need: set[str]) -> pd.DataFrame:
    path = root / f"{PREFIX}-{name}.csv.gz"
    if not path.is_file():
        alt = path.with_suffix("")  # an uncompressed copy
        if not alt.is_file():
            raise FileNotFoundError(f"{path} is missing: MIMIC_ROOT ({root}) should be a MIMIC-CXR-JPG 2.x folder "
                                    f"with files/ and the {PREFIX}-*.csv.gz tables")
        path = alt
    df = pd.read_csv(path)
    if need - set(df.columns):
        raise ValueError(f"{path} lacks columns {sorted(need - set(df.columns))}")
    return df


class ReportSource:
    """Report text by study from ``mimic-cxr-reports.zip`` or a folder of ``s<study>.txt`` files."""

    def __init__(self, source: Path):
        self.source = source
        if source.is_file() and zipfile.is_zipfile(source):
            self.zip = zipfile.ZipFile(source)
            self.index = {Path(n).name: n for n in self.zip.namelist() if n.endswith(".txt")}
        elif source.is_dir():
            self.zip = None
            self.index = {p.name: str(p) for p in source.rglob("s*.txt")}
        else:
            raise FileNotFoundError(f"no MIMIC reports at {source} (expected mimic-cxr-reports.zip or a folder of "
                                    f"files/pXX/p<subject>/s<study>.txt)")

    def get(self, study_id: str) -> str | None:
        name = self.index.get(f"{study_id}.txt")
        if name is None:
            return None
        data = self.zip.read(name) if self.zip else Path(name).read_bytes()
        return data.decode("utf-8", errors="replace")


def find_reports(root: Path) -> Path:
    for cand in (root / "mimic-cxr-reports.zip", root / "reports", root / "files"):
        if cand.exists() and (cand.is_file() or any(cand.rglob("s*.txt"))):
            return cand
    raise FileNotFoundError(f"no MIMIC reports under {root}: add mimic-cxr-reports.zip (from MIMIC-CXR) or pass "
                            f"reports=<zip or folder>")


def mimic_candidates(root: Path, reports: str | Path | None = None, uncertain: str = "nan",
                     normal_rule: str = "no_finding", skips: SkipLog | None = None, labeler: str = "chexpert"
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """Labelled candidate studies, images and the official split (study_id -> split) of a MIMIC folder."""
    skips = skips if skips is not None else SkipLog()
    meta = _read_csv(root, "metadata", {"dicom_id", "subject_id", "study_id", "ViewPosition"})
    split = _read_csv(root, "split", {"dicom_id", "study_id", "subject_id", "split"})
    if labeler not in LABELERS:
        raise ValueError(f"labeler must be one of {LABELERS}, got {labeler!r}")
    chex = _read_csv(root, labeler, {"subject_id", "study_id", *FINDING_LABELS})  # a renamed column is an error
    src = ReportSource(Path(reports) if reports else find_reports(root))

    meta = meta.assign(study_id="s" + meta["study_id"].astype(str), patient_id="p" + meta["subject_id"].astype(str))
    images = pd.DataFrame({
        "study_id": meta["study_id"], "image_id": meta["dicom_id"].astype(str),
        "image_path": [str(root / "files" / f"p{str(s)[:2]}" / f"p{s}" / st / f"{d}.jpg")
                       for s, st, d in zip(meta["subject_id"], meta["study_id"], meta["dicom_id"])],
        "view": meta["ViewPosition"].astype(str).str.strip().str.upper().map(VIEW_MAP),
    })
    owners = meta[["study_id", "patient_id"]].drop_duplicates()
    if owners["study_id"].duplicated().any():
        sid = owners.loc[owners["study_id"].duplicated(), "study_id"].iloc[0]
        raise ValueError(f"{PREFIX}-metadata.csv.gz puts study {sid} under several subjects "
                         f"{sorted(owners.loc[owners['study_id'] == sid, 'patient_id'])}")
    studies = owners.reset_index(drop=True)

    chex = chex.assign(study_id="s" + chex["study_id"].astype(str))
    label_cols = ["study_id", *FINDING_LABELS]
    conflict = chex.drop_duplicates(label_cols)["study_id"]  # repeated identical rows are one row
    if conflict.duplicated().any():
        sid = conflict[conflict.duplicated()].iloc[0]
        raise ValueError(f"{PREFIX}-{labeler}.csv.gz has rows with different labels for study {sid} "
                         f"({int(conflict.duplicated().sum())} such studies): which one holds is unknown")
    chex = chex.drop_duplicates("study_id").set_index("study_id")
    texts, labels, finds, present = [], [], [], []
    for sid in studies["study_id"]:
        text = src.get(sid)
        present.append(text is not None)
        if text is None:
            skips.add(sid, "no_report_file")
        texts.append(findings_impression(text) if text else ("", ""))
        if sid in chex.index:
            f = chexpert_findings(chex.loc[sid].to_dict(), uncertain)
            labels.append(abnormal_from_findings(f, normal_rule))
        else:
            f = dict.fromkeys(FINDING_LABELS, float("nan"))
            labels.append(None)
        finds.append(f)
    studies["findings"] = [t[0] for t in texts]
    studies["impression"] = [t[1] for t in texts]
    studies["label_abnormal"] = pd.array(labels, dtype="Int64")
    fdf = pd.DataFrame(finds)
    for name in FINDING_LABELS:
        studies[name] = fdf[name].astype("float32").values
    studies = studies[present].reset_index(drop=True)

    split = split.assign(study_id="s" + split["study_id"].astype(str))
    per_study = split.groupby("study_id")["split"].agg(lambda s: set(s))
    mixed = per_study[per_study.map(len) > 1]
    if len(mixed):
        raise ValueError(f"{PREFIX}-split.csv.gz puts images of one study in several splits: {mixed.index[:5].tolist()}")
    official = per_study.map(lambda s: next(iter(s))).map(lambda v: SPLIT_MAP.get(str(v).strip().lower()))
    if official.isna().any():
        raise ValueError(f"unknown split names in {PREFIX}-split.csv.gz: {sorted(set(split['split']) - set(SPLIT_MAP))}")
    return studies, images, official


def build_mimic(root: str | Path | None = None, reports: str | Path | None = None, uncertain: str = "nan",
                normal_rule: str = "no_finding", split: str = "official", labeler: str = "chexpert", **assemble_kw
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Study table of a local MIMIC-CXR-JPG folder (``root`` or ``MIMIC_ROOT``)."""
    root = Path(root) if root else paths.mimic_root()
    if root is None:
        raise FileNotFoundError("MIMIC-CXR-JPG is credentialed data: set MIMIC_ROOT (or root=) to your local copy")
    if not root.is_dir():
        raise FileNotFoundError(f"MIMIC root {root} does not exist")
    if split not in ("official", "random"):
        raise ValueError(f"split must be 'official' or 'random', got {split!r}")
    skips = SkipLog()
    studies, images, official = mimic_candidates(root, reports, uncertain, normal_rule, skips, labeler)
    table = assemble(studies, images, skips, source="mimic",
                     splits=official if split == "official" else None, **assemble_kw)
    return table, skips.table()
