"""Loss-weight ablation: the main run's recipe over a grid of loss weightings (one weight per loss term).

Every row trains the recipe of the main run (notebook 02's saved ``config.json``, all its settings) with
only the weights changed, so the main row *is* the main run. :func:`default_grid` is each term alone,
each pair, all terms, a few unequal weightings, and the main run's weights. Each weighting's run is named
by its own recipe (:func:`cxrlib.dag.run_id`) and kept in ``results/<out>/models/<run>/`` beside 02's:
:func:`run_ablation` reuses a run whose folder was trained on the same inputs
(:func:`cxrlib.dag.inputs_fingerprint`) and trains only the missing ones, so changing the main run's
weights trains one new row, not the grid. Each run is scored with :func:`cxrlib.retrieval.query_scores` /
:func:`~cxrlib.retrieval.summarise` (patient-bootstrap CIs); the frozen backbone is the reference row.
:func:`headline_table` picks the main metrics into a wide table that :mod:`cxrlib.report` formats.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrlib import dag, retrieval, settings
from cxrlib.pairs import PairedSplit
from cxrlib.projector import load_projector
from cxrlib.report import DIRECTION_LABELS, METRIC_LABELS, format_cell
from cxrlib.train import TrainConfig, project_split, save_run, train_projector

#: one weight per loss term, in :data:`cxrlib.losses.TERMS` order
Weights = tuple[float, ...]
FROZEN = "frozen backbone"
#: (metric, gallery, k) shown in the ablation table and heatmap
HEADLINE = (("recall", "merged", 5), ("label_precision", "raw", 5), ("label_map", "raw", None))


def terms() -> list[str]:
    return list(settings.loss_terms())


def weights_name(w: Weights) -> str:
    """``BCE 1 + SupCon 0.5 + CLIP 1`` (each term's label from its ``register_term`` line), omitting zero terms."""
    info = settings.loss_term_info()
    return " + ".join(f"{info[t]['label']} {v:g}" for t, v in zip(terms(), w) if v > 0)


def weights_of(cfg: TrainConfig | dict) -> Weights:
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    return tuple(float(d[f"w_{t}"]) for t in terms())


def default_grid(main: Weights | None = None) -> list[Weights]:
    """Each term alone, each pair, all terms, each term at half weight beside the others, and ``main``."""
    n = len(terms())
    main = tuple(settings.loss_terms().values()) if main is None else tuple(main)
    alone = [tuple(float(i == j) for j in range(n)) for i in range(n)]
    pairs = [tuple(float(j in (a, b)) for j in range(n)) for a in range(n) for b in range(a + 1, n)] if n > 2 else []
    half = [tuple(0.5 if j == i else 1.0 for j in range(n)) for i in range(n - 1)]
    grid = alone + pairs + [tuple(1.0 for _ in range(n))] + half + [main]
    return list(dict.fromkeys(tuple(float(v) for v in w) for w in grid))


def parse_grid(grid: str | Iterable[Sequence[float]], main: Weights) -> list[Weights]:
    """``"default"`` or a list of weightings (one weight per term, TERMS order), validated by the schema;
    the main run's weights are always a row (appended when the list lacks them)."""
    checked = settings.lookup(settings.ABLATION, "grid").validate(grid if isinstance(grid, str) else
                                                                  [list(w) for w in grid])
    if checked == "default":
        return default_grid(main)
    return list(dict.fromkeys([tuple(w) for w in checked] + [tuple(float(v) for v in main)]))


def main_config(run_dir: str | Path, device: str = "cpu") -> TrainConfig:
    """The main run's full recipe, read from its ``config.json`` (written by notebook 02)."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no main run at {run_dir} (config.json missing); run notebook 02 first (make paper)")
    saved = json.loads(path.read_text())
    keys = TrainConfig.keys()
    return TrainConfig.from_dict({**{k: v for k, v in saved.items() if k in keys}, "device": device})


def _cached_run(folder: Path, inputs: dict) -> dict | None:
    """The saved config of a complete run in ``folder`` trained on ``inputs``, else None."""
    files = [folder / n for n in ("projector.pt", "config.json", "metrics.json")]
    if not all(f.is_file() for f in files):
        return None
    saved = json.loads(files[1].read_text())
    return saved if saved.get("inputs") == inputs else None


def run_ablation(train: PairedSplit, val: PairedSplit, test: PairedSplit, grid: list[Weights],
                 base: TrainConfig, models_dir: str | Path | None = None, identity: dict | None = None,
                 inputs: dict | None = None, ks: Sequence[int] = (1, 5, 10), n_boot: int = 1000,
                 seed: int = 0, main: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train (or reuse) and score one projector per weighting of ``base``'s recipe (plus the frozen reference).

    ``models_dir`` + ``identity`` (``dataset``, ``backbone``: what :func:`cxrlib.dag.run_id` names a run
    by besides the recipe) + ``inputs`` (the embeddings' fingerprint) turn on the run cache; without
    ``models_dir`` every weighting is trained in memory. Returns ``(results, runs)``: ``results`` is the
    tidy table of :func:`cxrlib.retrieval.summarise` with a ``w_<term>`` column per term (NaN for the frozen
    row); ``runs`` one row per weighting with its run name, whether it was reused, the best epoch, its
    validation metric and the training time. ``main`` (the main run's name) must be reused, never
    retrained here: a missing or differently-trained main run is an error.
    """
    cols = [f"w_{t}" for t in terms()]
    frames, runs = [], []
    frozen = retrieval.summarise(retrieval.query_scores(test, FROZEN, ks), n_boot=n_boot, seed=seed)
    frames.append(frozen.assign(**dict.fromkeys(cols, np.nan)))
    for w in tqdm(grid, desc="ablation"):
        cfg = dataclasses.replace(base, weights=dict(zip(terms(), w)), seed=seed)
        run = dag.run_id({**cfg.to_dict(), **(identity or {})}) if models_dir is not None else None
        folder = Path(models_dir) / run if run else None
        saved = _cached_run(folder, inputs) if folder is not None else None
        if main is not None and run == main and saved is None:
            raise ValueError(f"the main run {folder} is missing or was trained on other inputs than {inputs}: "
                             "rerun notebook 02 (make paper)")
        start = time.perf_counter()
        if saved is not None:
            model, _ = load_projector(folder / "projector.pt")
            metrics = json.loads((folder / "metrics.json").read_text())
            best_epoch, best_metric, epochs_run = metrics["best_epoch"], metrics["best_metric"], metrics.get("epochs_run")
            seconds = metrics.get("train_seconds")
        else:
            result = train_projector(train, val, cfg, progress=False)
            seconds = round(time.perf_counter() - start, 2)
            model, best_epoch, best_metric = result.model, result.best_epoch, result.best_metric
            epochs_run = int(result.history["epoch"].max())
            if folder is not None:
                save_run(folder, result, {**(identity or {}), "run": run, "inputs": inputs},
                         {"epochs_run": epochs_run, "train_seconds": seconds})
        name = weights_name(w)
        scores = retrieval.query_scores(project_split(test, model, cfg.device), name, ks)
        frames.append(retrieval.summarise(scores, n_boot=n_boot, seed=seed).assign(**dict(zip(cols, w))))
        runs.append({"model": name, **dict(zip(cols, w)), "run": run, "reused": saved is not None,
                     "best_epoch": best_epoch, f"val_p{cfg.eval_k}": best_metric, "epochs_run": epochs_run,
                     "train_seconds": seconds})
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
