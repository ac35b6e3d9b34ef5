"""``build_study_table(dataset, **params)``: one entry point for every source.

Parameters shared by all sources (see :func:`cxrlib.datasets.table.assemble`): ``view``
("frontal", "lateral" or None = all), ``one_image_per_study``, ``verify_images``, ``text_sections``,
``anon``, ``max_studies``, ``seed``, ``val_frac``, ``test_frac``. Source parameters:

* ``openi``: ``root`` (default ``OPENI_ROOT``), ``layout`` (auto|nlm|kaggle), ``views_csv``,
  ``no_indexing``, ``download`` (fetch the NLM release into ``raw_dir()/openi`` when neither ``root`` nor
  ``OPENI_ROOT`` is given and that folder is empty).
* ``openi_synth``: ``image_size``, ``no_indexing``, ``out_dir``.
* ``mimic``: ``root`` (default ``MIMIC_ROOT``), ``reports``, ``uncertain``, ``normal_rule``, ``split``
  (official|random), ``labeler`` (chexpert|negbio).
* ``synthetic``: ``n_studies``, ``image_size``, ``views``, ``out_dir``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cxrlib import paths
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.table import SkipLog, assemble

DATASETS = ("openi", "openi_synth", "mimic", "synthetic")


def build_synthetic(n_studies: int = 200, image_size: int = 256, views=("frontal",), seed: int = 0,
                    out_dir: str | Path | None = None, **assemble_kw) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Fully synthetic studies (templated reports, rendered radiographs) as a study table."""
    from cxrlib.datasets import synthetic

    out_dir = Path(out_dir) if out_dir else paths.raw_dir() / "synthetic"
    raw = synthetic.make_synthetic_studies(n_studies, out_dir, seed=seed, size=image_size, views=tuple(views))
    study_cols = ["study_id", "patient_id", "findings", "impression", "mesh", "label_abnormal",
                  *[c for c in FINDING_LABELS if c in raw.columns]]
    studies = raw[study_cols].drop_duplicates("study_id").reset_index(drop=True)
    images = raw[["study_id", "image_id", "image_path", "view"]].reset_index(drop=True)
    skips = SkipLog()
    table = assemble(studies, images, skips, source="synthetic", seed=seed, **assemble_kw)
    return table, skips.table()


def build_study_table(dataset: str, **params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, skips)`` of ``dataset``; ``skips`` lists every dropped item with its reason."""
    if dataset == "openi":
        from cxrlib.datasets import openi

        if params.pop("download", False) and not params.get("root") and not os.environ.get("OPENI_ROOT"):
            # only into the package's own folder: a root the user names is never filled behind their back
            from cxrlib.datasets.download import download_openi

            root = paths.openi_root()
            if not root.is_dir() or not any(p for p in root.iterdir() if not p.name.startswith(".")):
                download_openi(root)
        return openi.build_openi(**params)
    if dataset == "openi_synth":
        from cxrlib.datasets import openi

        return openi.build_openi_synth(**params)
    if dataset == "mimic":
        from cxrlib.datasets import mimic

        return mimic.build_mimic(**params)
    if dataset == "synthetic":
        return build_synthetic(**params)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")


def notebook_params(dataset: str, *, seed: int = 0, view: str | None = "frontal",
                    text_sections: str = "findings+impression", anon: str = "remove", val_frac: float = 0.1,
                    test_frac: float = 0.2, one_image_per_study: bool = True, max_studies: int | None = None,
                    verify_images: bool = True, image_size: int = 256, n_synthetic_studies: int = 200,
                    openi_layout: str = "auto", openi_root: str | None = None, mimic_root: str | None = None,
                    no_indexing: str = "skip", mimic_uncertain: str = "nan", mimic_normal_rule: str = "no_finding",
                    mimic_split: str = "official", mimic_labeler: str = "chexpert", download: bool = False) -> dict:
    """Notebook 01's flat parameters -> the keyword arguments of ``build_study_table(dataset, ...)``."""
    common = dict(seed=seed, view=view, text_sections=text_sections, anon=anon, val_frac=val_frac,
                  test_frac=test_frac, one_image_per_study=one_image_per_study, max_studies=max_studies,
                  verify_images=verify_images)
    if dataset == "openi":
        return {**common, "root": openi_root or None, "layout": openi_layout, "no_indexing": no_indexing,
                "download": download}
    if dataset == "openi_synth":
        common.pop("verify_images")
        return {**common, "image_size": image_size, "no_indexing": no_indexing}
    if dataset == "mimic":
        return {**common, "root": mimic_root or None, "uncertain": mimic_uncertain, "normal_rule": mimic_normal_rule,
                "split": mimic_split, "labeler": mimic_labeler}
    if dataset == "synthetic":
        return {**common, "n_studies": n_synthetic_studies, "image_size": image_size}
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
