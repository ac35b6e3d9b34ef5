"""Published retrieval numbers, cited, placed beside this package's only where the setting matches.

The numbers live in one data file, ``cxrlib/data/published_baselines.csv`` (never in a table by hand):
one row per (model, evaluation set, protocol, direction, metric, k) with the value as published, its
unit, the source (authors, title, venue / arXiv id), the location in it (table), whether the value was
checked against the source in this package's history (``verified`` says how, or why not) and a note.

:func:`beside_ours` returns, for one evaluation set, a table per (protocol, direction) that both the
file and the results hold: this package's models (value with CI) and the published ones. A published
number whose evaluation set or protocol differs from every result is never shown.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

PUBLISHED_PATH = Path(__file__).resolve().parent / "data" / "published_baselines.csv"
COLUMNS = ("model", "eval_set", "protocol", "direction", "metric", "k", "value", "unit", "source", "location",
           "verified", "note")
UNITS = {"percent": 0.01, "fraction": 1.0}
#: the evaluation sets a result can name: the peers' fixed sets, or ``<dataset>_<split>``
FIXED_EVAL_SETS = ("mimic_5x200", "openi_cxrclip")


def eval_set_name(dataset: str, split: str = "test") -> str:
    """The evaluation-set name of results on ``dataset``'s ``split`` (``mimic`` test -> ``mimic_test``;
    a peer's fixed set keeps its own name)."""
    return dataset if dataset in FIXED_EVAL_SETS else f"{dataset}_{split}"


def load_published(path: str | os.PathLike = PUBLISHED_PATH) -> pd.DataFrame:
    """The published numbers, validated: every column present, every row with a source and location, a
    known protocol, direction and metric of that protocol, a value within its unit's range."""
    from cxrlib import protocols, retrieval

    path = Path(path)
    df = pd.read_csv(path, dtype={"k": "Int64"}, keep_default_na=False, na_values={"value": [""], "k": [""]})
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    problems = []
    for i, r in df.iterrows():
        where = f"row {i + 2} ({r['model']}, {r['eval_set']})"
        for col in ("model", "eval_set", "source", "location", "verified"):
            if not str(r[col]).strip():
                problems.append(f"{where}: empty {col}")
        if r["protocol"] not in protocols.PROTOCOLS:
            problems.append(f"{where}: unknown protocol {r['protocol']!r}")
        elif r["metric"] not in protocols.PROTOCOLS[r["protocol"]].metrics:
            problems.append(f"{where}: metric {r['metric']!r} is not one of protocol {r['protocol']}'s "
                            f"{protocols.PROTOCOLS[r['protocol']].metrics}")
        if r["direction"] not in retrieval.DIRECTIONS:
            problems.append(f"{where}: direction {r['direction']!r} not in {retrieval.DIRECTIONS}")
        if r["unit"] not in UNITS:
            problems.append(f"{where}: unit {r['unit']!r} not in {sorted(UNITS)}")
        elif not 0 <= float(r["value"]) * UNITS[r["unit"]] <= 1:
            problems.append(f"{where}: value {r['value']} outside 0-100%")
    key = ["model", "eval_set", "protocol", "direction", "metric", "k"]
    dup = df.duplicated(key)
    if dup.any():
        problems.append(f"duplicate rows {[i + 2 for i in df.index[dup]]}")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return df.assign(proportion=df["value"].astype(float) * df["unit"].map(UNITS))


def beside_ours(results: pd.DataFrame, eval_set: str, published: pd.DataFrame | None = None,
                query_class: str = "all", decimals: int = 1) -> dict[tuple[str, str], pd.DataFrame]:
    """``{(protocol, direction): table}``: our models (value [CI]) and the published ones (value, source)
    on ``eval_set``, for every (protocol, direction, metric, k) both hold. Empty when nothing matches."""
    from cxrlib import report

    pub = load_published() if published is None else published
    pub = pub[pub["eval_set"] == eval_set]
    out = {}
    for (protocol, direction), p in pub.groupby(["protocol", "direction"], sort=False):
        ours = results[(results["protocol"] == protocol) & (results["direction"] == direction)
                       & (results["query_class"] == query_class) & results["value"].notna()]
        cols = [(m, int(k)) for m, k in dict.fromkeys(zip(p["metric"], p["k"]))
                if ((ours["metric"] == m) & (ours["k"] == k)).any()]
        if not cols:
            continue
        label = {c: report.METRIC_LABELS.get(c[0], c[0]).format(k=c[1]) for c in cols}
        rows = []
        for model in dict.fromkeys(ours["model"]):
            row = {"Model": model, "Source": "this package"}
            for m, k in cols:
                hit = ours[(ours["model"] == model) & (ours["metric"] == m) & (ours["k"] == k)]
                row[label[(m, k)]] = (report.format_cell(m, hit["value"].iloc[0], hit["ci_low"].iloc[0],
                                                         hit["ci_high"].iloc[0], decimals) if len(hit) else "n/a")
            rows.append(row)
        for model, part in p.groupby("model", sort=False):
            row = {"Model": model, "Source": f"{part['source'].iloc[0].split(',')[0]}, {part['location'].iloc[0]}"}
            for m, k in cols:
                hit = part[(part["metric"] == m) & (part["k"] == k)]
                row[label[(m, k)]] = report.format_value(m, hit["proportion"].iloc[0], decimals) if len(hit) else "n/a"
            rows.append(row)
        out[(protocol, direction)] = pd.DataFrame(rows)
    return out
