"""``data_summary``: the numbers notebook 01 reports (written to ``results/<profile>/data_summary.json``)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from cxrlib.datasets.labels import FINDING_LABELS


def data_summary(table: pd.DataFrame, skips: pd.DataFrame, top_duplicates: int = 5) -> dict[str, Any]:
    """Counts per split and label, finding prevalence, skips by reason, duplicate-report statistics."""
    splits = [s for s in ("train", "val", "test") if s in set(table["split"])]
    per_split = {}
    for s in [*splits, "all"]:
        t = table if s == "all" else table[table["split"] == s]
        per_split[s] = {"images": len(t), "studies": int(t["study_id"].nunique()),
                        "patients": int(t["patient_id"].nunique()),
                        "normal": int((t["label_abnormal"] == 0).sum()), "abnormal": int((t["label_abnormal"] == 1).sum()),
                        "abnormal_fraction": round(float(t["label_abnormal"].mean()), 4) if len(t) else None}
    findings = {}
    for name in FINDING_LABELS:
        col = table[name]
        findings[name] = {"positive": int((col == 1).sum()), "negative": int((col == 0).sum()),
                          "unknown": int(col.isna().sum())}
    groups = table.drop_duplicates("report_group")
    dup = table[table["report_dup_count"] > 1]
    top = groups.sort_values("report_dup_count", ascending=False).head(top_duplicates)
    words = table["report"].str.split().str.len()
    return {
        "source": sorted(set(table["source"])),
        "splits": per_split,
        "views": table["view"].value_counts().to_dict(),
        "text_sections": table["text_sections"].value_counts().to_dict(),
        "findings": findings,
        "skips": {"total": len(skips), "by_reason": skips["reason"].value_counts().to_dict() if len(skips) else {}},
        "duplicate_reports": {
            "distinct_reports": len(groups),
            "studies_sharing_text": len(dup),
            "fraction_sharing_text": round(len(dup) / len(table), 4),
            "largest_group": int(table["report_dup_count"].max()),
            "top": [{"count": int(r.report_dup_count), "label_abnormal": int(r.label_abnormal),
                     "report": r.report[:200]} for r in top.itertuples()],
            "mixed_label_groups": int((table.groupby("report_group")["label_abnormal"].nunique() > 1).sum()),
        },
        "report_words": {"median": float(words.median()), "p95": float(words.quantile(0.95)),
                         "max": int(words.max())},
    }
