"""``build_study_table(dataset, **params)``: one entry point for every source, one registry entry each.

Parameters shared by all sources (see :func:`cxrlib.datasets.table.assemble`): ``view``
("frontal", "lateral" or None = all), ``one_image_per_study``, ``verify_images``, ``text_sections``,
``anon``, ``max_studies``, ``seed``, ``val_frac``, ``test_frac``. Each source's own parameters are
those of its builder (its docstring below); :func:`notebook_params` maps notebook 01's flat
parameters onto them through the entry's ``params`` function.
"""

from __future__ import annotations

import os
from pathlib import Path

from cxrlib import paths
from cxrlib.datasets.registry import DatasetUnavailable, get_dataset, register_dataset

# ---- openi ---------------------------------------------------------------------------------------


def _openi_params(common: dict, nb: dict) -> dict:
    return {**common, "root": nb["openi_root"] or None, "layout": nb["openi_layout"],
            "no_indexing": nb["no_indexing"], "download": nb["download"]}


def _openi_check(reachable) -> None:
    from cxrlib.datasets.download import OFFLINE_HINT, OPENI_BASE_URL

    if os.environ.get("OPENI_ROOT"):
        if not paths.openi_root().is_dir():
            raise DatasetUnavailable(f"OPENI_ROOT={paths.openi_root()} does not exist")
    elif not any(paths.openi_root().glob("*")) and not reachable(OPENI_BASE_URL):
        raise DatasetUnavailable(f"Open-I images are not here and NLM is unreachable (no network): {OFFLINE_HINT}")


@register_dataset("openi", _openi_params, _openi_check)
def build_openi(download: bool = False, **params):
    """Open-I with its real images (NLM or Kaggle layout, ``OPENI_ROOT``); see :mod:`cxrlib.datasets.openi`.

    ``root`` (default ``OPENI_ROOT``), ``layout`` (auto|nlm|kaggle), ``views_csv``, ``no_indexing``;
    ``download`` fetches the NLM release into ``raw_dir()/openi`` when neither ``root`` nor
    ``OPENI_ROOT`` is given and that folder is empty.
    """
    from cxrlib.datasets import openi

    if download and not params.get("root") and not os.environ.get("OPENI_ROOT"):
        # only into the package's own folder: a root the user names is never filled behind their back
        from cxrlib.datasets.download import download_openi

        root = paths.openi_root()
        if not root.is_dir() or not any(p for p in root.iterdir() if not p.name.startswith(".")):
            download_openi(root)
    return openi.build_openi(**params)


# ---- openi_synth ---------------------------------------------------------------------------------


def _openi_synth_params(common: dict, nb: dict) -> dict:
    common = {k: v for k, v in common.items() if k != "verify_images"}
    return {**common, "image_size": nb["image_size"], "no_indexing": nb["no_indexing"]}


@register_dataset("openi_synth", _openi_synth_params)
def build_openi_synth(**params):
    """Real Open-I reports + SYNTHETIC radiographs (the offline profile); ``image_size``, ``no_indexing``, ``out_dir``."""
    from cxrlib.datasets import openi

    return openi.build_openi_synth(**params)


# ---- mimic ---------------------------------------------------------------------------------------


def _mimic_params(common: dict, nb: dict) -> dict:
    return {**common, "root": nb["mimic_root"] or None, "uncertain": nb["mimic_uncertain"],
            "normal_rule": nb["mimic_normal_rule"], "split": nb["mimic_split"], "labeler": nb["mimic_labeler"]}


def _mimic_check(reachable) -> None:
    root = paths.mimic_root()
    if root is None:
        raise DatasetUnavailable("DATASET=mimic needs MIMIC_ROOT=/path/to/mimic-cxr-jpg (credentialed data, "
                                 "never downloaded by this package)")
    if not root.is_dir():
        raise DatasetUnavailable(f"MIMIC_ROOT={root} does not exist")


@register_dataset("mimic", _mimic_params, _mimic_check)
def build_mimic(**params):
    """MIMIC-CXR-JPG (credentialed, ``MIMIC_ROOT``); ``root``, ``reports``, ``uncertain``, ``normal_rule``,
    ``split`` (official|random), ``labeler`` (chexpert|negbio)."""
    from cxrlib.datasets import mimic

    return mimic.build_mimic(**params)


# ---- evaluation sets of the peers (every row ``test``; see cxrlib.protocols) -----------------------


@register_dataset("mimic_5x200", lambda common, nb: {**common, "root": nb["mimic_root"] or None,
                                                    "uncertain": nb["mimic_uncertain"],
                                                    "normal_rule": nb["mimic_normal_rule"],
                                                    "labeler": nb["mimic_labeler"]}, _mimic_check)
def build_mimic_5x200(**params):
    """BenchX's MIMIC-5x200 retrieval set from a local MIMIC-CXR-JPG copy (id list fetched at run time);
    see :mod:`cxrlib.datasets.mimic5x200`."""
    from cxrlib.datasets import mimic5x200

    return mimic5x200.build_mimic_5x200(**params)


@register_dataset("openi_cxrclip", lambda common, nb: {**common, "root": nb["openi_root"] or None,
                                                      "layout": nb["openi_layout"], "no_indexing": nb["no_indexing"]},
                  _openi_check)
def build_openi_cxrclip(**params):
    """Open-I as CXR-CLIP evaluates it: all frontal images, longest of findings/impression, every row test;
    see :mod:`cxrlib.datasets.openi_cxrclip`."""
    from cxrlib.datasets import openi_cxrclip

    return openi_cxrclip.build_openi_cxrclip(**params)


# ---- synthetic -----------------------------------------------------------------------------------


def _synthetic_params(common: dict, nb: dict) -> dict:
    return {**common, "n_studies": nb["n_synthetic_studies"], "image_size": nb["image_size"]}


@register_dataset("synthetic", _synthetic_params)
def build_synthetic(n_studies: int = 200, image_size: int = 256, views=("frontal",), seed: int = 0,
                    out_dir: str | Path | None = None, **assemble_kw):
    """Fully synthetic studies (templated reports, rendered radiographs): smoke profile and tests."""
    from cxrlib.datasets import synthetic
    from cxrlib.datasets.labels import FINDING_LABELS
    from cxrlib.datasets.table import SkipLog, assemble

    out_dir = Path(out_dir) if out_dir else paths.raw_dir() / "synthetic"
    raw = synthetic.make_synthetic_studies(n_studies, out_dir, seed=seed, size=image_size, views=tuple(views))
    study_cols = ["study_id", "patient_id", "findings", "impression", "mesh", "label_abnormal",
                  *[c for c in FINDING_LABELS if c in raw.columns]]
    studies = raw[study_cols].drop_duplicates("study_id").reset_index(drop=True)
    images = raw[["study_id", "image_id", "image_path", "view"]].reset_index(drop=True)
    skips = SkipLog()
    table = assemble(studies, images, skips, source="synthetic", seed=seed, **assemble_kw)
    return table, skips.table()


# ---- one entry point -----------------------------------------------------------------------------


def build_study_table(dataset: str, **params):
    """``(table, skips)`` of ``dataset``; ``skips`` lists every dropped item with its reason."""
    return get_dataset(dataset).build(**params)


def notebook_params(dataset: str, *, seed: int = 0, view: str | None = "frontal",
                    text_sections: str = "findings+impression", anon: str = "remove", val_frac: float = 0.1,
                    test_frac: float = 0.2, one_image_per_study: bool = True, max_studies: int | None = None,
                    verify_images: bool = True, image_size: int = 256, n_synthetic_studies: int = 200,
                    openi_layout: str = "auto", openi_root: str | None = None, mimic_root: str | None = None,
                    no_indexing: str = "skip", mimic_uncertain: str = "nan", mimic_normal_rule: str = "no_finding",
                    mimic_split: str = "official", mimic_labeler: str = "chexpert", download: bool = False) -> dict:
    """Notebook 01's flat parameters -> the keyword arguments of ``build_study_table(dataset, ...)``."""
    entry = get_dataset(dataset)
    common = dict(seed=seed, view=view, text_sections=text_sections, anon=anon, val_frac=val_frac,
                  test_frac=test_frac, one_image_per_study=one_image_per_study, max_studies=max_studies,
                  verify_images=verify_images)
    nb = dict(image_size=image_size, n_synthetic_studies=n_synthetic_studies, openi_layout=openi_layout,
              openi_root=openi_root, mimic_root=mimic_root, no_indexing=no_indexing, mimic_uncertain=mimic_uncertain,
              mimic_normal_rule=mimic_normal_rule, mimic_split=mimic_split, mimic_labeler=mimic_labeler,
              download=download)
    return entry.params(common, nb)
