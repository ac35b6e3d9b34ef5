"""Small fake copies of the published layouts (Open-I NLM and Kaggle, MIMIC-CXR-JPG) for tests and demos.

The files have the real formats (report XML, CSV tables, ``.csv.gz``, ``mimic-cxr-reports.zip``,
PNG/JPEG images) with made-up content, so readers are exercised on the real structure without the
real (licensed) data. Each builder returns the root it wrote.
"""

from __future__ import annotations

import gzip
import io
import zipfile
import zlib
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import pandas as pd
from PIL import Image

#: (MeSH major terms, findings, impression) cycled over fake Open-I studies
OPENI_CASES: tuple[tuple[list[str], str, str], ...] = (
    (["normal"], "The heart is normal in size. The lungs are clear.", "No acute disease."),
    (["Cardiomegaly/mild", "Pleural Effusion/right/small"], "The heart is enlarged. Small right effusion.",
     "Cardiomegaly and small right pleural effusion."),
    (["normal"], "", "Normal chest x-XXXX."),
    (["Opacity/lung/base/left", "Pulmonary Atelectasis/base/left"], "Left basilar opacity, XXXX atelectasis.",
     "Left basilar atelectasis."),
    (["Calcified Granuloma/lung/upper lobe/right"], "Calcified granuloma in the right upper lobe.", ""),
    (["normal"], "The heart is normal in size. The lungs are clear.", "No acute disease."),
    (["Catheters, Indwelling/right", "Pneumothorax/apex/left/small"], "Right central line. Small left pneumothorax.",
     "Small left apical pneumothorax."),
    (["Nodule/lung/middle lobe/right"], "Nodule in the right middle lobe.", "Right middle lobe nodule."),
)


def write_image(path: Path, seed: int, size: int = 32, fmt: str = "PNG") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), "L").save(path, format=fmt)
    return path


def report_xml(n: int, mesh: list[str], findings: str, impression: str, image_ids: list[str],
               automatic: tuple[str, ...] = ()) -> str:
    """An ``ecgen-radiology/<n>.xml`` in the NLM format (the elements the reader uses, in their real places)."""
    terms = "".join(f"\n      <major>{escape(t)}</major>" for t in mesh)
    terms += "".join(f"\n      <automatic>{escape(t)}</automatic>" for t in automatic)
    imgs = "".join(f'\n   <parentImage id="{i}">\n      <figureId>F{k + 1}</figureId>\n      <caption>Xray Chest PA and '
                   f'Lateral</caption>\n   </parentImage>' for k, i in enumerate(image_ids))
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <docSource>CXR</docSource>
   <IUXRId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Chest pain.</AbstractText>
            <AbstractText Label="FINDINGS">{escape(findings)}</AbstractText>
            <AbstractText Label="IMPRESSION">{escape(impression)}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>{terms}
   </MeSH>{imgs}
</eCitation>
"""


def fake_openi_studies(n_studies: int) -> list[dict]:
    """Study specs: number, MeSH, findings, impression and two images (frontal ``-1001``, lateral ``-2001``)."""
    out = []
    for k in range(n_studies):
        n = k + 1
        mesh, f, i = OPENI_CASES[k % len(OPENI_CASES)]
        stem = f"{n}_IM-{1000 + n:04d}"
        out.append({"n": n, "mesh": mesh, "findings": f, "impression": i,
                    "images": [(f"{stem}-1001", "Frontal"), (f"{stem}-2001", "Lateral")]})
    return out


def make_fake_openi_nlm(root: str | Path, n_studies: int = 24, projections: bool = True, archive: bool = False,
                        studies: list[dict] | None = None) -> Path:
    """An NLM-layout tree: ``NLMCXR_png/CXR<stem>.png``, ``ecgen-radiology/<n>.xml`` (or ``NLMCXR_reports.tgz``
    when ``archive``) and, when ``projections``, an ``indiana_projections.csv`` giving the views."""
    import tarfile

    root = Path(root)
    studies = studies or fake_openi_studies(n_studies)
    xml_dir = root / "ecgen-radiology"
    xml_dir.mkdir(parents=True, exist_ok=True)
    proj = []
    for s in studies:
        ids = [f"CXR{stem}" for stem, _ in s["images"]]
        (xml_dir / f"{s['n']}.xml").write_text(report_xml(s["n"], s["mesh"], s["findings"], s["impression"], ids))
        for (stem, view), iid in zip(s["images"], ids):
            write_image(root / "NLMCXR_png" / f"{iid}.png", seed=zlib.crc32(iid.encode()))
            proj.append({"uid": s["n"], "filename": f"{stem}.dcm.png", "projection": view})
    if projections:
        pd.DataFrame(proj).to_csv(root / "indiana_projections.csv", index=False)
    if archive:
        with tarfile.open(root / "NLMCXR_reports.tgz", "w:gz") as tar:
            tar.add(xml_dir, arcname="ecgen-radiology")
        for p in xml_dir.glob("*.xml"):
            p.unlink()
        xml_dir.rmdir()
    return root


def make_fake_openi_kaggle(root: str | Path, n_studies: int = 24, studies: list[dict] | None = None) -> Path:
    """A Kaggle-layout tree: ``indiana_reports.csv``, ``indiana_projections.csv``, ``images/images_normalized``."""
    root = Path(root)
    studies = studies or fake_openi_studies(n_studies)
    reports, proj = [], []
    for s in studies:
        reports.append({"uid": s["n"], "MeSH": ";".join(s["mesh"]), "Problems": "", "image": "Xray Chest PA and Lateral",
                        "indication": "Chest pain.", "comparison": "None.", "findings": s["findings"] or None,
                        "impression": s["impression"] or None})
        for stem, view in s["images"]:
            write_image(root / "images" / "images_normalized" / f"{stem}.dcm.png", seed=zlib.crc32(("CXR" + stem).encode()))
            proj.append({"uid": s["n"], "filename": f"{stem}.dcm.png", "projection": view})
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(reports).to_csv(root / "indiana_reports.csv", index=False)
    pd.DataFrame(proj).to_csv(root / "indiana_projections.csv", index=False)
    return root


# ---- MIMIC-CXR-JPG -------------------------------------------------------------------------------

MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old woman with cough.

 COMPARISON:  None.

 FINDINGS:

 {findings}

 IMPRESSION:

 {impression}
"""

#: (CheXpert values {label: value}, findings, impression) cycled over fake MIMIC studies
MIMIC_CASES = (
    ({"No Finding": 1.0}, "The lungs are clear. No effusion or pneumothorax.", "No acute cardiopulmonary process."),
    ({"Cardiomegaly": 1.0, "Edema": -1.0}, "Moderate cardiomegaly. Possible mild edema.", "Cardiomegaly."),
    ({"Pleural Effusion": 1.0, "Atelectasis": 1.0}, "Small left effusion with adjacent atelectasis.",
     "Left effusion."),
    ({"Pneumonia": -1.0}, "Patchy right basilar opacity.", "Possible pneumonia."),
)


def _gz_csv(df: pd.DataFrame, path: Path) -> None:
    with gzip.open(path, "wt") as fh:
        df.to_csv(fh, index=False)


def make_fake_mimic(root: str | Path, n_patients: int = 12, studies_per_patient: int = 2,
                    reports: str = "zip") -> Path:
    """A MIMIC-CXR-JPG 2.x tree: ``files/pXX/p<subject>/s<study>/<dicom>.jpg`` (a PA and a LATERAL per study),
    the metadata / split / chexpert ``.csv.gz`` tables and the reports (``zip`` or ``txt`` under files/)."""
    from cxrlib.datasets.labels import FINDING_LABELS

    root = Path(root)
    meta, split, chex, texts = [], [], [], {}
    splits = ["train"] * 8 + ["validate", "test", "test", "train"]
    for p in range(n_patients):
        subject = 10000000 + 37 * p
        for s in range(studies_per_patient):
            study = 50000000 + 1000 * p + s
            labels, f, i = MIMIC_CASES[(p * studies_per_patient + s) % len(MIMIC_CASES)]
            for view in ("PA", "LATERAL"):
                dicom = f"{subject:08d}-{study:08d}-{view.lower()}"
                write_image(root / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg",
                            seed=zlib.crc32(dicom.encode()), fmt="JPEG")
                meta.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                             "PerformedProcedureStepDescription": "CHEST (PA AND LAT)", "ViewPosition": view,
                             "Rows": 32, "Columns": 32, "StudyDate": 21800101, "StudyTime": 101010.0})
                split.append({"dicom_id": dicom, "study_id": study, "subject_id": subject,
                              "split": splits[p % len(splits)]})
            chex.append({"subject_id": subject, "study_id": study,
                         **{k: labels.get(k, np.nan) for k in sorted(FINDING_LABELS)}})
            texts[f"files/p{str(subject)[:2]}/p{subject}/s{study}.txt"] = MIMIC_REPORT.format(findings=f, impression=i)
    root.mkdir(parents=True, exist_ok=True)
    _gz_csv(pd.DataFrame(meta), root / "mimic-cxr-2.0.0-metadata.csv.gz")
    _gz_csv(pd.DataFrame(split), root / "mimic-cxr-2.0.0-split.csv.gz")
    _gz_csv(pd.DataFrame(chex), root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    negbio = pd.DataFrame(chex)
    negbio["Edema"] = negbio["Edema"].replace({-1.0: 1.0})  # the two labelers disagree on a few studies
    _gz_csv(negbio, root / "mimic-cxr-2.0.0-negbio.csv.gz")
    if reports == "zip":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for name, text in texts.items():
                zf.writestr(name, text)
        (root / "mimic-cxr-reports.zip").write_bytes(buf.getvalue())
    else:
        for name, text in texts.items():
            (root / name).write_text(text)
    return root
