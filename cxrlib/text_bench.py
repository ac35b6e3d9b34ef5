"""Report-side benchmarks of text towers: style robustness and error discrimination (Ko et al. 2025).

* **Style robustness, report -> report**: each test report rewritten in a style (:data:`cxrlib.variants.STYLES`)
  queries the gallery of original reports; identical reports are one gallery item (the package's
  ``merged`` gallery: one item per ``report_group``, its members' re-normalised mean embedding,
  :func:`cxrlib.retrieval.group_representatives`), so a hit is the query's own report text. R@1/5/10.
* **Style robustness, image -> report** (models with an image tower): R@K of image queries against the
  original reports and against the same gallery rewritten in a style; the ``drop`` rows are the paired
  difference original minus rewritten.
* **Error discrimination**: for each report, its equivalent rewrite and its single-error variants are
  ranked by similarity to the original; ``accuracy`` = the rewrite scores strictly above every error
  variant (a tie counts as a failure), and per error kind the rewrite above that kind's variant.

Every value carries a patient-bootstrap CI (:func:`cxrlib.stats.bootstrap_ci`); :func:`compare` gives
paired tests between two models on the same queries (:func:`cxrlib.stats.paired_test`). A rewrite that
changes nothing is not a query (counted in the ``note``). Texts embed through :mod:`cxrlib.embed`'s
cache (:func:`embed_texts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cxrlib import stats, variants

COLUMNS = ["model", "benchmark", "style", "direction", "metric", "kind", "k", "value", "ci_low", "ci_high",
           "n", "n_patients", "note"]
PAIRED_COLUMNS = ["model_a", "model_b", "benchmark", "style", "direction", "metric", "kind", "k", "value_a",
                  "value_b", "diff", "ci_low", "ci_high", "p_value", "n", "n_patients"]
ORIGINAL = "original"


# ---- the texts -----------------------------------------------------------------------------------

@dataclass
class VariantSets:
    """The texts a benchmark embeds, one row per study (``studies``) plus rewrites and error variants.

    ``rewrites[style]``: ``study_id, text, rules`` for the studies the style changed; ``equivalent``:
    the rewrite each study's error variants are ranked against; ``errors``: ``study_id, kind, text, detail``.
    """

    studies: pd.DataFrame
    rewrites: dict[str, pd.DataFrame]
    equivalent: pd.DataFrame
    errors: pd.DataFrame
    unchanged: dict[str, int] = field(default_factory=dict)

    def texts(self) -> pd.DataFrame:
        """Every text with a unique id (``orig|s``, ``style:<name>|s``, ``err:<kind>|s``, ``equiv|s``)."""
        parts = [pd.DataFrame({"id": "orig|" + self.studies["study_id"], "text": self.studies["text"]})]
        for style, df in self.rewrites.items():
            parts.append(pd.DataFrame({"id": f"style:{style}|" + df["study_id"], "text": df["text"]}))
        parts.append(pd.DataFrame({"id": "equiv|" + self.equivalent["study_id"], "text": self.equivalent["text"]}))
        parts.append(pd.DataFrame({"id": "err:" + self.errors["kind"] + "|" + self.errors["study_id"],
                                   "text": self.errors["text"]}))
        return pd.concat(parts, ignore_index=True)


def build_variant_sets(table: pd.DataFrame, styles: tuple[str, ...], seed: int = 0,
                       error_kinds: tuple[str, ...] | None = None,
                       equivalent_style: str = "reordered") -> VariantSets:
    """Rewrites and error variants of every study of ``table`` (one row per study), seeded per study."""
    from cxrlib.datasets.synthetic import stable_seed

    need = ["study_id", "patient_id", "findings", "impression", "report"]
    missing = [c for c in need if c not in table.columns]
    if missing:
        raise ValueError(f"study table lacks columns {missing}")
    rows = table.drop_duplicates("study_id").reset_index(drop=True)
    rows = rows[rows["report"].fillna("").str.strip() != ""].reset_index(drop=True)
    groups = rows["report_group"].to_numpy() if "report_group" in rows else pd.factorize(rows["report"])[0]
    studies = pd.DataFrame({"study_id": rows["study_id"].astype(str), "patient_id": rows["patient_id"].astype(str),
                            "report_group": groups, "text": rows["report"].astype(str)})
    reps = [variants.Report(str(f or ""), str(i or "")) for f, i in
            zip(rows["findings"].fillna(""), rows["impression"].fillna(""))]
    # the report text the table uses may be one section only: rewrite what the table embeds
    reps = [r if r.text() == t else variants.Report(t, "") for r, t in zip(reps, studies["text"])]
    seeds = [stable_seed(seed, s) for s in studies["study_id"]]
    rewrites, unchanged = {}, {}
    for style in styles:
        out = []
        for sid, rep, s, text in zip(studies["study_id"], reps, seeds, studies["text"]):
            v = variants.rewrite(rep, style, s)
            if v.text and v.text != text:
                out.append((sid, v.text, ",".join(v.rules)))
        rewrites[style] = pd.DataFrame(out, columns=["study_id", "text", "rules"])
        unchanged[style] = len(studies) - len(out)
    equiv, errs = [], []
    for sid, rep, s, text in zip(studies["study_id"], reps, seeds, studies["text"]):
        e = variants.rewrite(rep, equivalent_style, s)
        if not e.text or e.text == text:
            continue
        found = variants.error_variants(rep, s, error_kinds)
        if not found:
            continue
        equiv.append((sid, e.text))
        errs += [(sid, x.kind, x.text, x.detail) for x in found]
    return VariantSets(studies, rewrites, pd.DataFrame(equiv, columns=["study_id", "text"]),
                       pd.DataFrame(errs, columns=["study_id", "kind", "text", "detail"]), unchanged)


def embed_texts(backbone, texts: pd.DataFrame, out_dir: str | os.PathLike, batch_size: int = 64,
                device: str = "cpu", precision: str = "fp32", progress: bool = True) -> dict[str, np.ndarray]:
    """``{id: L2-normalised embedding}`` of ``texts`` (``id, text``) through :mod:`cxrlib.embed`'s cache."""
    from cxrlib.embed import extract_embeddings
    from cxrlib.embstore import load_embeddings

    table = pd.DataFrame({"study_id": texts["id"].astype(str), "report": texts["text"].astype(str)})
    res = extract_embeddings(table, backbone, out_dir, modalities=("text",), batch_size=batch_size, device=device,
                             precision=precision, progress=progress)
    if res.skipped["text"]:
        raise ValueError(f"texts could not be embedded: {res.skipped['text'][:3]}")
    emb = load_embeddings(res["text"])
    return dict(zip(emb.ids, emb.emb))


# ---- per-query scores ----------------------------------------------------------------------------

Key = tuple  # (benchmark, style, direction, metric, kind, k)


@dataclass
class BenchScores:
    """Per-query values of one model: ``values[key] = (study_ids, values)`` (values 0/1)."""

    model: str
    values: dict[Key, tuple[np.ndarray, np.ndarray]]
    patients: dict[str, str]
    notes: dict[Key, str] = field(default_factory=dict)


def _stack(emb: dict[str, np.ndarray], ids) -> np.ndarray:
    missing = [i for i in ids if i not in emb]
    if missing:
        raise KeyError(f"no embedding for {missing[:3]} ({len(missing)} missing)")
    return np.stack([emb[i] for i in ids]).astype(np.float32)


def _group_ranks(queries: np.ndarray, q_groups: np.ndarray, gallery: np.ndarray, g_groups: np.ndarray) -> np.ndarray:
    """1-based rank of the query's group in the gallery (ties by gallery index, as everywhere)."""
    from cxrlib.retrieval import scan_metrics

    qg, gg = torch.as_tensor(np.array(q_groups)), torch.as_tensor(np.array(g_groups))
    rel = {"group": (lambda s, e: qg[s:e, None] == gg[None, :], {"rank"})}
    return scan_metrics(queries, gallery, rel, ks=(1,))[("group", "rank", 0)]


def style_scores(sets: VariantSets, emb: dict[str, np.ndarray], model: str, ks=(1, 5, 10),
                 image_emb: dict[str, np.ndarray] | None = None) -> BenchScores:
    """Report->report (every style) and, with ``image_emb`` (study_id -> image embedding in the text
    space), image->report on the original and on each rewritten gallery."""
    from cxrlib.retrieval import group_representatives

    st = sets.studies
    groups = st["report_group"].to_numpy()
    # merged gallery: one item per report group, its members' mean embedding (row-order invariant)
    gal, gal_groups = group_representatives(_stack(emb, "orig|" + st["study_id"]), groups)
    values: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    notes: dict[Key, str] = {}
    group_of = dict(zip(st["study_id"], st["report_group"]))
    for style, df in sets.rewrites.items():
        if df.empty:
            continue
        q = _stack(emb, f"style:{style}|" + df["study_id"])
        ranks = _group_ranks(q, df["study_id"].map(group_of).to_numpy(), gal, gal_groups)
        for k in ks:
            key = ("style_robustness", style, "report_to_report", "recall", "", k)
            values[key] = (df["study_id"].to_numpy(), (ranks <= k).astype(float))
            if sets.unchanged.get(style):
                notes[key] = f"{sets.unchanged[style]} reports the style leaves unchanged are not queries"
    if image_emb is not None:
        have = st[st["study_id"].isin(image_emb)]
        qi = _stack(image_emb, have["study_id"])
        qgroups = have["report_group"].to_numpy()
        galleries = {ORIGINAL: gal}
        for style, df in sets.rewrites.items():
            rewritten = dict(zip(df["study_id"], df["text"]))
            ids = [f"style:{style}|{s}" if s in rewritten else f"orig|{s}" for s in st["study_id"]]
            galleries[style] = group_representatives(_stack(emb, ids), groups)[0]
        for style, g in galleries.items():
            ranks = _group_ranks(qi, qgroups, g, gal_groups)
            for k in ks:
                values[("style_robustness", style, "image_to_report", "recall", "", k)] = (
                    have["study_id"].to_numpy(), (ranks <= k).astype(float))
    return BenchScores(model, values, dict(zip(st["study_id"], st["patient_id"])), notes)


def error_scores(sets: VariantSets, emb: dict[str, np.ndarray], model: str) -> BenchScores:
    """Error discrimination: overall accuracy and per error kind (see the module docstring)."""
    st = sets.studies
    eq = sets.equivalent
    values: dict[Key, tuple[np.ndarray, np.ndarray]] = {}
    if eq.empty:
        return BenchScores(model, values, dict(zip(st["study_id"], st["patient_id"])))
    orig = _stack(emb, "orig|" + eq["study_id"])
    s_eq = np.sum(orig * _stack(emb, "equiv|" + eq["study_id"]), axis=1)
    pos = {s: i for i, s in enumerate(eq["study_id"])}
    worst = np.full(len(eq), -np.inf)
    for kind, df in sets.errors.groupby("kind", sort=True):
        rows = df["study_id"].map(pos).to_numpy()
        s_err = np.sum(orig[rows] * _stack(emb, f"err:{kind}|" + df["study_id"]), axis=1)
        worst[rows] = np.maximum(worst[rows], s_err)
        values[("error_discrimination", "", "report_to_report", "accuracy", kind, 0)] = (
            df["study_id"].to_numpy(), (s_eq[rows] > s_err).astype(float))
    values[("error_discrimination", "", "report_to_report", "accuracy", "all", 0)] = (
        eq["study_id"].to_numpy(), (s_eq > worst).astype(float))
    return BenchScores(model, values, dict(zip(st["study_id"], st["patient_id"])))


def merge_scores(*scores: BenchScores) -> BenchScores:
    out = BenchScores(scores[0].model, {}, {}, {})
    for s in scores:
        if s.model != out.model:
            raise ValueError(f"cannot merge scores of models {out.model!r} and {s.model!r}")
        out.values.update(s.values)
        out.patients.update(s.patients)
        out.notes.update(s.notes)
    return out


# ---- tables --------------------------------------------------------------------------------------

def summarise(scores: BenchScores, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy rows (:data:`COLUMNS`) with patient-bootstrap CIs."""
    rows = []
    for key, (ids, vals) in scores.values.items():
        bench, style, direction, metric, kind, k = key
        iv = stats.bootstrap_ci(vals, [scores.patients[i] for i in ids], n_boot, seed)
        rows.append(dict(model=scores.model, benchmark=bench, style=style, direction=direction, metric=metric,
                         kind=kind, k=k or pd.NA, value=iv.value, ci_low=iv.ci_low, ci_high=iv.ci_high, n=iv.n,
                         n_patients=iv.n_clusters, note=scores.notes.get(key, "")))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["k"] = df["k"].astype("Int64")
    return df.sort_values(["model", "benchmark", "direction", "style", "kind", "k"], ignore_index=True)


def style_drop(scores: BenchScores, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Image->report R@K on the original gallery minus on each rewritten gallery (paired, same queries)."""
    rows = []
    for key, (ids, orig) in scores.values.items():
        bench, style, direction, metric, kind, k = key
        if direction != "image_to_report" or style != ORIGINAL:
            continue
        for (_, s2, d2, m2, _, k2), (_, vals) in scores.values.items():
            if d2 != direction or s2 == ORIGINAL or k2 != k or m2 != metric:
                continue
            r = stats.paired_test(orig, vals, [scores.patients[i] for i in ids], n_boot, n_perm, seed)
            rows.append(dict(model_a=scores.model, model_b=scores.model, benchmark="style_drop", style=s2,
                             direction=direction, metric=metric, kind="original - rewritten", k=k, value_a=r.value_a,
                             value_b=r.value_b, diff=r.diff, ci_low=r.ci_low, ci_high=r.ci_high, p_value=r.p_value,
                             n=r.n, n_patients=r.n_clusters))
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def compare(a: BenchScores, b: BenchScores, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0) -> pd.DataFrame:
    """Paired tests of model ``a`` minus ``b`` on every query set both were scored on."""
    rows = []
    for key, (ids, va) in a.values.items():
        if key not in b.values:
            continue
        ids_b, vb = b.values[key]
        if not np.array_equal(ids, ids_b):
            raise ValueError(f"models {a.model!r} and {b.model!r} were scored on different queries for {key}")
        bench, style, direction, metric, kind, k = key
        r = stats.paired_test(va, vb, [a.patients[i] for i in ids], n_boot, n_perm, seed)
        rows.append(dict(model_a=a.model, model_b=b.model, benchmark=bench, style=style, direction=direction,
                         metric=metric, kind=kind, k=k or pd.NA, value_a=r.value_a, value_b=r.value_b, diff=r.diff,
                         ci_low=r.ci_low, ci_high=r.ci_high, p_value=r.p_value, n=r.n, n_patients=r.n_clusters))
    df = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    df["k"] = df["k"].astype("Int64")
    return df


def style_table(df: pd.DataFrame, direction: str = "report_to_report") -> pd.DataFrame:
    """Wide table: a row per model, a column per (style, R@k), cells ``value [ci]`` in percent."""
    from cxrlib.report import format_cell

    part = df[(df["benchmark"] == "style_robustness") & (df["direction"] == direction)]
    if part.empty:
        return pd.DataFrame()
    out = {}
    for (model, style, k), r in part.set_index(["model", "style", "k"]).sort_index().iterrows():
        out.setdefault(model, {})[f"{style} R@{k}"] = format_cell("recall", r["value"], r["ci_low"], r["ci_high"])
    styles = [ORIGINAL] * (ORIGINAL in set(part["style"])) + sorted(set(part["style"]) - {ORIGINAL})
    cols = [c for s in styles for c in sorted({c for v in out.values() for c in v if c.startswith(f"{s} R@")},
                                                key=lambda c: int(c.rsplit("@", 1)[1]))]
    table = pd.DataFrame.from_dict(out, orient="index")[cols].reset_index(names="Model")
    return table


def error_table(df: pd.DataFrame) -> pd.DataFrame:
    """Wide table: a row per model, overall accuracy then one column per error kind (percent, CI)."""
    from cxrlib.report import format_cell

    part = df[df["benchmark"] == "error_discrimination"]
    if part.empty:
        return pd.DataFrame()
    kinds = ["all"] + sorted(set(part["kind"]) - {"all"})
    out = {m: {("overall" if k == "all" else k): format_cell("recall", r["value"], r["ci_low"], r["ci_high"])
               for k, r in g.set_index("kind").iterrows()} for m, g in part.groupby("model", sort=False)}
    cols = ["overall" if k == "all" else k for k in kinds]
    counts = part.drop_duplicates("kind").set_index("kind")["n"]
    table = pd.DataFrame.from_dict(out, orient="index").reindex(columns=cols).fillna("n/a")
    table.columns = [f"{c} (n={int(counts['all' if c == 'overall' else c])})" for c in cols]
    return table.reset_index(names="Model")


def render_markdown(df: pd.DataFrame, paired: pd.DataFrame | None = None, subtitle: str = "") -> str:
    """The report-side tables as Markdown (every number formatted from ``df`` / ``paired``)."""
    from cxrlib.report import format_cell, format_p, to_markdown

    parts = [f"_{subtitle}_\n"] if subtitle else []
    parts += ["### Style robustness: report -> report (rewritten queries, original gallery; identical reports "
              "one item), R@K % [95% patient-bootstrap CI]\n", to_markdown(style_table(df, "report_to_report"))]
    img = style_table(df, "image_to_report")
    if not img.empty:
        parts += ["### Style robustness: image -> report (original vs rewritten gallery), R@K %\n", to_markdown(img)]
    parts += ["### Error discrimination: equivalent rewrite ranked above the error variant(s), accuracy %\n",
              to_markdown(error_table(df))]
    if paired is not None and not paired.empty:
        p = paired.copy()
        p["Comparison"] = p["model_a"] + " vs " + p["model_b"]
        p["Metric"] = p.apply(lambda r: f"{r['benchmark']} {r['direction']} {r['style'] or r['kind']} "
                                        f"{r['metric']}{'@' + str(r['k']) if pd.notna(r['k']) and r['k'] else ''}",
                              axis=1)
        p["diff [CI]"] = [format_cell("recall", d, lo, hi) for d, lo, hi in zip(p["diff"], p["ci_low"], p["ci_high"])]
        p["p"] = p["p_value"].map(format_p)
        parts += ["### Paired tests (difference in percentage points, patient sign-flip p)\n",
                  to_markdown(p[["Comparison", "Metric", "diff [CI]", "p", "n"]])]
    return "\n".join(parts)


def write_results(df: pd.DataFrame, paired: pd.DataFrame, out_dir: str | os.PathLike, subtitle: str = "",
                  stem: str = "text_bench") -> list[Path]:
    """``<stem>.csv``, ``<stem>_paired.csv`` and ``<stem>.md`` in ``out_dir``, atomically."""
    from cxrlib.io import atomic_path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, frame in ((f"{stem}.csv", df), (f"{stem}_paired.csv", paired)):
        with atomic_path(out_dir / name, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
        written.append(out_dir / name)
    with atomic_path(out_dir / f"{stem}.md", suffix=".md") as tmp:
        Path(tmp).write_text(render_markdown(df, paired, subtitle))
    written.append(out_dir / f"{stem}.md")
    return written


def plot_text_bench(df: pd.DataFrame, k: int = 10):
    """Two panels: report->report R@k per style, error-discrimination accuracy per kind (CIs as bars)."""
    import matplotlib.pyplot as plt

    from cxrlib.plots import apply_style, model_color

    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    panels = [(df[(df["benchmark"] == "style_robustness") & (df["direction"] == "report_to_report")
                  & (df["k"] == k)], "style", f"report -> report R@{k} (%)"),
              (df[df["benchmark"] == "error_discrimination"], "kind", "error discrimination accuracy (%)")]
    for ax, (part, col, title) in zip(axes, panels):
        cats = sorted(set(part[col]))
        models = list(dict.fromkeys(part["model"]))
        width = 0.8 / max(len(models), 1)
        for j, m in enumerate(models):
            g = part[part["model"] == m].set_index(col).reindex(cats)
            x = np.arange(len(cats)) + (j - (len(models) - 1) / 2) * width
            err = np.vstack([g["value"] - g["ci_low"], g["ci_high"] - g["value"]]) * 100
            ax.bar(x, g["value"] * 100, width, yerr=np.nan_to_num(err), label=m, color=model_color(m), capsize=2)
        ax.set_xticks(np.arange(len(cats)), cats, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylim(0, 100)
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
