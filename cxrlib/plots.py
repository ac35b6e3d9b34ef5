"""One style for every figure: palette, fonts, and a saver that writes PNG + PDF atomically.

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
            fig.savefig(tmp, format=fmt)
        written.append(target)
    return written


# --- 01 data prep ----------------------------------------------------------------------------

# --- 02 training ------------------------------------------------------------------------------

# --- 03 retrieval evaluation ------------------------------------------------------------------

# --- 04 embedding visualisation ---------------------------------------------------------------
