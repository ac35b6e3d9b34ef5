"""The study table: one schema for every source, report text, skips, leak-free splits, save/load.

Each source module (:mod:`.openi`, :mod:`.mimic`, :mod:`.synthetic`) produces *candidate* studies
and images; :func:`assemble` turns them into the table of ``docs/CONTRACTS.md``:

``study_id`` str, ``patient_id`` str, ``image_id`` str (unique), ``image_path`` str (absolute),
``view`` (frontal|lateral), ``findings`` str, ``impression`` str, ``report`` str (the text used),
``text_sections`` str (which sections it came from), ``label_abnormal`` int 0/1, the 14
:data:`FINDING_LABELS` columns (float32; NaN = not derivable), ``split`` (train|val|test),
``report_group`` int (same id = identical normalised report), ``report_dup_count`` int, ``source`` str.
Sources may add columns (Open-I adds ``mesh``).

Every row that is dropped is recorded in a :class:`SkipLog` with its id and reason, and the log
becomes the ``skips`` table the notebook shows (nothing is dropped silently).
"""

from __future__ import annotations

import html
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.images import verify_image
from cxrlib.io import atomic_path

BASE_COLUMNS: tuple[str, ...] = ("study_id", "patient_id", "image_id", "image_path", "view", "findings",
                                 "impression", "report", "text_sections", "label_abnormal")
TAIL_COLUMNS: tuple[str, ...] = ("split", "report_group", "report_dup_count", "source")
REQUIRED_COLUMNS: tuple[str, ...] = BASE_COLUMNS + FINDING_LABELS + TAIL_COLUMNS
VIEWS = ("frontal", "lateral")
SPLITS = ("train", "val", "test")
#: report text choices: ``findings+impression`` (joined), ``findings`` or ``impression`` (each falls back to
#: the other section when empty), ``longest`` (the longer of the two by characters, not lexicographic ``max``)
TEXT_SECTIONS = ("findings+impression", "findings", "impression", "longest")
#: the Open-I anonymisation token: ``remove`` it (default), ``keep`` it verbatim, or replace it by a string
ANON_TOKEN = "XXXX"


class SkipLog:
    """Rows dropped while building a table: (item id, reason, detail); ``table()`` lists them all."""

    def __init__(self) -> None:
        self.rows: list[dict[str, str]] = []

    def add(self, item: str, reason: str, detail: str = "") -> None:
        self.rows.append({"item": str(item), "reason": reason, "detail": str(detail)})

    def extend(self, items: Iterable[str], reason: str, detail: str = "") -> None:
        for item in items:
            self.add(item, reason, detail)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["item", "reason", "detail"])

    def counts(self) -> dict[str, int]:
        return self.table()["reason"].value_counts().to_dict() if self.rows else {}


def skip_counts(skips: pd.DataFrame) -> pd.DataFrame:
    """``skips`` grouped by reason: reason, count, an example item and detail."""
    if skips.empty:
        return pd.DataFrame(columns=["reason", "count", "example", "detail"])
    g = skips.groupby("reason", sort=False)
    return (pd.DataFrame({"count": g.size(), "example": g["item"].first(), "detail": g["detail"].first()})
            .reset_index().sort_values("count", ascending=False, ignore_index=True))


# ---- report text ---------------------------------------------------------------------------------

#: the token with any letters or digits glued to it (``4XXXX``, ``XXXXPM``, ``comparisXXXX``): the glued
#: characters are part of the masked item (a date, a time, a cut word) and go with it
_ANON_WORD = r"[A-Za-z0-9]*X{4,}[A-Za-z0-9]*"


def clean_text(text: object, anon: str = "remove") -> str:
    """Unescape HTML entities, handle the ``XXXX`` token (``anon``), collapse whitespace; NaN -> "".

    A text with no letter or digit left (``XXXX XXXX.`` once the token is removed) is "" (an empty section).
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    text = html.unescape(str(text))
    if anon == "remove":
        text = re.sub(r"(?<=\w)-X{4}\b", "", text)          # "x-XXXX" (x-ray) -> "x"
        text = re.sub(_ANON_WORD, " ", text)
        text = re.sub(r"\s+([.,;:])", r"\1", text)
        text = re.sub(r"([.,;:])(?:\s*[.,;:])+", r"\1", text)  # "at XXXX. XXXX: none" -> "at. none"
        text = re.sub(r"^[\s.,;:]+", "", text)
    elif anon != "keep":
        text = re.sub(_ANON_WORD, lambda _: anon, text)  # the replacement verbatim (no backslash escapes)
    text = re.sub(r"\s+", " ", text).strip()
    return text if re.search(r"[^\W_]", text) else ""


def compose_report(findings: str, impression: str, sections: str = "findings+impression") -> tuple[str, str]:
    """The report text and the sections it came from; ``("", "")`` when both sections are empty.

    ``findings+impression`` joins the two (either alone when the other is empty); ``findings`` /
    ``impression`` take that section and fall back to the other; ``longest`` takes the longer one.
    """
    if sections not in TEXT_SECTIONS:
        raise ValueError(f"text_sections must be one of {TEXT_SECTIONS}, got {sections!r}")
    f, i = findings.strip(), impression.strip()
    have = {"findings": f, "impression": i}
    if sections == "findings+impression":
        used = [k for k in ("findings", "impression") if have[k]]
    elif sections == "longest":
        used = [max(("findings", "impression"), key=lambda k: (len(have[k]), k == "findings"))] if f or i else []
    else:
        other = "impression" if sections == "findings" else "findings"
        used = [sections] if have[sections] else ([other] if have[other] else [])
    return " ".join(have[k] for k in used), "+".join(used)


def normalise_report(text: str) -> str:
    """Comparison key for duplicate reports: lower case, alphanumerics only, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


def report_groups(reports: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """``(group id, group size)`` per row; rows with the same normalised text share a group."""
    keys = reports.map(normalise_report)
    codes, _ = pd.factorize(keys)
    sizes = np.bincount(codes)[codes]
    return codes.astype(np.int64), sizes.astype(np.int64)


# ---- splits --------------------------------------------------------------------------------------

def patient_splits(patient_ids: pd.Series, labels: pd.Series, val_frac: float = 0.1, test_frac: float = 0.2,
                   seed: int = 0) -> pd.Series:
    """Assign train/val/test per patient (all of a patient's rows together), stratified by label.

    A patient's stratum is 1 if any of its rows is abnormal. Stratification needs at least two
    patients per class in each cut; otherwise the split is random and a warning says so.
    """
    from sklearn.model_selection import train_test_split

    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be >= 0 with a sum < 1")
    per_patient = pd.DataFrame({"p": patient_ids.astype(str).values, "y": labels.astype(int).values})
    per_patient = per_patient.groupby("p", sort=True)["y"].max()
    pats, y = per_patient.index.to_numpy(), per_patient.to_numpy()
    rng = np.random.RandomState(seed)

    def cut(ids, strata, frac):
        if frac == 0 or len(ids) == 0:
            return ids, ids[:0]
        n_out = int(round(frac * len(ids)))
        if n_out == 0 or n_out == len(ids):
            raise ValueError(f"cannot cut a {frac:.0%} split from {len(ids)} patients; use more studies")
        counts = np.bincount(strata, minlength=2)
        stratify = strata if counts.min() >= 2 and min(n_out, len(ids) - n_out) >= 2 else None
        if stratify is None and counts.min() > 0:
            warnings.warn(f"too few patients per label to stratify a {frac:.0%} split of {len(ids)}; split at random",
                          stacklevel=3)
        keep, out = train_test_split(np.arange(len(ids)), test_size=n_out, stratify=stratify, random_state=rng)
        return ids[np.sort(keep)], ids[np.sort(out)]

    rest, test = cut(pats, y, test_frac)
    strata_rest = per_patient.loc[rest].to_numpy()
    train, val = cut(rest, strata_rest, val_frac / (1 - test_frac) if test_frac < 1 else 0)
    assignment = {**dict.fromkeys(train, "train"), **dict.fromkeys(val, "val"), **dict.fromkeys(test, "test")}
    return patient_ids.astype(str).map(assignment)


# ---- assembly ------------------------------------------------------------------------------------

def verify_all(image_paths: Iterable[str], n_jobs: int | None = None) -> list[str | None]:
    """:func:`cxrlib.images.verify_image` over many files in threads (decoders release the GIL), in order."""
    from concurrent.futures import ThreadPoolExecutor

    image_paths = list(image_paths)
    n_jobs = n_jobs or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        return list(tqdm(pool.map(verify_image, image_paths, chunksize=16) if n_jobs > 1 else
                         map(verify_image, image_paths), total=len(image_paths), desc="checking images", leave=False))


def assemble(studies: pd.DataFrame, images: pd.DataFrame, skips: SkipLog, *, source: str,
             view: str | None = "frontal", one_image_per_study: bool = True, verify_images: bool = True,
             text_sections: str = "findings+impression", anon: str = "remove",
             max_studies: int | None = None, seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2,
             splits: pd.Series | None = None) -> pd.DataFrame:
    """Join candidate studies and images into a validated study table; every drop goes to ``skips``.

    ``studies``: study_id, patient_id, findings, impression, label_abnormal (0/1, or None = skip), the
    finding columns, optional extras. ``images``: study_id, image_id, image_path, view (frontal, lateral
    or None = unknown). ``splits`` (study_id -> train/val/test) replaces the seeded split (MIMIC's
    official one). ``max_studies`` keeps a seeded random subset of the usable studies.
    """
    studies = studies.copy()
    images = images.copy()
    if studies["study_id"].duplicated().any():
        dup = studies.loc[studies["study_id"].duplicated(), "study_id"].tolist()
        raise ValueError(f"duplicate study ids in {source}: {dup[:5]}")
    if images["image_id"].duplicated().any():
        dup = images.loc[images["image_id"].duplicated(), "image_id"].tolist()
        raise ValueError(f"duplicate image ids in {source}: {dup[:5]}")
    if view not in (None, *VIEWS):
        raise ValueError(f"view must be one of {VIEWS} or None (all), got {view!r}")

    # text
    studies["findings"] = [clean_text(t, anon) for t in studies["findings"]]
    studies["impression"] = [clean_text(t, anon) for t in studies["impression"]]
    composed = [compose_report(f, i, text_sections) for f, i in zip(studies["findings"], studies["impression"])]
    studies["report"] = [c[0] for c in composed]
    studies["text_sections"] = [c[1] for c in composed]
    empty = studies["report"] == ""
    skips.extend(studies.loc[empty, "study_id"], "empty_report", "findings and impression both empty")
    studies = studies[~empty]
    nolabel = studies["label_abnormal"].isna()
    skips.extend(studies.loc[nolabel, "study_id"], "no_label",
                 "no normal/abnormal label (MeSH 'No Indexing', no CheXpert row, or only uncertain findings)")
    studies = studies[~nolabel]

    # images
    all_images = set(images["study_id"])
    orphan = ~images["study_id"].isin(studies["study_id"]) & ~images["study_id"].isin(skips.table()["item"])
    skips.extend(images.loc[orphan, "image_id"], "image_without_report")
    images = images[images["study_id"].isin(studies["study_id"])]
    unknown = images["view"].isna() | ~images["view"].isin(VIEWS)
    skips.extend(images.loc[unknown, "image_id"], "unknown_view",
                 "view not frontal/lateral: " + ", ".join(map(str, images.loc[unknown, "view"].unique()[:5])))
    had_unknown = set(images.loc[unknown, "study_id"])
    images = images[~unknown]
    known_view = set(images["study_id"])
    if view is not None:
        other = images["view"] != view
        skips.extend(images.loc[other, "image_id"], f"not_{view}")
        images = images[~other]
    # a study left without an image says which of the steps above took its images
    sid = studies["study_id"]
    no_img = ~sid.isin(images["study_id"])
    listed = sid.isin(all_images)
    skips.extend(sid[no_img & ~listed], "no_image", f"the {source} source lists no image for this study")
    only_unknown = no_img & listed & ~sid.isin(known_view)
    skips.extend(sid[only_unknown], "no_known_view_image",
                 "every image listed for it has a view other than frontal/lateral (each skipped as unknown_view)")
    if view is not None:
        wrong_view = no_img & listed & ~only_unknown
        also_unknown = sid.isin(had_unknown)
        skips.extend(sid[wrong_view & ~also_unknown], f"no_{view}_image",
                     f"no {view} image: every image listed for it is of another view (each skipped as not_{view})")
        skips.extend(sid[wrong_view & also_unknown], f"no_{view}_image",
                     f"no {view} image: the images listed for it are of another view (not_{view}) or of an "
                     f"unknown view (unknown_view)")
    studies = studies[~no_img]

    if max_studies is not None and len(studies) > max_studies:
        keep = studies.sample(n=max_studies, random_state=seed)["study_id"]
        drop = studies.loc[~studies["study_id"].isin(keep), "study_id"]
        skips.extend(drop, "max_studies", f"subset of {max_studies} studies (seed {seed})")
        studies = studies[studies["study_id"].isin(keep)]
        images = images[images["study_id"].isin(keep)]

    images = images.sort_values(["study_id", "image_id"], kind="stable")
    if verify_images:
        bad = {iid: reason for iid, reason in zip(images["image_id"], verify_all(images["image_path"]))
               if reason is not None}
        for iid, reason in bad.items():
            skips.add(iid, "missing_image" if reason == "file not found" else "unreadable_image", reason)
        images = images[~images["image_id"].isin(bad)]
        lost = ~studies["study_id"].isin(images["study_id"])
        skips.extend(studies.loc[lost, "study_id"], "no_readable_image")
        studies = studies[~lost]
    if one_image_per_study:
        extra = images["study_id"].duplicated(keep="first")
        skips.extend(images.loc[extra, "image_id"], "extra_image_of_study", "one image per study (first by image id)")
        images = images[~extra]

    table = images[["study_id", "image_id", "image_path", "view"]].merge(studies, on="study_id", how="inner",
                                                                         validate="many_to_one")
    if table.empty:
        raise ValueError(f"no usable studies in {source}; skipped: {skips.counts()}")
    table["image_path"] = [os.path.abspath(p) for p in table["image_path"]]
    table["label_abnormal"] = table["label_abnormal"].astype(np.int64)
    for name in FINDING_LABELS:
        table[name] = table[name].astype(np.float32) if name in table else np.float32(np.nan)
    table["report_group"], table["report_dup_count"] = report_groups(table["report"])
    table["source"] = source
    if splits is not None:
        table["split"] = table["study_id"].map(splits)
        nosplit = table["split"].isna()
        skips.extend(table.loc[nosplit, "image_id"], "no_split", "study missing from the split file")
        table = table[~nosplit]
    else:
        table["split"] = patient_splits(table["patient_id"], table["label_abnormal"], val_frac, test_frac, seed)
    extras = [c for c in table.columns if c not in REQUIRED_COLUMNS]
    table = table[list(REQUIRED_COLUMNS) + extras].sort_values(["study_id", "image_id"], ignore_index=True)
    validate_table(table)
    return table


# ---- validation, save, load ----------------------------------------------------------------------

def validate_table(table: pd.DataFrame) -> None:
    """Raise ValueError naming every way ``table`` breaks the schema (columns, ids, values, leaks)."""
    problems = []
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"study table lacks columns {missing}")
    if table["image_id"].duplicated().any():
        problems.append(f"duplicate image_id {table.loc[table['image_id'].duplicated(), 'image_id'].tolist()[:5]}")
    for col in ("study_id", "patient_id", "image_id", "image_path", "report"):
        bad = table[col].isna() | (table[col].astype(str).str.strip() == "")
        if bad.any():
            problems.append(f"empty {col} in rows {table.index[bad].tolist()[:5]}")
    if not table["view"].isin(VIEWS).all():
        problems.append(f"views outside {VIEWS}: {sorted(set(table['view']) - set(VIEWS))[:5]}")
    if not table["label_abnormal"].isin([0, 1]).all():
        problems.append("label_abnormal not 0/1")
    if not table["split"].isin(SPLITS).all():
        problems.append(f"splits outside {SPLITS}: {sorted(map(str, set(table['split']) - set(SPLITS)))[:5]}")
    for name in FINDING_LABELS:
        vals = table[name].to_numpy(np.float64)
        if not np.all(np.isnan(vals) | (vals == 0) | (vals == 1)):
            problems.append(f"finding {name!r} has values other than 0, 1, NaN")
    rel = [p for p in table["image_path"].astype(str) if not os.path.isabs(p)]
    if rel:
        problems.append(f"relative image paths, e.g. {rel[:2]}")
    for key in ("patient_id", "study_id"):
        n_splits = table.groupby(key)["split"].nunique()
        if (n_splits > 1).any():
            problems.append(f"{key} in more than one split: {n_splits[n_splits > 1].index.tolist()[:5]}")
    if problems:
        raise ValueError("invalid study table: " + "; ".join(problems))


def splits_path(table_path: str | os.PathLike) -> Path:
    """``<stem>.splits.csv`` beside the parquet."""
    p = Path(table_path)
    return p.with_name(p.name.removesuffix(".parquet") + ".splits.csv")


def save_study_table(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Validate, then write the parquet and ``<stem>.splits.csv`` (study, patient, image id, split), atomically."""
    validate_table(table)
    path = Path(path)
    with atomic_path(splits_path(path), suffix=".csv") as tmp_ids, atomic_path(path, suffix=".parquet") as tmp:
        table.to_parquet(tmp, index=False)  # both files appear, or neither
        table[["study_id", "patient_id", "image_id", "split"]].to_csv(tmp_ids, index=False)
    return path


def load_study_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a study table and check its schema; a missing file names the step that writes it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study table at {path}; run notebook 01_data_prep (make paper) first")
    table = pd.read_parquet(path)
    validate_table(table)
    return table
