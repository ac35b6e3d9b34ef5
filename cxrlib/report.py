r"""Render the tidy retrieval results (``retrieval.csv``, ``paired_tests.csv``) as Markdown and LaTeX tables.

Every number in a table is formatted from the CSV here; nothing is typed by hand. Proportions
(recall, precision, hit rate, MRR, mAP, nDCG) are shown in percent, median rank as a rank; each cell is
``value [ci_low, ci_high]`` (95% patient-bootstrap CI). Every table names its retrieval protocol
(:mod:`cxrlib.protocols`) and the peer code it follows, and carries a chance row (a random ranking of
the same gallery). LaTeX tables are one per protocol and direction, scaled to the text width
(``\resizebox``; they need the ``booktabs`` and ``graphicx`` packages).
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
    "bertscore": "BERTScore@{k}", "chexbert_f1": "F1-CheXbert-14@{k}", "chexbert_f1_5": "F1-CheXbert-5@{k}",
    "radgraph_f1": "RadGraph-F1@{k}",
}
#: metrics shown as they are (not in percent)
RAW_METRICS = {"median_rank"}
#: columns aligned left (all others hold numbers and align right)
TEXT_COLUMNS = ("Model", "Direction", "Comparison", "Gallery", "Metric", "Source", "Protocol")
#: the model column of the chance row of each table
CHANCE_ROW = "chance (random ranking)"
DIRECTION_LABELS = {"image_to_text": "image-to-report", "text_to_image": "report-to-image"}


@dataclass(frozen=True)
class Section:
    """One table: which protocol, which of its metrics, for which query classes."""

    protocol: str
    title: str
    metrics: tuple[str, ...]
    classes: tuple[str, ...] = ("all",)
    ks: tuple[int, ...] | None = None  # None: every k in the results


SECTIONS = (
    Section("strict", "Exact pair (strict: only the study's own report/image is a hit)",
            ("recall", "mrr", "median_rank")),
    Section("unique_text", "Unique report texts (unique_text: the gallery holds each report string once)",
            ("recall", "mrr", "median_rank")),
    Section("duplicate_positive", "Identical reports are hits (duplicate_positive: canonicalised text equal)",
            ("recall", "mrr", "median_rank")),
    Section("label_match", "Label match (label_match: relevant = same normal/abnormal label)",
            ("label_precision", "label_hit", "label_map")),
    Section("label_match", "Label match per query class", ("label_precision", "label_map"),
            classes=("normal", "abnormal")),
    Section("label_match_class", "One-hot class match (label_match_class: relevant = same 5x200 class)",
            ("class_precision", "class_hit", "class_map")),
    Section("finding_overlap", "Finding overlap (finding_overlap: relevant = shares a positive finding)",
            ("finding_precision", "finding_hit", "finding_map")),
    Section("graded", "Graded relevance (graded: nDCG with Jaccard gains of finding labels; label-F1)",
            ("ndcg", "label_f1")),
    Section("graded", "Report similarity of the retrieved reports (graded: cxrlib.report_metrics, where their "
            "weights are present)", ("bertscore", "chexbert_f1", "chexbert_f1_5", "radgraph_f1")),
)

#: (gallery, metric) -> protocol, for results written before the ``protocol`` column existed
LEGACY_PROTOCOL = {("raw", m): "strict" for m in ("recall", "mrr", "median_rank")} | {
    ("merged", m): "unique_text" for m in ("recall", "mrr", "median_rank")} | {
    ("raw", f"{p}_{m}"): {"label": "label_match", "finding": "finding_overlap"}[p]
    for p in ("label", "finding") for m in ("precision", "hit", "map")}


def with_protocol(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with a ``protocol`` column (derived from gallery and metric where it is missing)."""
    if "protocol" in df.columns:
        return df
    out = df.copy()
    out.insert(2, "protocol", [LEGACY_PROTOCOL.get((g, m), "") for g, m in zip(df["gallery"], df["metric"])])
    return out


def follows(protocol: str) -> str:
    """The peer code a protocol follows (empty for an unknown name)."""
    from cxrlib.protocols import PROTOCOLS

    return PROTOCOLS[protocol].follows if protocol in PROTOCOLS else ""


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


def _match_k(part: pd.DataFrame, k) -> pd.Series:
    return (part["k"] == k) if not pd.isna(k) else part["k"].isna()


#: the columns of the tidy results (``retrieval.COLUMNS``) a table is rendered from
TABLE_COLUMNS = ("model", "direction", "query_class", "metric", "k", "value", "ci_low", "ci_high", "n")


def wide_table(df: pd.DataFrame, section: Section, decimals: int = 1,
               directions: tuple[str, ...] = tuple(DIRECTION_LABELS)) -> pd.DataFrame:
    """One row per (model, direction) and a chance row per direction; one column per metric@k (and class).

    Models keep their order of first appearance in ``df``. Empty when no row matches (or every value of
    the section is missing, e.g. a protocol skipped on this evaluation set). A results table without one
    of :data:`TABLE_COLUMNS` (or without both ``protocol`` and ``gallery``) is a ValueError naming them.
    """
    missing = [c for c in TABLE_COLUMNS if c not in df.columns]
    if "protocol" not in df.columns and "gallery" not in df.columns:
        missing.append("protocol (or gallery)")
    if missing:
        raise ValueError(f"results table lacks column(s) {missing} (has {list(df.columns)}); expected the "
                         f"tidy columns of cxrlib.retrieval.evaluate_pairs")
    df = with_protocol(df)
    sel = df[df["metric"].isin(section.metrics) & (df["protocol"] == section.protocol)
             & df["query_class"].isin(section.classes) & df["direction"].isin(directions)]
    if section.ks is not None:
        sel = sel[sel["k"].isna() | sel["k"].isin(section.ks)]
    if sel.empty or sel["value"].isna().all():
        return pd.DataFrame()
    models = list(dict.fromkeys(df["model"]))
    columns: dict[str, tuple] = {}
    for metric in section.metrics:
        for cls in section.classes:
            sub = sel[(sel["metric"] == metric) & (sel["query_class"] == cls)]
            if sub.empty or sub["value"].isna().all() and sub["k"].isna().all():
                continue
            for k in sorted(sub["k"].dropna().unique()) or [pd.NA]:
                columns[_column_label(metric, k, cls, section.classes)] = (metric, k, cls)
    rows = []
    has_chance = "chance" in sel.columns and sel["chance"].notna().any()
    for direction in DIRECTION_LABELS:
        if direction not in directions:
            continue
        for model in models:
            part = sel[(sel["model"] == model) & (sel["direction"] == direction)]
            if part.empty:
                continue
            row = {"Model": model, "Direction": DIRECTION_LABELS[direction]}
            for cls in section.classes:  # queries used (the largest count over the section's metrics)
                n = part.loc[part["query_class"] == cls, "n"]
                row[f"n {cls}" if len(section.classes) > 1 else "n"] = int(n.max()) if len(n) else 0
            for label, (metric, k, cls) in columns.items():
                hit = part[(part["metric"] == metric) & (part["query_class"] == cls) & _match_k(part, k)]
                row[label] = (format_cell(metric, hit["value"].iloc[0], hit["ci_low"].iloc[0],
                                          hit["ci_high"].iloc[0], decimals) if len(hit) else "n/a")
            rows.append(row)
        part = sel[sel["direction"] == direction]
        if has_chance and not part.empty:  # chance does not depend on the model: the first model's rows
            part = part[part["model"] == part["model"].iloc[0]]
            row = {"Model": CHANCE_ROW, "Direction": DIRECTION_LABELS[direction]}
            for cls in section.classes:
                row[f"n {cls}" if len(section.classes) > 1 else "n"] = ""
            for label, (metric, k, cls) in columns.items():
                hit = part[(part["metric"] == metric) & (part["query_class"] == cls) & _match_k(part, k)]
                row[label] = format_value(metric, hit["chance"].iloc[0], decimals) if len(hit) else "n/a"
            rows.append(row)
    return pd.DataFrame(rows)


def comparison_table(paired: pd.DataFrame, metrics: tuple[str, ...] | None = None, query_class: str = "all",
                     decimals: int = 1) -> pd.DataFrame:
    """Paired tests as a table: model A vs B, protocol, direction, metric, both values, difference [CI], p.

    ``metrics`` (default: all) filters; each row names its protocol, so metrics with the same short
    label under different protocols (P@5 of label_match and of finding_overlap) stay distinct.
    """
    paired = with_protocol(paired)
    sel = paired[paired["query_class"] == query_class]
    if metrics is not None:
        sel = sel[sel["metric"].isin(metrics)]
    rows = []
    for _, r in sel.iterrows():
        rows.append({
            "Comparison": f"{r['model_a']} vs {r['model_b']}",
            "Protocol": r["protocol"],
            "Direction": DIRECTION_LABELS.get(r["direction"], r["direction"]),
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


#: LaTeX's special characters in text -> their escaped forms
_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (captions: protocol names hold underscores)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: pd.DataFrame, caption: str, label: str) -> str:
    r"""A booktabs ``table`` environment (pandas Styler), text escaped for LaTeX, the tabular scaled to
    the text width (``\resizebox{\linewidth}{!}``, graphicx) so it never overflows the page."""
    if table.empty:
        return f"% {caption}: no rows\n"
    styler = table.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    align = "".join("l" if c in TEXT_COLUMNS else "r" for c in table.columns)
    latex = styler.to_latex(hrules=True, caption=latex_escape(caption), label=label,
                            position="htbp", column_format=align)
    # pandas leaves < and > alone; in LaTeX text they print as other glyphs (e.g. p-values "<0.001")
    latex = latex.replace("<", "$<$").replace(">", "$>$")
    latex = latex.replace(r"\begin{tabular}", r"\resizebox{\linewidth}{!}{%" + "\n" + r"\begin{tabular}", 1)
    return latex.replace(r"\end{tabular}", r"\end{tabular}%" + "\n}", 1)


@dataclass
class Rendered:
    markdown: str
    latex: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)


def protocol_notes(df: pd.DataFrame) -> list[str]:
    """One line per protocol summarising its notes: queries excluded (no relevant item), skipped k,
    a protocol skipped on this evaluation set, CIs missing; each distinct note once, with its count."""
    df = with_protocol(df)
    out = []
    notes = df["note"].fillna("").astype(str)
    for protocol, part in df.groupby("protocol", sort=False):
        texts = notes.loc[part.index]
        excl = part["n_excluded"].fillna(0).astype(int) if "n_excluded" in part else pd.Series(0, index=part.index)
        items = []
        if (excl > 0).any():
            items.append(f"queries without a relevant item excluded in {int((excl > 0).sum())} of {len(part)} "
                         f"rows (at most {int(excl.max())} queries of a row)")
        other = [t for note in texts for t in note.split("; ")
                 if t and not t.endswith("queries without a relevant item excluded")]
        for text, count in pd.Series(other, dtype=object).value_counts(sort=False).items():
            items.append(f"{text} ({count} rows)" if count > 1 else text)
        if items:
            out.append(f"**{protocol or 'unnamed'}**: " + "; ".join(items))
    return out


def _paired_sections(paired: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """(protocol, direction, rows) groups of the paired tests, in order of appearance."""
    paired = with_protocol(paired)
    return [(p, d, part) for (p, d), part in paired.groupby(["protocol", "direction"], sort=False)]


def render_results(df: pd.DataFrame, paired: pd.DataFrame | None = None, subtitle: str = "",
                   sections: tuple[Section, ...] = SECTIONS, decimals: int = 1, eval_set: str | None = None
                   ) -> Rendered:
    """Markdown and LaTeX documents: per section a table (one LaTeX table per direction), the paired tests
    per protocol and direction, published numbers on the same ``eval_set`` and protocol (when given),
    and one note line per protocol. Sections without values are left out."""
    df = with_protocol(df)
    intro = ("Values in percent (median rank as a rank) with 95% bootstrap CIs resampling patients; "
             "n = queries; the chance row is the expected value of a random ranking of the same gallery.")
    md = ["# Retrieval results", ""] + ([f"_{subtitle}_", ""] if subtitle else [])
    md += ([f"Evaluation set: `{eval_set}`.", ""] if eval_set else []) + [intro, ""]
    tex = [f"% generated by cxrlib.report from retrieval.csv; {subtitle}".rstrip("; "),
           r"% needs \usepackage{booktabs} and \usepackage{graphicx}"]
    tables = {}
    for i, sec in enumerate(sections):
        t = wide_table(df, sec, decimals)
        if t.empty:
            continue
        tables[sec.title] = t
        src = follows(sec.protocol)
        md += [f"## {sec.title}", ""] + ([f"_Protocol `{sec.protocol}`; follows {src}._", ""] if src else [])
        md.append(to_markdown(t))
        for direction, label in DIRECTION_LABELS.items():
            part = t[t["Direction"] == label].drop(columns="Direction")
            if not part.empty:
                tex.append(to_latex(part, f"{sec.title}, {label}. {intro}", f"tab:retrieval-{i}-{direction}"))
    if eval_set:
        from cxrlib import baselines

        beside = baselines.beside_ours(df, eval_set, decimals=decimals)
        title = "Published numbers beside ours (same evaluation set, protocol and direction)"
        if beside:
            md += [f"## {title}", "", "_Published values as their papers report them (no CI); sources and "
                   "what was verified: `cxrlib/data/published_baselines.csv`._", ""]
            for (protocol, direction), t in beside.items():
                label = DIRECTION_LABELS.get(direction, direction)
                tables[f"Published: {protocol}, {direction}"] = t
                md += [f"### {protocol}, {label}", "", to_markdown(t)]
                tex.append(to_latex(t, f"{title}: {protocol}, {label}", f"tab:published-{protocol}-{direction}"))
        else:
            md += [f"_No published number in cxrlib/data/published_baselines.csv matches evaluation set "
                   f"`{eval_set}` under these protocols._", ""]
    if paired is not None and not paired.empty:
        title = "Paired comparison (same queries; bootstrap CI of the difference, patient sign-flip p-value)"
        md += [f"## {title}", ""]
        for protocol, direction, part in _paired_sections(paired):
            t = comparison_table(part, decimals=decimals)
            if t.empty:
                continue
            label = DIRECTION_LABELS.get(direction, direction)
            tables[f"Paired comparison: {protocol}, {direction}"] = t
            md += [f"### {protocol}, {label}", "", to_markdown(t.drop(columns=["Protocol", "Direction"]))]
            tex.append(to_latex(t.drop(columns=["Protocol", "Direction"]), f"{title}: protocol {protocol}, {label}",
                                f"tab:paired-{protocol}-{direction}"))
    notes = protocol_notes(df)
    if notes:
        md += ["## Notes (one line per protocol)", ""] + [f"- {n}" for n in notes] + [""]
    return Rendered("\n".join(md), "\n".join(tex) + "\n", tables)


def write_tables(df: pd.DataFrame, out_dir: str | os.PathLike, stem: str = "retrieval",
                 paired: pd.DataFrame | None = None, subtitle: str = "", eval_set: str | None = None
                 ) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md``, ``<stem>.tex`` (and ``paired_tests.csv``) atomically."""
    out_dir = Path(out_dir)
    rendered = render_results(df, paired, subtitle, eval_set=eval_set)
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
