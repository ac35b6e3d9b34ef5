"""Align a study table with image and text embeddings: the input of training, evaluation and the maps.

:func:`load_paired` is the one loader of a table plus cached embeddings; it checks that the cached
embeddings were extracted for the backbone asked for.
"""

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


def load_paired(dataset: str, backbone: str, splits: tuple[str, ...] = ("train", "val"),
                finding_columns: list[str] | None = None) -> dict[str, PairedSplit]:
    """The study table's ``splits`` paired with the cached embeddings of ``backbone`` (checked by name).

    Reads ``paths.study_table_path(dataset)`` and ``paths.embeddings_dir()/dataset/<backbone>/{image,text}.npz``;
    a missing table, a row without a 0/1 ``label_abnormal`` or an id without an embedding is an error naming it.
    """
    from cxrlib import paths
    from cxrlib.dag import embedding_dir
    from cxrlib.embstore import load_embeddings

    table_path = paths.study_table_path(dataset)
    if not table_path.is_file():
        raise FileNotFoundError(f"no study table at {table_path}: notebook 01 writes it (`make demo` runs it offline, "
                                f"`make paper DATASET={dataset}` with the data set at hand)")
    table = pd.read_parquet(table_path)  # validated by save_study_table when notebook 01 wrote it
    rows = table[table["split"].isin(splits)]
    bad = ~rows["label_abnormal"].isin((0, 1))
    if bad.any():
        raise ValueError(f"{table_path.name}: {int(bad.sum())} rows of {list(splits)} have no 0/1 label_abnormal, "
                         f"e.g. study_ids {rows.loc[bad, 'study_id'].astype(str).head(5).tolist()}")
    emb_dir = embedding_dir(dataset, backbone)
    image = load_embeddings(emb_dir / "image.npz", expect_backbone=backbone)
    text = load_embeddings(emb_dir / "text.npz", expect_backbone=backbone)
    return {s: paired_split(table, image, text, s, finding_columns=finding_columns) for s in splits}
