"""Render the tidy retrieval results (``retrieval.csv``, ``paired_tests.csv``) as Markdown and LaTeX tables.

Every number in a table is formatted from the CSV here; nothing is typed by hand. Proportions
(recall, precision, hit rate, MRR, mAP) are shown in percent, median rank as a rank; each cell is
``value [ci_low, ci_high]`` (95% patient-bootstrap CI).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cxrlib.io import atomic_path

#: metric -> column label ({k} filled in)
METRIC_LABELS = {
    "recall": "R@{k}", "mrr": "MRR", "median_rank": "MedR",
    "label_precision": "P@{k}", "label_hit": "Hit@{k}", "label_map": "mAP",
    "finding_precision": "P@{k}", "finding_hit": "Hit@{k}", "finding_map": "mAP",
    "class_precision": "P@{k}", "class_hit": "Hit@{k}", "class_map": "mAP",
    "ndcg": "nDCG@{k}", "label_f1": "label-F1@{k}",
}
#: metrics shown as they are (not in percent)
RAW_METRICS = {"median_rank"}
#: columns aligned left (all others hold numbers and align right)
TEXT_COLUMNS = ("Model", "Direction", "Comparison", "Gallery", "Metric")
DIRECTION_LABELS = {"image_to_text": "image-to-report", "text_to_image": "report-to-image"}


@dataclass(frozen=True)
class Section:
    """One table: which metrics, on which gallery, for which query classes."""

    title: str
    metrics: tuple[str, ...]
    gallery: str = "raw"
    classes: tuple[str, ...] = ("all",)
    ks: tuple[int, ...] | None = None  # None: every k in the results


SECTIONS = (
    Section("Exact pair, raw gallery (each study's report is its own item)", ("recall", "mrr", "median_rank")),
    Section("Exact pair, identical report texts merged (a hit is any identical report)",
            ("recall", "mrr", "median_rank"), gallery="merged"),
    Section("Label match (relevant = same normal/abnormal label)", ("label_precision", "label_hit", "label_map")),
    Section("Label match per query class", ("label_precision", "label_map"), classes=("normal", "abnormal")),
    Section("Finding overlap (relevant = shares a positive finding)", ("finding_precision", "finding_hit",
                                                                       "finding_map")),
)


def format_value(metric: str, value: float, decimals: int = 1) -> str:
    """Percent for proportions, plain for ranks; NaN -> ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or pd.isna(value):
        return "n/a"
    v = float(value) if metric in RAW_METRICS else 100.0 * float(value)
    return f"{v:.{decimals}f}"


def format_cell(metric: str, value: float, low: float, high: float, decimals: int = 1) -> str:
    """``value [low, high]``, or the value alone when the CI is missing."""
    text = format_value(metric, value, decimals)
    if text == "n/a" or pd.isna(low) or pd.isna(high):
        return text
    return f"{text} [{format_value(metric, low, decimals)}, {format_value(metric, high, decimals)}]"


def format_p(p: float) -> str:
    if pd.isna(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _column_label(metric: str, k, cls: str, classes: tuple[str, ...]) -> str:
    label = METRIC_LABELS.get(metric, metric).format(k="" if pd.isna(k) else int(k))
    return f"{label} {cls}" if len(classes) > 1 else label


def wide_table(df: pd.DataFrame, section: Section, decimals: int = 1) -> pd.DataFrame:
    """One row per (model, direction), one column per metric@k (and class); cells with CIs.

    Models keep their order of first appearance in ``df``. Empty when no row matches.
    """
    sel = df[df["metric"].isin(section.metrics) & (df["gallery"] == section.gallery)
             & df["query_class"].isin(section.classes)]
    if section.ks is not None:
        sel = sel[sel["k"].isna() | sel["k"].isin(section.ks)]
    if sel.empty:
        return pd.DataFrame()
    models = list(dict.fromkeys(df["model"]))
    columns: dict[str, tuple] = {}
    for metric in section.metrics:
        for cls in section.classes:
            sub = sel[(sel["metric"] == metric) & (sel["query_class"] == cls)]
            for k in sorted(sub["k"].dropna().unique()) or [pd.NA]:
                columns[_column_label(metric, k, cls, section.classes)] = (metric, k, cls)
    rows = []
    for model in models:
        for direction in DIRECTION_LABELS:
            part = sel[(sel["model"] == model) & (sel["direction"] == direction)]
            if part.empty:
                continue
            row = {"Model": model, "Direction": DIRECTION_LABELS[direction]}
            for cls in section.classes:  # queries used (the largest count over the section's metrics)
                n = part.loc[part["query_class"] == cls, "n"]
                row[f"n {cls}" if len(section.classes) > 1 else "n"] = int(n.max()) if len(n) else 0
            for label, (metric, k, cls) in columns.items():
                hit = part[(part["metric"] == metric) & (part["query_class"] == cls)
                           & ((part["k"] == k) if not pd.isna(k) else part["k"].isna())]
                row[label] = (format_cell(metric, hit["value"].iloc[0], hit["ci_low"].iloc[0],
                                          hit["ci_high"].iloc[0], decimals) if len(hit) else "n/a")
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(paired: pd.DataFrame, metrics: tuple[str, ...] = ("recall", "mrr", "label_precision",
                                                                       "label_map", "finding_precision"),
                     query_class: str = "all", decimals: int = 1) -> pd.DataFrame:
    """Paired tests as a table: model A vs B, direction, gallery, metric, both values, difference [CI], p."""
    sel = paired[paired["metric"].isin(metrics) & (paired["query_class"] == query_class)]
    rows = []
    for _, r in sel.iterrows():
        rows.append({
            "Comparison": f"{r['model_a']} vs {r['model_b']}",
            "Direction": DIRECTION_LABELS.get(r["direction"], r["direction"]),
            "Gallery": r["gallery"],
            "Metric": METRIC_LABELS.get(r["metric"], r["metric"]).format(k="" if pd.isna(r["k"]) else int(r["k"])),
            "A": format_value(r["metric"], r["value_a"], decimals),
            "B": format_value(r["metric"], r["value_b"], decimals),
            "A - B [95% CI]": format_cell(r["metric"], r["diff"], r["ci_low"], r["ci_high"], decimals),
            "p": format_p(r["p_value"]),
            "n": int(r["n"]),
        })
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table (pipes in cells escaped)."""
    if table.empty:
        return "_no rows_\n"
    def cell(x) -> str:
        return str(x).replace("|", "\\|")
    lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
             "|" + "|".join(":---" if c in TEXT_COLUMNS else "---:" for c in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    """A booktabs ``table`` environment (pandas Styler), text escaped for LaTeX."""
    if table.empty:
        return f"% {caption}: no rows\n"
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in table.columns)
    latex = styler.to_latex(hrules=True, caption=caption.replace("%", r"\%"), label=label,
                            position="htbp", column_format=align)
    # pandas leaves < and > alone; in LaTeX text they print as other glyphs (e.g. p-values "<0.001")
    return latex.replace("<", "$<$").replace(">", "$>$")


@dataclass
class Rendered:
    markdown: str
    latex: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def _notes(df: pd.DataFrame) -> list[str]:
    sel = df[df["note"].fillna("").astype(str).str.len() > 0]
    out = []
    for (model, direction, gallery, metric, cls, note), _ in sel.groupby(
            ["model", "direction", "gallery", "metric", "query_class", "note"], sort=False):
        out.append(f"{model}, {DIRECTION_LABELS.get(direction, direction)}, {gallery}, {metric}, {cls}: {note}")
    return out


def render_results(df: pd.DataFrame, paired: pd.DataFrame | None = None, subtitle: str = "",
                   sections: tuple[Section, ...] = SECTIONS, decimals: int = 1) -> Rendered:
    """Markdown and LaTeX documents with one table per section (sections without rows are left out)."""
    intro = ("Values in percent (median rank as a rank) with 95% bootstrap CIs resampling patients; "
             "n = queries.")
    md = ["# Retrieval results", ""] + ([f"_{subtitle}_", ""] if subtitle else []) + [intro, ""]
    tex = [f"% generated by cxrlib.report from retrieval.csv; {subtitle}".rstrip("; ")]
    tables = {}
    for i, sec in enumerate(sections):
        t = wide_table(df, sec, decimals)
        if t.empty:
            continue
        tables[sec.title] = t
        md += [f"## {sec.title}", "", to_markdown(t)]
        tex.append(to_latex(t, f"{sec.title}. {intro}", f"tab:retrieval-{i}"))
    if paired is not None and not paired.empty:
        t = comparison_table(paired, decimals=decimals)
        tables["Paired comparison"] = t
        title = "Paired comparison (same queries; bootstrap CI of the difference, patient sign-flip p-value)"
        md += [f"## {title}", "", to_markdown(t)]
        tex.append(to_latex(t, title, "tab:retrieval-paired"))
    notes = _notes(df)
    if notes:
        md += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return Rendered("\n".join(md), "\n".join(tex) + "\n", tables)


def write_tables(df: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "retrieval",
                 paired: pd.DataFrame | None = None, subtitle: str = "") -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md``, ``<stem>.tex`` (and ``paired_tests.csv``) atomically."""
    out_dir = Path(out_dir)
    rendered = render_results(df, paired, subtitle)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "tex": out_dir / f"{stem}.tex"}
    with atomic_path(paths["csv"]) as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(rendered.markdown)
    with atomic_path(paths["tex"]) as tmp:
        tmp.write_text(rendered.latex)
    if paired is not None:
        paths["paired"] = out_dir / "paired_tests.csv"
        with atomic_path(paths["paired"]) as tmp:
            paired.to_csv(tmp, index=False)
    return paths


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """Read a tidy results CSV back (``k`` as a nullable integer, notes as strings)."""
    df = pd.read_csv(path, keep_default_na=True)
    if "k" in df:
        df["k"] = df["k"].astype("Int64")
    if "note" in df:
        df["note"] = df["note"].fillna("").astype(str)
    return df
