"""Patient bootstrap and paired sign-flip test against scipy.stats and naive enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from cxrlib import stats


def test_resample_statistics_equal_naive_expansion():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 30, 40).astype(float)  # ranks: many equal values
    clusters = rng.integers(0, 12, 40)
    vals, codes, p = stats._prepare(values, clusters)
    draws = stats.draw_clusters(p, 300, seed=1)
    for kind, fn in (("mean", np.mean), ("median", np.median)):
        fast = stats.resample_statistics(vals, codes, draws, kind)
        naive = [fn(np.concatenate([vals[codes == c] for c in row])) for row in draws]
        np.testing.assert_allclose(fast, naive, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind,fn", [("mean", np.mean), ("median", np.median)])
def test_bootstrap_equals_scipy_with_one_query_per_patient(kind, fn):
    rng = np.random.default_rng(2)
    values = rng.random(150) < 0.3 if kind == "mean" else rng.gamma(2.0, 10.0, 150)
    values = values.astype(float)
    ours = stats.bootstrap_ci(values, np.arange(150), n_boot=20000, seed=0, kind=kind)
    ref = sps.bootstrap((values,), lambda x, axis=-1: fn(x, axis=axis), n_resamples=20000,
                        method="percentile", random_state=1, vectorized=True).confidence_interval
    spread = ref.high - ref.low
    assert ours.value == pytest.approx(fn(values))
    assert ours.ci_low == pytest.approx(ref.low, abs=0.04 * spread)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.04 * spread)


def test_cluster_bootstrap_equals_scipy_ratio_of_patient_sums():
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 60, 200)
    values = (rng.random(200) < 0.4 + 0.3 * (clusters % 2)).astype(float)  # correlated within patient
    ours = stats.bootstrap_ci(values, clusters, n_boot=20000, seed=0)
    ids = np.unique(clusters)
    sums = np.array([values[clusters == c].sum() for c in ids])
    sizes = np.array([(clusters == c).sum() for c in ids], float)
    ref = sps.bootstrap((sums, sizes), lambda s, n, axis=-1: s.sum(axis) / n.sum(axis), paired=True,
                        n_resamples=20000, method="percentile", random_state=4).confidence_interval
    spread = ref.high - ref.low
    assert ours.ci_low == pytest.approx(ref.low, abs=0.04 * spread)
    assert ours.ci_high == pytest.approx(ref.high, abs=0.04 * spread)
    # resampling patients is wider than pretending queries are independent
    naive = stats.bootstrap_ci(values, np.arange(200), n_boot=20000, seed=0)
    assert (ours.ci_high - ours.ci_low) > (naive.ci_high - naive.ci_low)


def test_bootstrap_seeded_nan_excluded_and_degenerate():
    v = np.array([1.0, 0.0, np.nan, 1.0, 1.0, 0.0])
    c = np.array(["a", "a", "b", "c", "d", "d"])
    one = stats.bootstrap_ci(v, c, 500, seed=7)
    assert one == stats.bootstrap_ci(v, c, 500, seed=7)
    cont = np.random.default_rng(0).random(30)
    assert stats.bootstrap_ci(cont, np.arange(30), 200, seed=1) != stats.bootstrap_ci(cont, np.arange(30), 200, seed=2)
    assert one.n == 5 and one.n_clusters == 3 and one.value == pytest.approx(0.6)
    single = stats.bootstrap_ci([1.0, 0.0], ["p", "p"], 100)
    assert single.value == 0.5 and np.isnan(single.ci_low) and single.n_clusters == 1
    empty = stats.bootstrap_ci([np.nan], ["p"], 100)
    assert empty.n == 0 and np.isnan(empty.value)
    with pytest.raises(ValueError, match="statistic"):
        stats.bootstrap_ci(v, c, 10, kind="mode")
    with pytest.raises(ValueError, match="cluster ids"):
        stats.bootstrap_ci(v, c[:3], 10)


def test_sign_flip_exact_equals_scipy_permutation_test():
    rng = np.random.default_rng(5)
    a, b = rng.random(10), rng.random(10) - 0.15
    p, used, exact = stats.sign_flip_pvalue(a - b, np.arange(10), n_perm=5000)
    ref = sps.permutation_test((a, b), lambda x, y, axis=-1: np.mean(x, axis) - np.mean(y, axis),
                               permutation_type="samples", vectorized=True, n_resamples=np.inf)
    assert exact and used == 1024
    assert p == pytest.approx(ref.pvalue, abs=1e-12)


def test_sign_flip_by_patient_equals_swapping_models_per_patient():
    rng = np.random.default_rng(6)
    clusters = rng.integers(0, 7, 25)
    a, b = rng.random(25), rng.random(25)
    p, _, exact = stats.sign_flip_pvalue(a - b, clusters, n_perm=10000)
    ids = np.unique(clusters)
    obs = abs(a.mean() - b.mean())
    count = 0
    for swap in itertools.product((False, True), repeat=len(ids)):
        s = np.isin(clusters, ids[list(swap)])
        aa, bb = np.where(s, b, a), np.where(s, a, b)
        count += abs(aa.mean() - bb.mean()) >= obs - 1e-12
    assert exact and p == pytest.approx(count / 2 ** len(ids))
    # the random-flip estimate agrees with the exact value
    p_mc, used, exact_mc = stats.sign_flip_pvalue(a - b, clusters, n_perm=100, seed=0)
    assert not exact_mc and used == 100 and p_mc == pytest.approx(p, abs=0.15)


def _naive_sign_flip_p(d, clusters, n_perm, seed):
    """The random-flip p-value drawn afresh, one flip vector at a time (reference for the shared draws)."""
    codes, uniq = pd.factorize(pd.Series(clusters))
    per = np.bincount(codes, weights=d, minlength=len(uniq))
    obs, tol = abs(per.sum()), 1e-9 * max(1.0, np.abs(per).sum())
    rng = np.random.default_rng(seed)
    bits = np.concatenate([rng.integers(0, 2, size=(min(stats._BATCH, n_perm - s), len(uniq)), dtype=np.int8)
                           for s in range(0, n_perm, stats._BATCH)])
    count = sum(abs(float((1.0 - 2.0 * row) @ per)) >= obs - tol for row in bits)
    return (1 + count) / (1 + n_perm)


def test_sign_flips_drawn_once_give_each_test_its_fresh_draw_p_value():
    """Tests on the same number of patients share one draw of the flips (notebook 03 runs hundreds): each
    p-value equals the one its own fresh draw gives, whatever ran before; the shared draws stay unchanged."""
    rng = np.random.default_rng(3)
    clusters = rng.integers(0, 40, 120)
    stats._flip_bits.cache_clear()
    for i in range(3):
        d = rng.normal(0.05 * i, 1.0, 120)
        p, used, exact = stats.sign_flip_pvalue(d, clusters, n_perm=700, seed=1)
        assert not exact and used == 700
        assert p == pytest.approx(_naive_sign_flip_p(d, clusters, 700, 1), abs=0)
    assert stats._flip_bits.cache_info().misses == 1 and stats._flip_bits.cache_info().hits == 2
    assert all(not b.flags.writeable for b in stats._flip_bits(1, 700, len(np.unique(clusters))))


def test_paired_test_identical_and_better_models():
    rng = np.random.default_rng(8)
    clusters = rng.integers(0, 80, 200)
    a = (rng.random(200) < 0.6).astype(float)
    same = stats.paired_test(a, a, clusters, n_boot=200, n_perm=500)
    assert same.diff == 0 and same.p_value == 1.0 and same.ci_low == same.ci_high == 0
    b = a * (rng.random(200) < 0.5)  # b loses about half of a's hits
    r = stats.paired_test(a, b, clusters, n_boot=500, n_perm=2000, seed=1)
    assert r.diff == pytest.approx(a.mean() - b.mean()) and r.ci_low > 0 and r.p_value < 0.001
    a_nan = a.copy()
    a_nan[:10] = np.nan
    assert stats.paired_test(a_nan, b, clusters, 50, 50).n == 190
    with pytest.raises(ValueError, match="same queries"):
        stats.paired_test(a, b[:5], clusters)


def test_no_permutations_is_no_p_value_and_bad_settings_raise():
    """``n_perm=0`` drew no flips: the p-value is NaN (it read 1.0, a number no test computed)."""
    rng = np.random.default_rng(0)
    d, clusters = rng.normal(0.5, 1, 40), np.arange(40) % 25
    p, used, exact = stats.sign_flip_pvalue(d, clusters, n_perm=0)
    assert np.isnan(p) and used == 0 and not exact
    assert np.isnan(stats.paired_test(d, np.zeros(40), clusters, n_boot=10, n_perm=0).p_value)
    with pytest.raises(ValueError, match="n_perm must be >= 0"):
        stats.sign_flip_pvalue(d, clusters, n_perm=-1)
    for confidence in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="confidence must be in"):
            stats.bootstrap_ci(d, clusters, n_boot=10, confidence=confidence)
    with pytest.raises(ValueError, match="n_boot must be >= 0"):
        stats.bootstrap_ci(d, clusters, n_boot=-5)
