"""One style for every figure: palette, fonts, and a saver that writes PNG + PDF atomically (and, in a
notebook, shows the PNG it wrote).

Every notebook calls :func:`apply_style` once and saves through :func:`save_figure`, so all
figures share colours (normal/abnormal, models, modalities) and land in ``figures/<profile>/``.
Plot functions for each stage live in the section below named after it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in {"", "agg"} else None
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from cxrlib import settings  # noqa: E402
from cxrlib.io import atomic_path  # noqa: E402

#: label colours, used for normal/abnormal everywhere
LABEL_COLORS = {"normal": "#4C72B0", "abnormal": "#DD8452", 0: "#4C72B0", 1: "#DD8452"}
#: modality colours and markers
MODALITY_COLORS = {"image": "#55A868", "text": "#8172B3"}
MODALITY_MARKERS = {"image": "o", "text": "^"}
#: a stable colour per model name (first come, first served from the colour-blind palette)
_MODEL_PALETTE = sns.color_palette("colorblind", 10)
_model_colors: dict[str, tuple] = {}
#: fixed label names for the binary label
LABEL_NAMES = {0: "normal", 1: "abnormal"}
#: zlib level of saved PNGs: lossless at every level; below PIL's default 6 encodes faster for slightly larger
#: files (every node saves its figures on each rerun, the galleries are megapixels)
PNG_COMPRESS_LEVEL = 3
#: distinct font subsets kept per process by :func:`cache_font_subsets`
FONT_SUBSET_CACHE_SIZE = 64
#: characters every embedded font subset holds besides a figure's own (where the font has them): printable
#: ASCII and the symbols figures here use, so that most figures of a process need the same subset
FONT_SUBSET_BASE_CHARS = "".join(map(chr, range(0x20, 0x7F))) + "\u2212\u00b7\u00d7\u2264\u2265\u00b1\u2013\u2014\u00b5\u00b2\u00b0\u2026\u2192\u2190\u2191\u2193\u2194\u00e9\u00f1\u00fc\u2019\u201c\u201d\u0394"


def cache_font_subsets() -> bool:
    """Subset each TrueType font (``pdf.fonttype`` 42) once per process for most figures.

    Every PDF embeds each font it uses as a subset made by fontTools, which parses and subsets the whole font
    file each time (most of a small figure's PDF time), and each figure asks for another glyph set. Here each
    set is widened to the font's glyphs for :data:`FONT_SUBSET_BASE_CHARS` before subsetting, and subsets are
    memoised per (font file, face, widened set): figures whose text stays within those characters share one
    subset. A figure's PDF depends only on the figure (not on what the process saved before); its fonts
    hold a few more glyphs than it draws. Installed once, on import; a matplotlib without these private hooks
    keeps its own subsetting (False)."""
    import contextlib
    import functools
    from io import BytesIO

    try:
        from fontTools.ttLib import TTFont
        from matplotlib.backends import _backend_pdf_ps as pdf_ps

        original, as_file, results = pdf_ps.get_glyphs_subset, pdf_ps.font_as_file, pdf_ps.SubsetResults
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_cxr_cached", False):
        return True

    @functools.lru_cache(maxsize=FONT_SUBSET_CACHE_SIZE)
    def base_glyphs(fontfile) -> frozenset:
        with TTFont(fontfile, fontNumber=getattr(fontfile, "face_index", 0), lazy=True) as font:
            cmap = font.getBestCmap() or {}  # code point -> glyph name, read from the cmap table only
            order = font.getReverseGlyphMap()
        return frozenset(order[cmap[c]] for c in map(ord, FONT_SUBSET_BASE_CHARS) if c in cmap)

    @functools.lru_cache(maxsize=FONT_SUBSET_CACHE_SIZE)
    def subset_bytes(fontfile, face_index: int, glyphs: frozenset) -> tuple[bytes, dict]:
        with original(fontfile, set(glyphs)) as sub:  # matplotlib's own subsetting of the widened set
            return as_file(sub.font).getvalue(), dict(sub.glyph_index_map)

    @contextlib.contextmanager
    def get_glyphs_subset(fontfile, glyphs):
        try:
            widened = frozenset(glyphs) | base_glyphs(fontfile)
        except Exception:  # noqa: BLE001 - a font whose cmap fontTools cannot read: matplotlib's own set
            widened = frozenset(glyphs)
        data, index_map = subset_bytes(fontfile, getattr(fontfile, "face_index", 0), widened)
        with TTFont(BytesIO(data)) as font:
            font._cxr_subset_bytes = data
            yield results(font, dict(index_map))

    def font_as_file(font):
        data = getattr(font, "_cxr_subset_bytes", None)
        return BytesIO(data) if data is not None else as_file(font)

    get_glyphs_subset._cxr_cached = True
    get_glyphs_subset.__wrapped__ = original
    font_as_file.__wrapped__ = as_file
    pdf_ps.get_glyphs_subset, pdf_ps.font_as_file = get_glyphs_subset, font_as_file
    return True


cache_font_subsets()


def apply_style() -> None:
    """Seaborn ticks theme, colour-blind palette, publication font sizes."""
    sns.set_theme(context="paper", style="ticks", palette="colorblind", font_scale=1.15)
    plt.rcParams.update({
        "figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight",
        "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
        "pdf.fonttype": 42, "ps.fonttype": 42,
    })


def model_color(name: str) -> tuple:
    """The colour of a model, the same in every figure of a run."""
    if name not in _model_colors:
        _model_colors[name] = _MODEL_PALETTE[len(_model_colors) % len(_MODEL_PALETTE)]
    return _model_colors[name]


def save_figure(fig: plt.Figure, stem: str, out_dir: str | Path, formats: tuple[str, ...] = ("png", "pdf"),
                subtitle: str | None = None) -> list[Path]:
    """Save ``fig`` as ``<out_dir>/<stem>.<fmt>`` for each format, atomically; returns the paths.

    ``subtitle`` (e.g. the offline-demo label) is stamped under the figure so a stand-in run is
    never mistaken for real data.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if subtitle:
        fig.text(0.5, -0.01, subtitle, ha="center", va="top", fontsize=8, color="0.35", style="italic")
    written = []
    for fmt in formats:
        target = out_dir / f"{stem}.{fmt}"
        with atomic_path(target, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, **({"pil_kwargs": {"compress_level": PNG_COMPRESS_LEVEL}} if fmt == "png" else {}))
        written.append(target)
    show_saved(fig, written)
    return written


def show_saved(fig: plt.Figure, written: list[Path]) -> bool:
    """In a notebook on matplotlib's inline backend: display the PNG just written and close ``fig``.

    Otherwise the backend renders the figure once more at the cell's end (after the PNG and the PDF, a third
    rendering of every figure, about a quarter of a node's figure time); the notebook now shows the saved
    file itself, at the size the inline figure had (``figure.dpi`` over ``savefig.dpi``). Anywhere else (a
    script, an interactive backend such as ipympl, no PNG written): nothing, and False."""
    png = next((p for p in written if p.suffix == ".png"), None)
    if png is None or "backend_inline" not in matplotlib.get_backend():
        return False
    from IPython.display import Image, display

    data = png.read_bytes()
    saved_dpi = plt.rcParams["savefig.dpi"]
    scale = fig.dpi / saved_dpi if isinstance(saved_dpi, (int, float)) else 1.0
    width = int.from_bytes(data[16:20], "big")  # the PNG header's IHDR width
    display(Image(data=data, format="png", width=round(width * scale)))
    plt.close(fig)
    return True


def _legend_below(ax, ncol: int = 2, fontsize: float = 7) -> None:
    """The axes' legend below its x label, outside the data area (a legend inside hides curves)."""
    ax.legend(fontsize=fontsize, ncol=ncol, loc="upper center", bbox_to_anchor=(0.5, -0.2), borderaxespad=0)


# --- 00 backbone adaptation ------------------------------------------------------------------

def plot_adaptation_curves(history, best_epoch: int | None = None) -> plt.Figure:
    """Notebook 00: loss per epoch (train solid, validation dashed, epoch 0 = before adaptation) and
    validation Recall@K (image→text solid, text→image dotted) with the kept epoch marked."""
    apply_style()
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = history[history["epoch"] > 0]
    colors = loss_term_colors()
    terms = [t for t in colors if t != "total" and f"val_{t}" in history]
    shown = {"total": colors["total"]} | ({t: colors[t] for t in terms} if len(terms) > 1 else {})
    for term, color in shown.items():
        for prefix, style, data in (("train", "-", trained), ("val", "--", history)):
            col = f"{prefix}_{'loss' if term == 'total' else term}"
            if col in data and data[col].notna().any():
                ax_loss.plot(data["epoch"], data[col], style, marker="o", markersize=2.5, color=color,
                             label=f"{term} ({prefix})")
    ax_loss.set(xlabel="epoch (0 = before adaptation)", ylabel="loss (total weighted, terms unweighted)",
                title="adaptation loss" + (f" ({terms[0]} only)" if len(terms) == 1 else ""))
    _legend_below(ax_loss)
    ks = sorted({int(c.split("@")[1]) for c in history.columns if c.startswith("val_i2t_R@")})
    palette = sns.color_palette("crest", max(len(ks), 1))
    for color, k in zip(palette, ks):
        ax_rec.plot(history["epoch"], history[f"val_i2t_R@{k}"], "-", marker="o", markersize=2.5, color=color,
                    label=f"image→text R@{k}")
        ax_rec.plot(history["epoch"], history[f"val_t2i_R@{k}"], ":", marker="^", markersize=2.5, color=color,
                    label=f"text→image R@{k}")
    if best_epoch is not None:
        ax_rec.axvline(best_epoch, color="0.5", lw=0.8, ls="--", label=f"kept epoch {best_epoch}")
    ax_rec.set(xlabel="epoch (0 = before adaptation)", ylabel="recall (identical reports count)",
               title="validation retrieval", ylim=(0, 1.02))
    _legend_below(ax_rec)
    for ax in (ax_loss, ax_rec):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


# --- 01 data prep ----------------------------------------------------------------------------

def plot_label_balance(table, finding_labels=None) -> plt.Figure:
    """Normal/abnormal studies per split (left) and finding prevalence among known labels (right)."""
    import pandas as pd

    from cxrlib.datasets.labels import FINDING_LABELS

    names = [n for n in (finding_labels or FINDING_LABELS) if n in table.columns and n != "No Finding"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1, 1.6]})
    order = [s for s in ("train", "val", "test") if s in set(table["split"])]
    counts = pd.crosstab(table["split"], table["label_abnormal"]).reindex(index=order, columns=[0, 1], fill_value=0)
    counts.columns = [LABEL_NAMES[c] for c in counts.columns]
    counts.plot.bar(ax=ax1, color=[LABEL_COLORS["normal"], LABEL_COLORS["abnormal"]], rot=0)
    for cont in ax1.containers:
        ax1.bar_label(cont, fontsize=8)
    ax1.set(xlabel="split", ylabel="studies", title="normal / abnormal per split")
    known = table[names].notna().sum()
    prev = (table[names] == 1).sum() / known.where(known > 0)
    prev = prev.fillna(0).sort_values()
    ax2.barh(prev.index, prev.values, color=LABEL_COLORS["abnormal"])
    for y, (name, v) in enumerate(prev.items()):
        ax2.text(v, y, f" {int((table[name] == 1).sum())}", va="center", fontsize=8)
    ax2.set(xlabel="fraction of studies with the finding (where known)", title="finding labels")
    fig.tight_layout()
    return fig


def plot_report_lengths(table) -> plt.Figure:
    """Words per report by label (left) and the sizes of identical-report groups (right)."""
    import numpy as np

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    words = table["report"].str.split().str.len()
    bins = np.histogram_bin_edges(words, bins=min(40, max(5, words.nunique())))
    for lab in (0, 1):
        w = words[table["label_abnormal"] == lab]
        if len(w):
            ax1.hist(w, bins=bins, alpha=0.65, color=LABEL_COLORS[lab], label=f"{LABEL_NAMES[lab]} (median {w.median():g})")
    ax1.set(xlabel="words per report", ylabel="studies", title="report length")
    ax1.legend()
    sizes = table.drop_duplicates("report_group")["report_dup_count"]
    dup_rows = int((table["report_dup_count"] > 1).sum())
    ax2.hist(sizes, bins=np.unique(np.geomspace(1, max(2, sizes.max()) + 1, 25).astype(int)), color="0.45")
    ax2.set(xscale="log", yscale="log", xlabel="studies sharing one report text", ylabel="distinct report texts",
            title=f"identical reports: {dup_rows} of {len(table)} studies share their text")
    fig.tight_layout()
    return fig


def plot_example_grid(table, n: int = 8, seed: int = 0, ncols: int = 4, chars: int = 220) -> plt.Figure:
    """``n`` random studies (half normal, half abnormal where possible): image above, report below."""
    import textwrap

    import pandas as pd

    from cxrlib.images import load_cxr_image

    parts = [g.sample(min(len(g), n // 2 + n % 2 * (lab == 1)), random_state=seed)
             for lab, g in table.groupby("label_abnormal")]
    rows = pd.concat(parts).head(n)
    if len(rows) < n:
        rows = pd.concat([rows, table.drop(rows.index).sample(min(n - len(rows), len(table) - len(rows)),
                                                              random_state=seed)])
    nrows = -(-len(rows) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 4.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (_, r) in zip(axes.flat, rows.iterrows()):
        ax.imshow(load_cxr_image(r["image_path"], mode="L"), cmap="gray", vmin=0, vmax=255)
        label = LABEL_NAMES[int(r["label_abnormal"])]
        ax.set_title(f"{r['study_id']} ({r['view']}) | {label}", fontsize=8, color=LABEL_COLORS[label])
        text = r["report"] if len(r["report"]) <= chars else r["report"][: chars - 1] + "…"
        ax.text(0, -0.03, textwrap.fill(text, 42), transform=ax.transAxes, va="top", fontsize=6.5)
    fig.tight_layout()
    return fig

# --- 02 training ------------------------------------------------------------------------------

#: colours of the loss terms in training curves, given to the terms of cxrlib.losses in registration order
LOSS_TERM_PALETTE = ("#C44E52", "#8172B3", "#55A868", "#CCB974", "#64B5CD", "#DD8452")


def loss_term_colors() -> dict[str, str]:
    """``{"total": grey, <term>: colour, ...}`` for every loss term (:func:`cxrlib.settings.loss_terms` order)."""
    terms = list(settings.loss_terms())
    return {"total": "0.2"} | {t: LOSS_TERM_PALETTE[i % len(LOSS_TERM_PALETTE)] for i, t in enumerate(terms)}


def plot_loss_curves(history, best_epoch: int | None = None, metric: str | None = None) -> plt.Figure:
    """Two panels: each loss term per epoch (train solid, validation dashed) and the validation
    retrieval metric (``metric``, default the ``val_p<k>`` column) with the best epoch marked."""
    apply_style()
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    trained = history[history["epoch"] > 0]
    for term, color in loss_term_colors().items():
        for prefix, style in (("train", "-"), ("val", "--")):
            col = f"{prefix}_{term}"
            if col in history and history[col].notna().any():
                data = trained if prefix == "train" else history
                ax_loss.plot(data["epoch"], data[col], style, color=color, label=f"{term} ({prefix})")
    ax_loss.set(xlabel="epoch", ylabel="loss (terms unweighted, total weighted)", title="loss terms", yscale="log")
    ax_loss.legend(fontsize=7, ncol=2, loc="best")
    metric = metric or next(c for c in history.columns if c.startswith("val_p") and c[5:].isdigit())
    k = metric[len("val_p"):]
    for suffix, name, style in (("_i2t", "image→text", ":"), ("_t2i", "text→image", ":"), ("", "mean", "-")):
        if metric + suffix in history:
            ax_metric.plot(history["epoch"], history[metric + suffix], style, marker="o", markersize=2.5,
                           label=name, color=MODALITY_COLORS["image"] if suffix == "_i2t" else
                           MODALITY_COLORS["text"] if suffix == "_t2i" else "0.2")
    if best_epoch is not None:
        ax_metric.axvline(best_epoch, color="0.5", lw=0.8, ls="--", label=f"best epoch {best_epoch}")
    ax_metric.set(xlabel="epoch (0 = before training)", ylabel=f"label-match P@{k}",
                  title=f"validation Precision@{k}")
    ax_metric.legend(fontsize=7)
    fig.tight_layout()
    return fig

# --- 03 retrieval evaluation ------------------------------------------------------------------

#: readable names of the retrieval directions in figures
DIRECTION_TITLES = {"image_to_text": "image → report", "text_to_image": "report → image"}


def plot_metric_at_k(results, metric: str = "recall", gallery: str = "raw", query_class: str = "all",
                     ylabel: str | None = None) -> plt.Figure:
    """One panel per direction: ``metric`` (in %) against k, a line per model with its 95% CI band."""
    apply_style()
    sel = results[(results["metric"] == metric) & (results["gallery"] == gallery)
                  & (results["query_class"] == query_class) & results["value"].notna()]
    if sel.empty:
        raise ValueError(f"no rows for metric {metric!r}, gallery {gallery!r}, class {query_class!r}")
    directions = [d for d in DIRECTION_TITLES if d in set(sel["direction"])]
    fig, axes = plt.subplots(1, len(directions), figsize=(4.6 * len(directions), 3.6), sharey=True, squeeze=False)
    for ax, direction in zip(axes[0], directions):
        for model in dict.fromkeys(results["model"]):
            part = sel[(sel["direction"] == direction) & (sel["model"] == model)].sort_values("k")
            if part.empty:
                continue
            k = part["k"].astype(float)
            color = model_color(model)
            ax.plot(k, 100 * part["value"], marker="o", color=color, label=model)
            ax.fill_between(k, 100 * part["ci_low"].astype(float), 100 * part["ci_high"].astype(float),
                            color=color, alpha=0.2, lw=0)
        ax.set(title=DIRECTION_TITLES[direction], xlabel="k", xticks=sorted(sel["k"].dropna().astype(int).unique()))
    axes[0][0].set_ylabel(ylabel or f"{metric} @ k (%)")
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_per_class(results, metric: str = "label_precision", k: int | None = 5, gallery: str = "raw") -> plt.Figure:
    """Grouped bars: ``metric`` (in %) per query class (normal, abnormal, all) for each model, per direction."""
    apply_style()
    classes = ["normal", "abnormal", "all"]
    sel = results[(results["metric"] == metric) & (results["gallery"] == gallery) & results["value"].notna()]
    sel = sel[sel["k"] == k] if k is not None else sel[sel["k"].isna()]
    if sel.empty:
        raise ValueError(f"no rows for metric {metric!r} at k={k}")
    models = list(dict.fromkeys(results["model"]))
    directions = [d for d in DIRECTION_TITLES if d in set(sel["direction"])]
    fig, axes = plt.subplots(1, len(directions), figsize=(4.8 * len(directions), 3.6), sharey=True, squeeze=False)
    width = 0.8 / len(models)
    for ax, direction in zip(axes[0], directions):
        for m, model in enumerate(models):
            part = sel[(sel["direction"] == direction) & (sel["model"] == model)].set_index("query_class")
            vals = [100 * part["value"].get(c, float("nan")) for c in classes]
            # a percentile CI need not contain the point estimate: clip the bar's error to >= 0
            low = [max(0.0, 100 * (part["value"].get(c, float("nan")) - part["ci_low"].get(c, float("nan"))))
                   for c in classes]
            high = [max(0.0, 100 * (part["ci_high"].get(c, float("nan")) - part["value"].get(c, float("nan"))))
                    for c in classes]
            x = [i - 0.4 + width * (m + 0.5) for i in range(len(classes))]
            ax.bar(x, vals, width, yerr=[low, high], color=model_color(model), label=model, capsize=2,
                   error_kw={"lw": 0.8})
        ax.set_xticks(range(len(classes)), [f"{c} queries" for c in classes])
        ax.set(title=DIRECTION_TITLES[direction], ylim=(0, 100))
        for tick, c in zip(ax.get_xticklabels(), classes):
            tick.set_color(LABEL_COLORS.get(c, "0.2"))
    label = metric.replace("_", " ") + (f"@{k}" if k is not None else "")
    axes[0][0].set_ylabel(f"{label} (%)")
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc="lower center", ncol=min(len(models), 4), bbox_to_anchor=(0.5, 0))
    fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(models) - 1) // 4), 1, 1))  # room for the legend below
    return fig


def _wrap(text: str, width: int, lines: int) -> str:
    import textwrap

    out = textwrap.wrap(" ".join(str(text).split()), width) or ["(empty report)"]
    return "\n".join(out[:lines]) + (" …" if len(out) > lines else "")


def _label_name(label) -> str:
    return LABEL_NAMES.get(int(label), str(label))


def collapse_identical(texts, indices) -> list[tuple[str, list[int], list[int]]]:
    """Group retrieved items whose report text is identical: ``[(text, ranks, gallery rows)]`` in order of
    each text's best rank (ranks 1-based)."""
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for rank, j in enumerate(indices, start=1):
        ranks, rows = groups.setdefault(" ".join(str(texts[j]).split()), ([], []))
        ranks.append(rank)
        rows.append(int(j))
    return [(t, r, rows) for t, (r, rows) in groups.items()]


def plot_image_to_reports(table, queries, indices, scores, title: str = "") -> plt.Figure:
    """Rows of queries: the query image (with its label), its true report, and its top-k reports.

    ``table`` holds the split's rows (``image_path``, ``report``, ``label_abnormal``); ``indices`` /
    ``scores`` are the top-k gallery rows of each query. Identical report texts among the top k are shown
    once with their ranks and count (``×3, ranks 1, 2, 4``); ✓ marks the true pair, ≡ a text identical to
    the true report.
    """
    from cxrlib.images import load_cxr_image

    apply_style()
    k = indices.shape[1]
    texts = table["report"].to_numpy()
    fig, axes = plt.subplots(len(queries), 2, figsize=(12, 2.6 + 0.55 * (k + 1) * len(queries)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 3.2]})
    for row, (q, idx, sc) in enumerate(zip(queries, indices, scores)):
        qrow = table.iloc[q]
        ax_img, ax_txt = axes[row]
        ax_img.imshow(load_cxr_image(qrow["image_path"], mode="L"), cmap="gray")
        ax_img.set_title(f"query image ({_label_name(qrow['label_abnormal'])})", fontsize=9,
                         color=LABEL_COLORS[int(qrow["label_abnormal"])])
        ax_img.axis("off")
        ax_txt.axis("off")
        groups = collapse_identical(texts, idx)
        step = 1.0 / (len(groups) + 1)
        ax_txt.text(0, 1.0, "true report", fontsize=8.5, weight="bold", va="top", transform=ax_txt.transAxes)
        ax_txt.text(0.02, 1.0 - 0.07, _wrap(qrow["report"], 120, 2), fontsize=7.5, va="top", style="italic",
                    transform=ax_txt.transAxes)
        true_text = " ".join(str(qrow["report"]).split())
        score_of = dict(zip(map(int, idx), sc))
        y = 1.0 - step
        for text, ranks, rows in groups:
            g = table.iloc[rows[0]]
            mark = " ✓ true pair" if q in rows else (" ≡ true report's text" if text == true_text else "")
            count = f" ×{len(ranks)} (ranks {', '.join(map(str, ranks))})" if len(ranks) > 1 else ""
            ax_txt.text(0, y, f"{ranks[0]}. [{_label_name(g['label_abnormal'])}] sim {score_of[rows[0]]:.3f}"
                        f"{count}{mark}", fontsize=8.5, weight="bold", color=LABEL_COLORS[int(g["label_abnormal"])],
                        va="top", transform=ax_txt.transAxes)
            ax_txt.text(0.02, y - 0.07, _wrap(text, 120, 2), fontsize=7.5, va="top", transform=ax_txt.transAxes)
            y -= step
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_report_to_images(table, queries, indices, scores, title: str = "") -> plt.Figure:
    """Rows of queries: the query report (with its label) and its top-k images, framed by their label colour."""
    from cxrlib.images import load_cxr_image

    apply_style()
    k = indices.shape[1]
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(2.1 * (k + 1) + 1.5, 2.6 * len(queries)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.8] + [1] * k})
    for row, (q, idx, sc) in enumerate(zip(queries, indices, scores)):
        qrow = table.iloc[q]
        ax = axes[row][0]
        ax.axis("off")
        ax.text(0, 1, f"query report ({_label_name(qrow['label_abnormal'])})", fontsize=9, weight="bold",
                color=LABEL_COLORS[int(qrow["label_abnormal"])], va="top", transform=ax.transAxes)
        ax.text(0, 0.88, _wrap(qrow["report"], 38, 9), fontsize=7.5, va="top", transform=ax.transAxes)
        for col, (j, s) in enumerate(zip(idx, sc), start=1):
            g = table.iloc[j]
            ax = axes[row][col]
            ax.imshow(load_cxr_image(g["image_path"], mode="L"), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            color = LABEL_COLORS[int(g["label_abnormal"])]
            for spine in ax.spines.values():
                spine.set(visible=True, color=color, linewidth=3)
            mark = " ✓" if j == q else ""
            ax.set_title(f"{col}. {_label_name(g['label_abnormal'])} {s:.3f}{mark}", fontsize=8, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# --- 04 embedding visualisation ---------------------------------------------------------------

#: axis names of the 2-D map methods (``pca`` = the fallback for too few points)
MAP_AXES = {"tsne": "t-SNE", "umap": "UMAP", "pca": "PC"}
#: panel titles of the stages
STAGE_TITLES = {"before": "Frozen backbone", "after": "After projector"}
#: finding groups that are not a single finding: greys
_MIXED_GROUP_COLORS = {"multiple": "0.30", "other abnormal": "0.62", "unlabelled": "0.85"}


def finding_colors(groups) -> dict[str, object]:
    """Colour of each finding group: ``normal`` as in ``LABEL_COLORS``, findings from the colour-blind
    palette (without its blues and grey), most frequent first, mixed groups in greys."""
    from collections import Counter

    palette = [c for i, c in enumerate(sns.color_palette("colorblind", 10)) if i not in (0, 7, 9)]
    counts = Counter(str(g) for g in groups)
    names = sorted(set(counts) - {"normal"} - set(_MIXED_GROUP_COLORS), key=lambda g: (-counts[g], g))
    colors: dict[str, object] = {"normal": LABEL_COLORS["normal"]}
    colors.update({n: palette[i % len(palette)] for i, n in enumerate(names)})
    colors.update({g: c for g, c in _MIXED_GROUP_COLORS.items() if g in set(map(str, groups))})
    return colors


def _point_size(n: int) -> float:
    return float(min(28.0, max(3.0, 5000.0 / max(n, 1))))


def _map_axes(ax, method: str, title: str | None) -> None:
    name = MAP_AXES.get(method, method)
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title, fontsize=10)


def _scatter(ax, xy, cats, colors: dict, seed: int = 0, marker: str = "o", size: float | None = None) -> None:
    """One scatter of ``xy`` coloured by category, drawn in a seeded random order so no class hides another."""
    import numpy as np

    xy, cats = np.asarray(xy), np.asarray(cats).astype(str)
    order = np.random.default_rng(seed).permutation(len(xy))
    ax.scatter(xy[order, 0], xy[order, 1], c=[colors[c] for c in cats[order]], s=size or _point_size(len(xy)),
               marker=marker, alpha=0.75, linewidths=0, rasterized=True)


def _legend(fig, entries: list[tuple[str, object, str]], title: str | None = None, ncol: int | None = None,
            right: bool = False) -> None:
    """Figure legend below the panels (or right of them, one column, for long lists)."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", marker=m, markersize=7, markerfacecolor=c, markeredgewidth=0,
                      label=lab) for lab, c, m in entries]
    where = (dict(loc="center left", bbox_to_anchor=(1.0, 0.5), ncol=1) if right else
             dict(loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=ncol or min(len(handles), 5)))
    fig.legend(handles=handles, title=title, fontsize=9, title_fontsize=9, handletextpad=0.2, columnspacing=1.2,
               **where)


def _panels(n_rows: int, n_cols: int):
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols + 0.4, 3.5 * n_rows + 0.9), squeeze=False)
    return fig, axes


def _panel_title(stage: str, scores) -> str:
    title = STAGE_TITLES.get(stage, stage)
    return f"{title}\n{scores[stage]}" if scores and scores.get(stage) else title


def plot_label_maps(maps, labels, method: str, title: str | None = None, scores=None, seed: int = 0) -> plt.Figure:
    """One panel per stage (``maps = {stage: xy}``), points coloured normal / abnormal; ``scores[stage]``
    (e.g. silhouette and k-NN accuracy in the embedding space) goes under the panel title."""
    import numpy as np

    names = np.array([LABEL_NAMES[int(v)] for v in labels])
    fig, axes = _panels(1, len(maps))
    for ax, (stage, xy) in zip(axes[0], maps.items()):
        _scatter(ax, xy, names, LABEL_COLORS, seed)
        _map_axes(ax, method, _panel_title(stage, scores))
    counts = {n: int((names == n).sum()) for n in ("normal", "abnormal")}
    _legend(fig, [(f"{n} ({counts[n]})", LABEL_COLORS[n], "o") for n in ("normal", "abnormal") if counts[n]])
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


def plot_finding_maps(maps, groups, method: str, title: str | None = None, seed: int = 0) -> plt.Figure:
    """One panel per stage, points coloured by finding group (normal, single findings, mixed groups)."""
    import numpy as np

    groups = np.asarray(groups).astype(str)
    colors = finding_colors(groups)
    fig, axes = _panels(1, len(maps))
    for ax, (stage, xy) in zip(axes[0], maps.items()):
        _scatter(ax, xy, groups, colors, seed)
        _map_axes(ax, method, STAGE_TITLES.get(stage, stage))
    _legend(fig, [(f"{g} ({int((groups == g).sum())})", c, "o") for g, c in colors.items()], title="finding",
            right=True)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def plot_modality_maps(maps, labels, method: str, title: str | None = None, scores=None,
                       seed: int = 0) -> plt.Figure:
    """Images and reports in one map (``maps = {stage: xy}``, first N rows images, next N reports):
    top row coloured by modality, bottom row by normal / abnormal with a marker per modality."""
    import numpy as np

    labels = np.asarray(labels)
    n = len(labels)
    names = np.array([LABEL_NAMES[int(v)] for v in labels])
    fig, axes = _panels(2, len(maps))
    for col, (stage, xy) in enumerate(maps.items()):
        xy = np.asarray(xy)
        if len(xy) != 2 * n:
            raise ValueError(f"joint map {stage!r} has {len(xy)} rows, expected 2 x {n} (images then reports)")
        size = _point_size(2 * n)
        for row, by_label in ((0, False), (1, True)):
            ax = axes[row, col]
            for k, modality in enumerate(("image", "text")):
                part = xy[k * n:(k + 1) * n]
                cats = names if by_label else np.full(n, modality)
                _scatter(ax, part, cats, LABEL_COLORS if by_label else MODALITY_COLORS, seed + k,
                         MODALITY_MARKERS[modality], size)
            _map_axes(ax, method, _panel_title(stage, scores) if row == 0 else None)
    entries = [(f"{m} ({'report' if m == 'text' else 'radiograph'})", MODALITY_COLORS[m], MODALITY_MARKERS[m])
               for m in ("image", "text")]
    entries += [(f"{lab}, {m}", LABEL_COLORS[lab], MODALITY_MARKERS[m]) for lab in ("normal", "abnormal")
                for m in ("image", "text")]
    _legend(fig, entries, ncol=3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig

# --- 05 loss ablation -------------------------------------------------------------------------


def column_scaled(values):
    """Each column of ``values`` mapped to 0..1 over its own min..max (a constant column -> 0.5), NaN kept."""
    v = values.astype(float)
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = (hi - lo).where(hi > lo)
    return ((v - lo) / span).fillna(0.5).where(v.notna())


def plot_ablation_heatmap(values, annot, title: str = "Loss-weight ablation (test split, 95% CI)"):
    """Heatmap of headline metrics (rows: loss weightings, frozen first; columns: metric x direction).

    The colour of a cell is scaled within its column (one scale per metric column: R@5 of 1-6% and P@5
    of 66-89% would share no useful colour range); each column label gives its range, and the annotation
    the value itself.
    """
    fig, ax = plt.subplots(figsize=(1.55 * values.shape[1] + 2.5, 0.62 * values.shape[0] + 1.8))
    v = values.astype(float)
    scaled = column_scaled(v)
    sns.heatmap(scaled, annot=annot.to_numpy(), fmt="", cmap="viridis", ax=ax, vmin=0, vmax=1, cbar=False,
                annot_kws={"fontsize": 7}, linewidths=0.5, linecolor="white")
    ax.set_xticks([i + 0.5 for i in range(v.shape[1])],
                  [f"{c}\n({v[c].min():.1f}-{v[c].max():.1f}%)" for c in v.columns])
    ax.set_ylabel("")
    ax.set_title(title + "\ncolour scaled within each column (low -> high)", fontsize=10)
    ax.tick_params(axis="x", labelrotation=0, labelsize=8)
    ax.tick_params(axis="y", labelrotation=0)
    fig.tight_layout()
    return fig
