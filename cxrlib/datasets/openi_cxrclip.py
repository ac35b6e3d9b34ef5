"""Open-I as CXR-CLIP evaluates it: every frontal image with its report, all of them evaluation rows.

CXR-CLIP (Kaist-AI ``kakaobrain/cxr-clip``, MICCAI 2023) trains on MIMIC-CXR / CheXpert and uses
Open-I only for evaluation: all frontal images paired with their report (its paper reports 3,955
image-text pairs), the text being ``max(findings, impression)``. Python's ``max`` of two strings is the
*lexicographically* larger one, not the longer (CXR-CLIP issue #10); this set uses the longer section
instead (``text_sections="longest"`` of :func:`cxrlib.datasets.table.compose_report`; a tie keeps the
findings) and says so.

Differences from the package's own Open-I table, which stays the default: every frontal image of a
study is kept (not one per study), no train/val split (``split = "test"`` for every row), the report
text is the longest section. A model trained on this package's Open-I training split has seen most of
these studies: report it on this set only for models trained elsewhere (as CXR-CLIP does), and the
patient-level test split of ``DATASET=openi`` for models trained on Open-I.

The number of pairs depends on the copy: the Kaggle layout lists fewer frontal images than the NLM
release; the build reports its own count and every skip.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cxrlib.datasets.table import SkipLog, assemble

#: how CXR-CLIP's report text is composed here (the longest of findings/impression, not the lexicographic max)
TEXT_SECTIONS = "longest"


def build_openi_cxrclip(root: str | Path | None = None, layout: str = "auto", views_csv: str | Path | None = None,
                        no_indexing: str = "skip", anon: str = "remove", verify_images: bool = True,
                        **_ignored) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(table, skips)``: all frontal Open-I images with the longest report section, every row ``test``.

    The set is fixed, so ``view``, ``one_image_per_study``, ``text_sections``, ``max_studies`` and split
    fractions of the table builder do not apply (accepted and ignored).
    """
    from cxrlib.datasets import openi

    skips = SkipLog()
    studies, images = openi.openi_candidates(root, layout, views_csv, no_indexing, skips)
    split = pd.Series("test", index=studies["study_id"].unique())
    table = assemble(studies, images, skips, source="openi_cxrclip", view="frontal", one_image_per_study=False,
                     verify_images=verify_images, text_sections=TEXT_SECTIONS, anon=anon, splits=split)
    return table, skips.table()
