"""Open-I (Indiana University chest X-ray collection, NLM): reports, MeSH labels, images, views.

Size: 3,955 reports (NLM release; 3,851 of them with images) and 7,470 images (the Kaggle copy
lists 7,466). Labels: MeSH major terms (``normal`` for 35.8% of studies). Access: public,
CC BY-NC-ND 4.0. Cite: Demner-Fushman et al., JAMIA 2016;23(2):304-310.

Two layouts are read as published (``detect_layout`` tells them apart):

* ``nlm``: ``NLMCXR_png/CXR<n>_<...>.png`` (or the PNGs directly in the root) and
  ``ecgen-radiology/<n>.xml`` (or the ``NLMCXR_reports.tgz`` archive itself, read without unpacking).
* ``kaggle``: ``images/images_normalized/<n>_<...>.dcm.png`` with ``indiana_reports.csv`` and
  ``indiana_projections.csv``.

Both give the same ids: study ``CXR<n>``, image the Open-I name of the report XML (``CXR<n>_IM-....``). Open-I
publishes no patient identifier beyond the report (each report has its own DICOM Patient ID), so
``patient_id`` = ``study_id``.

Views: the NLM release does not state them. An ``indiana_projections.csv`` in the root (or given as
``views_csv``) is used when present. Otherwise :func:`infer_nlm_views` guesses them from
``nlmcxr_dicom_metadata.csv.gz`` (shipped with torchxrayvision) and the image names: images whose
DICOM View Position is LL/RL/LATERAL are lateral; of the other images of a study, the AP one, else
the one with the lowest name suffix (``-1001`` before ``-2001``) is frontal and the rest lateral.
Measured against the Kaggle projections: 93.7% of 7,466 images right, 93.9% of the predicted
frontals are frontal (the DICOM tag alone is worse: 1,368 of the 3,590 images it calls PA are
lateral). With real NLM images, provide the projections CSV; the ``openi_synth`` dataset does not
care (its images are rendered in the view the table states).
"""

from __future__ import annotations

import io
import re
import tarfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from cxrlib import paths
from cxrlib.datasets.labels import FINDING_LABELS, mesh_findings, mesh_is_abnormal, split_mesh
from cxrlib.datasets.table import SkipLog, assemble

LAYOUTS = ("auto", "nlm", "kaggle")
REPORT_SECTIONS = ("findings", "impression", "indication", "comparison")
#: DICOM View Position -> view
DICOM_VIEWS = {"PA": "frontal", "AP": "frontal", "LL": "lateral", "RL": "lateral", "LATERAL": "lateral",
               "LARGE LATERAL": "lateral"}
_XRV_DATA = "torchxrayvision/data"


def torchxrayvision_data(name: str) -> Path:
    """A data file shipped in the torchxrayvision package (NLMCXR_reports.tgz, nlmcxr_dicom_metadata.csv.gz)."""
    import importlib.util

    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name}: the torchxrayvision package is not installed (pip install torchxrayvision)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed torchxrayvision package")
    return path


def wrong_root_message(root: Path) -> str:
    return (f"{root} holds no Open-I copy: expected the NLM release (ecgen-radiology/ or NLMCXR_reports.tgz, "
            f"with NLMCXR_png/) or the Kaggle layout (indiana_reports.csv, indiana_projections.csv, "
            f"images/images_normalized/). Set OPENI_ROOT to a local copy, download it "
            f"(cxrlib.datasets.download.download_openi), or run `make demo` (no images needed)")


def detect_layout(root: str | Path) -> str:
    """``"kaggle"`` or ``"nlm"`` from the files in ``root``; a wrong root is an error saying what was expected."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(wrong_root_message(root))
    if (root / "indiana_reports.csv").is_file():
        return "kaggle"
    if (root / "ecgen-radiology").is_dir() or (root / "NLMCXR_reports.tgz").is_file():
        return "nlm"
    raise FileNotFoundError(wrong_root_message(root))


# ---- NLM reports -------------------------------------------------------------------------------

def _iter_xml(source: Path) -> Iterator[tuple[str, bytes]]:
    if source.is_dir():
        for p in sorted(source.glob("*.xml")):
            yield p.name, p.read_bytes()
    elif source.name.endswith((".tgz", ".tar.gz")):
        with tarfile.open(source, "r:gz") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".xml"):
                    yield m.name, tar.extractfile(m).read()
    else:
        raise FileNotFoundError(f"{source} is neither a folder of report XML files nor NLMCXR_reports.tgz")


def parse_report_xml(data: bytes, name: str = "") -> dict:
    """One NLM report XML -> study_id, sections, MeSH major/automatic terms, parent image ids.

    Raises ValueError naming ``name`` when the XML is malformed or has no ``uId``.
    """
    try:
        root = ET.parse(io.BytesIO(data)).getroot()
    except ET.ParseError as exc:
        raise ValueError(f"{name}: malformed XML ({exc})") from exc
    uid = root.find("uId")
    if uid is None or not uid.get("id"):
        raise ValueError(f"{name}: no <uId id=...> element")
    sections = {s: "" for s in REPORT_SECTIONS}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").lower()
        if label in sections:
            sections[label] = (node.text or "").strip()
    mesh = root.find("MeSH")
    major = [(m.text or "").strip() for m in mesh.findall("major")] if mesh is not None else []
    auto = [(m.text or "").strip() for m in mesh.findall("automatic")] if mesh is not None else []
    return {"study_id": uid.get("id"), **sections, "mesh": ";".join(t for t in major if t),
            "mesh_automatic": ";".join(t for t in auto if t),
            "image_ids": [p.get("id") for p in root.findall("parentImage") if p.get("id")]}


def read_nlm_reports(source: str | Path, skips: SkipLog | None = None) -> pd.DataFrame:
    """Every report of ``source`` (a folder of ``<n>.xml`` or ``NLMCXR_reports.tgz``); bad files are skipped."""
    skips = skips if skips is not None else SkipLog()
    rows = []
    for name, data in _iter_xml(Path(source)):
        try:
            rows.append(parse_report_xml(data, name))
        except ValueError as exc:
            skips.add(name, "malformed_xml", str(exc))
    if not rows:
        raise FileNotFoundError(f"no readable report XML in {source}")
    return pd.DataFrame(rows)


def infer_nlm_views(image_ids: pd.Series | list[str], metadata: str | Path | None = None) -> pd.Series:
    """image_id -> frontal/lateral, one frontal per study, by the rule in the module docstring."""
    metadata = Path(metadata) if metadata else torchxrayvision_data("nlmcxr_dicom_metadata.csv.gz")
    meta = pd.read_csv(metadata, usecols=["imageid", "View Position"]).drop_duplicates("imageid")
    vp = meta.set_index("imageid")["View Position"].astype(str).str.strip().str.upper()
    df = pd.DataFrame({"image_id": pd.unique(pd.Series(list(image_ids), dtype=object))})  # an id once
    df["vp"] = df["image_id"].map(vp)
    df["study"] = df["image_id"].str.extract(r"^([^_]+)_", expand=False).fillna(df["image_id"])
    df["suffix"] = pd.to_numeric(df["image_id"].str.extract(r"-(\d+)$", expand=False), errors="coerce")
    df["lateral_tag"] = df["vp"].map(DICOM_VIEWS).eq("lateral")
    df["rank_key"] = (df["vp"] != "AP").astype(int)
    cand = df[~df["lateral_tag"]].sort_values(["study", "rank_key", "suffix", "image_id"], na_position="last")
    frontal = set(cand.drop_duplicates("study")["image_id"])
    return pd.Series(["frontal" if i in frontal else "lateral" for i in df["image_id"]],
                     index=df["image_id"].values, dtype=object)


PROJECTION_COLUMNS = ("uid", "filename", "projection")


def read_projections(csv: str | Path) -> pd.DataFrame:
    """A Kaggle ``indiana_projections.csv`` with an ``image_id`` column (the Open-I name of ``filename``).

    A missing column, or an image listed in more than one row (a repeated row, or one image under two
    reports), is a ValueError naming the file and the column or image: each image has one report and one view.
    """
    proj = pd.read_csv(csv)
    missing = [c for c in PROJECTION_COLUMNS if c not in proj.columns]
    if missing:
        raise ValueError(f"{csv}: not an indiana_projections.csv (lacks column(s) {missing}; "
                         f"expected {list(PROJECTION_COLUMNS)})")
    empty = proj[["uid", "filename"]].isna().any(axis=1) | (proj["filename"].astype(str).str.strip() == "")
    if empty.any():
        raise ValueError(f"{csv}: rows {[i + 2 for i in proj.index[empty][:5]]} have no uid or filename "
                         f"({int(empty.sum())} such rows)")
    proj = proj.assign(image_id=proj["filename"].map(kaggle_image_id))
    dup = proj[proj["image_id"].duplicated(keep=False)]
    if len(dup):
        first = dup.iloc[0]
        rows = [i + 2 for i in dup.index[dup["image_id"] == first["image_id"]]]  # 1-based, after the header
        raise ValueError(f"{csv}: image {first['filename']!r} is listed in rows {rows} (uids "
                         f"{sorted(set(map(str, dup.loc[dup['image_id'] == first['image_id'], 'uid'])))}); "
                         f"{dup['image_id'].nunique()} image(s) listed more than once: each image needs one row")
    return proj


def projection_views(csv: str | Path) -> pd.Series:
    """image_id -> view from a Kaggle ``indiana_projections.csv`` (``Frontal``/``Lateral``; checked by
    :func:`read_projections`)."""
    proj = read_projections(csv)
    views = proj["projection"].astype(str).str.strip().str.lower()
    return pd.Series(views.where(views.isin(["frontal", "lateral"])).values, index=proj["image_id"].values,
                     dtype=object)


#: the Kaggle names whose Open-I name is not ``CXR`` + the name (study 1 repeats its number in Open-I)
KAGGLE_NAME_EXCEPTIONS = {"1_IM-0001-3001": "CXR1_1_IM-0001-3001", "1_IM-0001-4001": "CXR1_1_IM-0001-4001"}


def kaggle_image_id(filename: str) -> str:
    """``10_IM-0002-1001.dcm.png`` -> ``CXR10_IM-0002-1001`` (the Open-I image name, as in the report XML)."""
    stem = re.sub(r"(\.dcm)?\.png$", "", str(filename))
    return KAGGLE_NAME_EXCEPTIONS.get(stem, "CXR" + stem)


# ---- candidate studies and images for each layout ---------------------------------------------------

def _label_studies(studies: pd.DataFrame, no_indexing: str) -> pd.DataFrame:
    terms = studies["mesh"].map(split_mesh)
    studies = studies.copy()
    studies["label_abnormal"] = [mesh_is_abnormal(t, no_indexing) for t in terms]
    studies["label_abnormal"] = studies["label_abnormal"].astype("Int64")
    findings = pd.DataFrame([mesh_findings(t) for t in terms], index=studies.index)
    for name in FINDING_LABELS:
        studies[name] = findings[name].astype("float32")
    return studies


def nlm_candidates(reports: pd.DataFrame, png_dir: Path, views: pd.Series, skips: SkipLog | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Studies and images (``png_dir/<image_id>.png``, view from ``views``) of parsed NLM reports.

    An image listed by more than one report cannot be paired with one of them: it is skipped
    (``image_in_several_reports``, naming the reports); an id a report repeats counts once. A report
    left with no image by this is skipped too (``only_shared_images``), so that ``no_image`` keeps
    meaning that a report lists none.
    """
    skips = skips if skips is not None else SkipLog()
    studies = reports.drop(columns=["image_ids"]).assign(patient_id=reports["study_id"])
    images = reports[["study_id", "image_ids"]].explode("image_ids").dropna(subset=["image_ids"])
    images = images.rename(columns={"image_ids": "image_id"}).drop_duplicates().reset_index(drop=True)
    owners = images.groupby("image_id", sort=True)["study_id"].agg(list)
    shared = owners[owners.map(len) > 1]
    for image_id, study_ids in shared.items():
        skips.add(image_id, "image_in_several_reports", "listed by reports " + ", ".join(study_ids))
    lost = set(images["study_id"])
    images = images[~images["image_id"].isin(shared.index)].reset_index(drop=True)
    lost -= set(images["study_id"])
    for study_id in sorted(lost):
        skips.add(study_id, "only_shared_images", "every image the report lists is also listed by another report "
                  "(each skipped as image_in_several_reports)")
    studies = studies[~studies["study_id"].isin(lost)].reset_index(drop=True)
    images["image_path"] = [str(png_dir / f"{i}.png") for i in images["image_id"]]
    images["view"] = images["image_id"].map(views)
    return studies, images


def kaggle_candidates(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Studies and images of the Kaggle layout (``indiana_reports.csv`` + ``indiana_projections.csv``)."""
    for name in ("indiana_reports.csv", "indiana_projections.csv"):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root / name} is missing: the Kaggle layout needs indiana_reports.csv, "
                                    f"indiana_projections.csv and images/images_normalized/")
    reports = pd.read_csv(root / "indiana_reports.csv")
    need = {"uid", "MeSH", "findings", "impression"}
    if need - set(reports.columns):
        raise ValueError(f"{root / 'indiana_reports.csv'} lacks columns {sorted(need - set(reports.columns))}")
    studies = pd.DataFrame({
        "study_id": "CXR" + reports["uid"].astype(str), "patient_id": "CXR" + reports["uid"].astype(str),
        "findings": reports["findings"], "impression": reports["impression"],
        "indication": reports.get("indication"), "comparison": reports.get("comparison"),
        "mesh": reports["MeSH"].fillna("").map(lambda m: ";".join(split_mesh(m))),
    })
    proj = read_projections(root / "indiana_projections.csv")
    img_dir = root / "images" / "images_normalized"
    views = proj["projection"].astype(str).str.strip().str.lower()
    images = pd.DataFrame({
        "study_id": "CXR" + proj["uid"].astype(str), "image_id": proj["image_id"],
        "image_path": [str(img_dir / f) for f in proj["filename"]],
        "view": views.where(views.isin(["frontal", "lateral"])).values,
    })
    return studies, images


def openi_candidates(root: str | Path | None = None, layout: str = "auto", views_csv: str | Path | None = None,
                     no_indexing: str = "skip", skips: SkipLog | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled candidate studies and images of a local Open-I copy (either layout)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root) if root else paths.openi_root()
    detected = detect_layout(root)
    if layout != "auto" and layout != detected:
        raise ValueError(f"{root} looks like the {detected} layout, not {layout}")
    if detected == "kaggle":
        studies, images = kaggle_candidates(root)
    else:
        xml = root / "ecgen-radiology"
        reports = read_nlm_reports(xml if xml.is_dir() else root / "NLMCXR_reports.tgz", skips)
        views_csv = Path(views_csv) if views_csv else root / "indiana_projections.csv"
        if views_csv.is_file():
            views = projection_views(views_csv)
        else:
            warnings.warn("no indiana_projections.csv: views inferred from DICOM tags and image names (93.7% right; "
                          "see cxrlib.datasets.openi); put the CSV in OPENI_ROOT or pass views_csv", stacklevel=2)
            views = infer_nlm_views([i for ids in reports["image_ids"] for i in ids])
        png_dir = root / "NLMCXR_png" if (root / "NLMCXR_png").is_dir() else root
        studies, images = nlm_candidates(reports, png_dir, views, skips)
    return _label_studies(studies, no_indexing), images


def build_openi(root: str | Path | None = None, layout: str = "auto", views_csv: str | Path | None = None,
                no_indexing: str = "skip", **assemble_kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Study table of a local Open-I copy; ``assemble_kw`` go to :func:`cxrlib.datasets.table.assemble`."""
    skips = SkipLog()
    studies, images = openi_candidates(root, layout, views_csv, no_indexing, skips)
    table = assemble(studies, images, skips, source=f"openi-{detect_layout(root or paths.openi_root())}",
                     **assemble_kw)
    return table, skips.table()


def build_openi_synth(image_size: int = 256, seed: int = 0, out_dir: str | Path | None = None,
                      no_indexing: str = "skip", **assemble_kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Real NLM reports (torchxrayvision's copy) + synthetic radiographs rendered for the selected images.

    Images go to ``raw_dir()/openi_synth/NLMCXR_png`` (an NLM layout); only the images the table
    keeps are rendered, and ones already there are reused only when drawn from the same seed, findings
    and renderer (:func:`cxrlib.datasets.synthetic.render_key`).
    """
    from cxrlib.datasets import synthetic

    out_dir = Path(out_dir) if out_dir else paths.raw_dir() / "openi_synth" / "NLMCXR_png"
    skips = SkipLog()
    reports = read_nlm_reports(torchxrayvision_data("NLMCXR_reports.tgz"), skips)
    views = infer_nlm_views([i for ids in reports["image_ids"] for i in ids])
    studies, images = nlm_candidates(reports, out_dir.resolve(), views, skips)
    studies = _label_studies(studies, no_indexing)
    assemble_kw = {**assemble_kw, "verify_images": False}
    table = assemble(studies, images, skips, source="openi_synth", seed=seed, **assemble_kw)
    rendered = synthetic.render_openi_images(table[["image_id", "view", "mesh"]].assign(
        mesh=table["mesh"].where(table["label_abnormal"] == 1, "normal")), out_dir, size=image_size, seed=seed)
    got = dict(zip(rendered["image_id"], rendered["image_path"]))
    missing = [i for i in table["image_id"] if i not in got]
    if missing:
        raise RuntimeError(f"the renderer returned no image for {len(missing)} ids, e.g. {missing[:3]}")
    table["image_path"] = [str(Path(got[i]).resolve()) for i in table["image_id"]]
    return table, skips.table()
