"""MIMIC-5x200 as BenchX defines it: 1,000 MIMIC-CXR images, 200 for each of five one-hot CheXpert classes.

BenchX (Zhou et al., NeurIPS 2024 Datasets & Benchmarks, arXiv 2410.21969; ``yangzhou12/BenchX``)
publishes the image ids of its retrieval set in ``datasets/MIMIC_5x200/mimic_5x200_ids.csv``
(columns ``Path, dicom_id, subject_id, study_id, Report``; the path and report columns are
placeholders: MIMIC is credentialed, so no text is published). Its retrieval metric is label-match
Precision@K with the five classes Atelectasis, Cardiomegaly, Consolidation, Edema and Pleural
Effusion (protocol ``label_match_class``; chance 20%).

This module builds that set from the user's own MIMIC-CXR-JPG copy (``MIMIC_ROOT``):

* the id list is downloaded at run time from BenchX's repository at a pinned commit
  (:data:`ID_LIST_URL`) into ``raw_dir()/benchx/`` (cached); its SHA-256 is written beside it on the
  first download and checked on every later read, and the list's structure is validated. Offline, the
  error names the file to place by hand;
* labels come from the user's CheXpert table (``mimic-cxr-2.0.0-chexpert.csv.gz``): the class of an
  image is the one of the five that is positive (1); an image with none or several positive is a
  counted skip (``not_one_hot``);
* report text comes from the user's reports; nothing of MIMIC is stored in this package;
* listed ids that the copy lacks (no metadata row, no image file) are counted and reported, and the
  build is refused below :data:`MIN_COVERAGE` of the list.

Every row of the table is an evaluation row (``split = "test"``), with the class in ``onehot_label``.
The 5x200 images are not guaranteed to lie in MIMIC's official test split: :func:`build_mimic_5x200`
reports how many lie in each official split, so a model trained on those images is not evaluated on them
unknowingly.

CheXpert-5x200 is *not* offered: GLoRIA never released its reports, and BenchX and PRIOR pair
CheXpert images with MIMIC reports, so no public image-report CheXpert-5x200 exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cxrlib import paths
from cxrlib.datasets.table import SkipLog, assemble

#: BenchX commit whose id list is used (the file is fixed at a commit)
BENCHX_COMMIT = "1c27ee43b4094eb3a062f16337cfb4b7a55c4e14"
ID_LIST_NAME = "mimic_5x200_ids.csv"
ID_LIST_URL = (f"https://raw.githubusercontent.com/yangzhou12/BenchX/{BENCHX_COMMIT}/datasets/MIMIC_5x200/"
               f"{ID_LIST_NAME}")
ID_COLUMNS = ("dicom_id", "subject_id", "study_id")
#: the five one-hot classes of 5x200 (CheXpert competition tasks)
CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
#: the fewest listed ids (fraction) the user's copy must hold for the set to be built
MIN_COVERAGE = 0.95
#: environment variable naming an id list placed by hand (overrides the cache)
ENV_VAR = "MIMIC_5X200_IDS"


class IdListUnavailable(FileNotFoundError):
    """The BenchX id list is neither cached nor downloadable; the message names the file to place."""


def id_list_path() -> Path:
    """Where the id list is read from: ``$MIMIC_5X200_IDS`` or ``raw_dir()/benchx/mimic_5x200_ids.csv``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else paths.raw_dir() / "benchx" / ID_LIST_NAME


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def fetch_id_list(dest: str | os.PathLike | None = None, url: str = ID_LIST_URL) -> Path:
    """The id list on disk: the cached copy (checked against its recorded SHA-256) or a fresh download.

    A cached file whose SHA-256 differs from the one recorded at its download is an error (it changed);
    no network is a :class:`IdListUnavailable` naming the URL and the path to place the file at.
    """
    from cxrlib.datasets.download import DownloadError, fetch, sha256_file

    dest = Path(dest) if dest else id_list_path()
    record = _checksum_path(dest)
    if dest.is_file():
        if record.is_file() and record.read_text().split()[0] != sha256_file(dest):
            raise ValueError(f"{dest} changed since it was downloaded (SHA-256 differs from {record}); delete both "
                             f"files to download the list again")
        return dest
    try:
        fetch(url, dest)
    except DownloadError as exc:
        raise IdListUnavailable(
            f"the MIMIC-5x200 id list is not cached and cannot be downloaded ({exc}). Place BenchX's "
            f"datasets/MIMIC_5x200/{ID_LIST_NAME} (commit {BENCHX_COMMIT[:10]}, {url}) at {dest}, or point "
            f"{ENV_VAR} at a copy") from exc
    record.write_text(f"{sha256_file(dest)}  {dest.name}\n")
    return dest


def read_id_list(path: str | os.PathLike) -> pd.DataFrame:
    """``dicom_id``, ``subject_id``, ``study_id`` (as MIMIC's integers, as strings) of the list; any other
    column (BenchX's placeholder ``Path`` and ``Report``) is dropped, so no text is ever kept."""
    path = Path(path)
    df = pd.read_csv(path, dtype=str)
    missing = [c for c in ID_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a MIMIC-5x200 id list: it lacks columns {missing} "
                         f"(expected {list(ID_COLUMNS)})")
    ids = df[list(ID_COLUMNS)].apply(lambda s: s.astype(str).str.strip())
    empty = (ids == "") | ids.isna()
    if empty.any().any():
        raise ValueError(f"{path}: empty ids in rows {ids.index[empty.any(axis=1)].tolist()[:5]}")
    dup = ids["dicom_id"].duplicated()
    if dup.any():
        raise ValueError(f"{path}: duplicate dicom_id {ids.loc[dup, 'dicom_id'].tolist()[:5]}")
    if ids.empty:
        raise ValueError(f"{path} lists no images")
    return ids.reset_index(drop=True)


def one_hot_class(row: dict) -> str | None:
    """The one class of :data:`CLASSES` that is positive (1) in a CheXpert row, or None (none or several)."""
    pos = [c for c in CLASSES if row.get(c) == 1]
    return pos[0] if len(pos) == 1 else None


def build_mimic_5x200(root: str | Path | None = None, id_list: str | Path | None = None, reports=None,
                      min_coverage: float = MIN_COVERAGE, uncertain: str = "nan", normal_rule: str = "no_finding",
                      labeler: str = "chexpert", text_sections: str = "findings+impression", anon: str = "remove",
                      verify_images: bool = True, **_ignored) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, skips)`` of MIMIC-5x200 from a local MIMIC-CXR-JPG copy (see the module docstring).

    ``id_list``: a local id list (default: :func:`fetch_id_list`). ``skips`` holds every listed id left
    out with its reason (``absent_from_copy``, ``not_one_hot``, and the table builder's reasons); the
    build fails when fewer than ``min_coverage`` of the listed ids are in the copy. ``table.attrs`` holds
    the counts (``listed``, ``found``, ``coverage``, ``official_split``). The set is fixed, so the
    table builder's ``view``, ``one_image_per_study``, ``max_studies`` and split fractions do not apply
    (accepted and ignored).
    """
    from cxrlib.datasets import mimic

    root = Path(root) if root else paths.mimic_root()
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(f"MIMIC-5x200 is built from a local MIMIC-CXR-JPG copy: set MIMIC_ROOT (got {root})")
    ids = read_id_list(id_list if id_list else fetch_id_list())
    skips = SkipLog()
    studies, images, official = mimic.mimic_candidates(root, reports, uncertain, normal_rule, SkipLog(), labeler)

    listed = set(ids["dicom_id"])
    in_copy = images[images["image_id"].isin(listed)]
    present = in_copy[[Path(p).is_file() for p in in_copy["image_path"]]]
    absent = sorted(listed - set(present["image_id"]))
    for dicom in absent:
        skips.add(dicom, "absent_from_copy", "listed by BenchX, no metadata row or image file in MIMIC_ROOT")
    coverage = len(present) / len(listed)
    if coverage < min_coverage:
        raise ValueError(f"MIMIC-5x200: {len(absent)} of {len(listed)} listed images are absent from {root} "
                         f"(coverage {coverage:.1%} < the {min_coverage:.0%} required), e.g. {absent[:3]}; "
                         f"check MIMIC_ROOT or lower min_coverage knowingly")

    chex = mimic._read_csv(root, labeler, {"subject_id", "study_id", *CLASSES})
    chex = chex.assign(study_id="s" + chex["study_id"].astype(str)).drop_duplicates("study_id").set_index("study_id")
    classes = {sid: (one_hot_class(chex.loc[sid].to_dict()) if sid in chex.index else None)
               for sid in present["study_id"].unique()}
    not_one_hot = present[present["study_id"].map(classes).isna()]
    skips.extend(not_one_hot["image_id"], "not_one_hot",
                 f"the user's CheXpert row has not exactly one positive of {', '.join(CLASSES)}")
    keep = present[~present["image_id"].isin(not_one_hot["image_id"])]

    sel = studies[studies["study_id"].isin(keep["study_id"])].copy()
    sel["onehot_label"] = sel["study_id"].map(classes)
    split = pd.Series("test", index=sel["study_id"].unique())
    table = assemble(sel, keep, skips, source="mimic_5x200", view=None, one_image_per_study=True,
                     verify_images=verify_images, text_sections=text_sections, anon=anon, splits=split)
    table.attrs.update(listed=len(listed), found=len(present), coverage=coverage,
                       official_split=official.reindex(table["study_id"]).value_counts().to_dict())
    return table, skips.table()
