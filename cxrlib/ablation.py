"""Loss-weight ablation: the same training and evaluation code over a grid of (w_bce, w_supcon, w_clip).

:func:`default_grid` is each term alone, each pair, all three, a few unequal weightings, and the
main run's weights; :func:`run_ablation` trains one projector per weighting with
:func:`cxrlib.train.train_projector` (same seed, same splits) and scores it with
:func:`cxrlib.retrieval.query_scores` / :func:`~cxrlib.retrieval.summarise` (patient-bootstrap CIs);
the frozen backbone is scored once as the reference row. :func:`headline_table` picks the main metrics
into a wide table (one row per weighting) that :mod:`cxrlib.report` formats.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrlib import retrieval
from cxrlib.pairs import PairedSplit
from cxrlib.report import DIRECTION_LABELS, METRIC_LABELS, format_cell
from cxrlib.train import TrainConfig, project_split, train_projector

Weights = tuple[float, float, float]
FROZEN = "frozen backbone"
#: (metric, gallery, k) shown in the ablation table and heatmap
HEADLINE = (("recall", "merged", 5), ("label_precision", "raw", 5), ("label_map", "raw", None))


def weights_name(w: Weights) -> str:
    """``BCE 1 + SupCon 0.5 + CLIP 1``, omitting zero terms."""
    parts = [f"{n} {v:g}" for n, v in zip(("BCE", "SupCon", "CLIP"), w) if v > 0]
    return " + ".join(parts)


def default_grid(main: Weights = (1.0, 1.0, 1.0)) -> list[Weights]:
    """Each term alone, each pair, all three, two unequal weightings, and ``main`` (deduplicated, ordered)."""
    grid: list[Weights] = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1),
                           (0.5, 1, 1), (1, 0.5, 1), (tuple(main))]
    out: list[Weights] = []
    for w in grid:
        w = tuple(float(v) for v in w)
        if w not in out:
            out.append(w)
    return out


def parse_grid(grid: str | Iterable[Sequence[float]], main: Weights) -> list[Weights]:
    """``"default"`` or a list of ``[w_bce, w_supcon, w_clip]``; each validated like a training run."""
    if isinstance(grid, str):
        if grid != "default":
            raise ValueError(f"grid must be 'default' or a list of [w_bce, w_supcon, w_clip], got {grid!r}")
        return default_grid(main)
    out = []
    for w in grid:
        if len(w) != 3:
            raise ValueError(f"grid entry {w!r} is not [w_bce, w_supcon, w_clip]")
        w = tuple(float(v) for v in w)
        TrainConfig(w_bce=w[0], w_supcon=w[1], w_clip=w[2]).validate()
        out.append(w)
    if not out:
        raise ValueError("the ablation grid is empty")
    return list(dict.fromkeys(out))


def run_ablation(train: PairedSplit, val: PairedSplit, test: PairedSplit, grid: list[Weights],
                 base: TrainConfig, ks: Sequence[int] = (1, 5, 10), n_boot: int = 500,
                 seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and score one projector per weighting (plus the frozen reference).

    Returns ``(results, runs)``: ``results`` is the tidy table of :func:`cxrlib.retrieval.summarise`
    with ``w_bce, w_supcon, w_clip`` columns (NaN for the frozen row); ``runs`` one row per weighting
    with the best epoch, its validation metric and the training time.
    """
    frames, runs = [], []
    frozen = retrieval.summarise(retrieval.query_scores(test, FROZEN, ks), n_boot=n_boot, seed=seed)
    frames.append(frozen.assign(w_bce=np.nan, w_supcon=np.nan, w_clip=np.nan))
    for w in tqdm(grid, desc="ablation"):
        cfg = dataclasses.replace(base, w_bce=w[0], w_supcon=w[1], w_clip=w[2], seed=seed)
        start = time.perf_counter()
        result = train_projector(train, val, cfg, progress=False)
        seconds = time.perf_counter() - start
        name = weights_name(w)
        scores = retrieval.query_scores(project_split(test, result.model, cfg.device), name, ks)
        frames.append(retrieval.summarise(scores, n_boot=n_boot, seed=seed).assign(
            w_bce=w[0], w_supcon=w[1], w_clip=w[2]))
        runs.append({"model": name, "w_bce": w[0], "w_supcon": w[1], "w_clip": w[2],
                     "best_epoch": result.best_epoch, f"val_p{cfg.eval_k}": result.best_metric,
                     "epochs_run": int(result.history["epoch"].max()), "seconds": round(seconds, 2)})
    return pd.concat(frames, ignore_index=True), pd.DataFrame(runs)


def _select(results: pd.DataFrame, metric: str, gallery: str, k: int | None) -> pd.DataFrame:
    sel = results[(results["metric"] == metric) & (results["gallery"] == gallery)
                  & (results["query_class"] == "all")]
    return sel[sel["k"].isna()] if k is None else sel[sel["k"] == k]


def headline_table(results: pd.DataFrame, headline=HEADLINE, decimals: int = 1) -> pd.DataFrame:
    """Wide table: one row per model (frozen first), a ``value [CI]`` column per headline metric and direction."""
    models = list(dict.fromkeys(results["model"]))
    table = pd.DataFrame({"Model": models})
    for metric, gallery, k in headline:
        label = METRIC_LABELS[metric].format(k=k or "") + (" (merged)" if gallery == "merged" else "")
        for direction in retrieval.DIRECTIONS:
            sel = _select(results, metric, gallery, k)
            sel = sel[sel["direction"] == direction].set_index("model")
            col = f"{label} {DIRECTION_LABELS[direction]}"
            table[col] = [format_cell(metric, *sel.loc[m, ["value", "ci_low", "ci_high"]]) if m in sel.index
                          else "n/a" for m in models]
    return table


def heatmap_frame(results: pd.DataFrame, headline=HEADLINE) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(values in %, annotation strings) with models as rows and metric/direction as columns."""
    models = list(dict.fromkeys(results["model"]))
    values, annot = pd.DataFrame(index=models), pd.DataFrame(index=models)
    for metric, gallery, k in headline:
        label = METRIC_LABELS[metric].format(k=k or "") + (" merged" if gallery == "merged" else "")
        for direction, short in zip(retrieval.DIRECTIONS, ("i→t", "t→i")):
            sel = _select(results, metric, gallery, k)
            sel = sel[sel["direction"] == direction].set_index("model").reindex(models)
            values[f"{label}\n{short}"] = 100 * sel["value"].astype(float).to_numpy()
            annot[f"{label}\n{short}"] = [
                f"{100 * v:.1f}\n[{100 * lo:.1f}, {100 * hi:.1f}]" if np.isfinite(lo) else f"{100 * v:.1f}"
                for v, lo, hi in sel[["value", "ci_low", "ci_high"]].astype(float).to_numpy()]
    return values, annot
