"""Uncertainty for retrieval metrics: patient-level (cluster) bootstrap CIs and paired model tests.

Queries from one patient are not independent (several studies, near-identical reports), so every
resampling unit here is a *patient*: a resample draws patients with replacement and keeps all their
queries. With one query per patient this is the ordinary percentile bootstrap (tested equal to
``scipy.stats.bootstrap``); the paired test flips the sign of whole patients' differences (equal to
``scipy.stats.permutation_test`` with ``permutation_type="samples"`` in that case).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

STATISTICS = ("mean", "median")
#: resamples drawn per batch (bounds the [batch, patients] weight matrix)
_BATCH = 256


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile CI; ``n`` queries and ``n_clusters`` patients used."""

    value: float
    ci_low: float
    ci_high: float
    n: int
    n_clusters: int


def _prepare(values, clusters) -> tuple[np.ndarray, np.ndarray, int]:
    """Drop NaN values (excluded queries); cluster codes 0..P-1."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    clusters = np.asarray(clusters).reshape(-1)
    if len(values) != len(clusters):
        raise ValueError(f"{len(values)} values but {len(clusters)} cluster ids")
    keep = ~np.isnan(values)
    codes, uniques = pd.factorize(clusters[keep])
    return values[keep], codes.astype(np.int64), len(uniques)


def statistic(values: np.ndarray, kind: str) -> float:
    if kind == "mean":
        return float(np.mean(values))
    if kind == "median":
        return float(np.median(values))
    raise ValueError(f"unknown statistic {kind!r}; choose one of {STATISTICS}")


def _weighted_median(sorted_vals: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Median of each row's sample holding ``sorted_vals[i]`` ``weights[r, i]`` times (same as np.median)."""
    cum = np.cumsum(weights, axis=1)
    total = cum[:, -1]
    lo = np.array([np.searchsorted(c, p, side="right") for c, p in zip(cum, (total - 1) // 2)])
    hi = np.array([np.searchsorted(c, p, side="right") for c, p in zip(cum, total // 2)])
    return (sorted_vals[lo] + sorted_vals[hi]) / 2


def resample_statistics(values: np.ndarray, codes: np.ndarray, draws: np.ndarray, kind: str) -> np.ndarray:
    """The statistic of each resample; ``draws[r]`` lists the patients (codes) drawn in resample r."""
    n_clusters = int(codes.max()) + 1 if len(codes) else 0
    out = np.empty(len(draws))
    if kind == "median":
        order = np.argsort(values, kind="stable")
        sorted_vals, sorted_codes = values[order], codes[order]
    sums = np.bincount(codes, weights=values, minlength=n_clusters)
    sizes = np.bincount(codes, minlength=n_clusters)
    for s in range(0, len(draws), _BATCH):
        d = draws[s:s + _BATCH]
        flat = (np.arange(len(d))[:, None] * n_clusters + d).reshape(-1)
        w = np.bincount(flat, minlength=len(d) * n_clusters).reshape(len(d), n_clusters).astype(np.float64)
        if kind == "mean":
            out[s:s + len(d)] = (w @ sums) / (w @ sizes)
        elif kind == "median":
            out[s:s + len(d)] = _weighted_median(sorted_vals, w[:, sorted_codes].astype(np.int64))
        else:
            raise ValueError(f"unknown statistic {kind!r}; choose one of {STATISTICS}")
    return out


@functools.lru_cache(maxsize=8)
def draw_clusters(n_clusters: int, n_boot: int, seed: int) -> np.ndarray:
    """[n_boot, n_clusters] patient codes drawn with replacement from a seeded generator (read-only;
    cached, since every metric of one query set draws the same patients)."""
    draws = np.random.default_rng(seed).integers(0, n_clusters, size=(n_boot, n_clusters))
    draws.flags.writeable = False
    return draws


def bootstrap_ci(values, clusters, n_boot: int = 1000, seed: int = 0, kind: str = "mean",
                 confidence: float = 0.95) -> Interval:
    """Percentile bootstrap CI of ``kind`` over ``values`` resampling ``clusters`` (patients).

    NaN values (queries excluded, e.g. with no relevant item) are dropped first. With fewer than two
    patients, or ``n_boot == 0``, the interval is NaN. ``confidence`` outside (0, 1) or a negative
    ``n_boot`` is a ValueError.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot!r}")
    vals, codes, n_clusters = _prepare(values, clusters)
    if len(vals) == 0:
        return Interval(np.nan, np.nan, np.nan, 0, 0)
    point = statistic(vals, kind)
    if n_clusters < 2 or n_boot <= 0:
        return Interval(point, np.nan, np.nan, len(vals), n_clusters)
    boot = resample_statistics(vals, codes, draw_clusters(n_clusters, n_boot, seed), kind)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(point, float(low), float(high), len(vals), n_clusters)


@dataclass(frozen=True)
class PairedResult:
    """``value_a - value_b`` with its bootstrap CI and a two-sided sign-flip permutation p-value."""

    value_a: float
    value_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n: int
    n_clusters: int
    n_perm: int
    exact: bool


def sign_flip_pvalue(diffs, clusters, n_perm: int = 10000, seed: int = 0) -> tuple[float, int, bool]:
    """Two-sided p-value of mean(diffs) = 0, flipping the sign of each patient's summed difference.

    Enumerates all 2^P flips when that is at most ``n_perm`` (exact), else draws ``n_perm`` random
    flips and returns the (1 + count) / (1 + n_perm) estimate. Returns (p, flips used, exact).
    ``n_perm == 0`` gives no test (NaN, not the 1.0 that no flips would estimate); a negative one raises.
    """
    if n_perm < 0:
        raise ValueError(f"n_perm must be >= 0, got {n_perm!r}")
    d, codes, n_clusters = _prepare(diffs, clusters)
    if len(d) == 0 or n_perm == 0:
        return np.nan, 0, False
    per_cluster = np.bincount(codes, weights=d, minlength=n_clusters)
    observed = abs(per_cluster.sum())
    tol = 1e-9 * max(1.0, np.abs(per_cluster).sum())
    if 2 ** n_clusters <= n_perm:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n_clusters)))
        null = np.abs(signs @ per_cluster)
        return float(np.mean(null >= observed - tol)), len(signs), True
    count = 0
    for bits in _flip_bits(seed, n_perm, n_clusters):
        signs = 1.0 - 2.0 * bits
        count += int(np.sum(np.abs(signs @ per_cluster) >= observed - tol))
    return (1 + count) / (1 + n_perm), n_perm, False


@functools.lru_cache(maxsize=4)
def _flip_bits(seed: int, n_perm: int, n_clusters: int) -> tuple[np.ndarray, ...]:
    """The random flips (0/1 per patient, in batches of ``_BATCH``) that :func:`sign_flip_pvalue` draws for
    ``seed``: the same for every test on as many patients, so drawn once per process (notebook 03 runs one
    test per model pair, direction, protocol, metric and K on one query set). int8, read-only."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(0, n_perm, _BATCH):
        bits = rng.integers(0, 2, size=(min(_BATCH, n_perm - s), n_clusters), dtype=np.int8)
        bits.flags.writeable = False
        out.append(bits)
    return tuple(out)


def paired_test(a, b, clusters, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0,
                confidence: float = 0.95) -> PairedResult:
    """Compare two models' per-query scores on the same queries (mean statistic).

    A query counts only where both scores are defined. The CI is the patient bootstrap of the mean
    difference; the p-value the patient sign-flip permutation test.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores must cover the same queries: shapes {a.shape} and {b.shape}")
    both = ~(np.isnan(a) | np.isnan(b))
    d = np.where(both, a - b, np.nan)
    ci = bootstrap_ci(d, clusters, n_boot, seed, "mean", confidence)
    p, used, exact = sign_flip_pvalue(d, clusters, n_perm, seed)
    va = float(np.mean(a[both])) if both.any() else np.nan
    vb = float(np.mean(b[both])) if both.any() else np.nan
    return PairedResult(va, vb, ci.value, ci.ci_low, ci.ci_high, p, ci.n, ci.n_clusters, used, exact)
