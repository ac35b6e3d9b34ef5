"""Align a study table with image and text embeddings: the input of training and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cxrlib.embstore import Embeddings


@dataclass
class PairedSplit:
    """Row i: image ``image_ids[i]`` of study ``study_ids[i]`` with that study's report.

    ``img``/``txt`` are float32 [N, D] arrays, ``labels`` int64 0/1 (abnormal), ``findings`` a
    float32 [N, F] matrix of finding labels (NaN = unknown) or None, ``table`` the rows used.
    """

    img: np.ndarray
    txt: np.ndarray
    labels: np.ndarray
    study_ids: np.ndarray
    patient_ids: np.ndarray
    image_ids: np.ndarray
    report_groups: np.ndarray
    findings: np.ndarray | None
    table: pd.DataFrame

    def __len__(self) -> int:
        return len(self.labels)


def paired_split(table: pd.DataFrame, image_emb: Embeddings, text_emb: Embeddings,
                 split: str | None = None, finding_columns: list[str] | None = None) -> PairedSplit:
    """Rows of ``table`` (optionally one split) with their image and report embeddings.

    A row whose image or report has no embedding is an error naming the ids, never a silent drop.
    """
    rows = table if split is None else table[table["split"] == split]
    if rows.empty:
        raise ValueError(f"split {split!r} has no rows")
    rows = rows.reset_index(drop=True)
    findings = None
    if finding_columns:
        cols = [c for c in finding_columns if c in rows.columns]
        findings = rows[cols].to_numpy(np.float32) if cols else None
    return PairedSplit(
        img=image_emb.take(rows["image_id"]),
        txt=text_emb.take(rows["study_id"]),
        labels=rows["label_abnormal"].to_numpy(np.int64),
        study_ids=rows["study_id"].astype(str).to_numpy(),
        patient_ids=rows["patient_id"].astype(str).to_numpy(),
        image_ids=rows["image_id"].astype(str).to_numpy(),
        report_groups=rows["report_group"].to_numpy(np.int64) if "report_group" in rows else
        pd.factorize(rows["report"])[0].astype(np.int64),
        findings=findings,
        table=rows,
    )
