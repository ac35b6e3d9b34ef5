"""Graded relevance: nDCG@K against torchmetrics' RetrievalNormalizedDCG, hand cases, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.retrieval import RetrievalNormalizedDCG

from cxrlib import graded


def _unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_gains_hand_cases():
    q = np.array([[1, 0, 0], [0, 0, 0]], bool)
    g = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_allclose(graded.jaccard_gains(q, g).numpy(), [[1, 0.5, 0], [0, 0, 1]])
    np.testing.assert_allclose(graded.f1_gains(q, g).numpy(), [[1, 2 / 3, 0], [0, 0, 1]])


def test_ndcg_and_label_f1_hand_case():
    # query {A}; gallery: 0 = {A}, 1 = {A, B}, 2 = {} ; ranking 1, 2, 0 by score
    q_emb = _unit([[1, 0]])
    g_emb = _unit([[-1, 0.1], [1, 0.05], [0.5, 1]])
    sets_q = np.array([[1, 0]], bool)
    sets_g = np.array([[1, 0], [1, 1], [0, 0]], bool)
    out = graded.graded_scores(q_emb, g_emb, sets_q, [True], sets_g, [True] * 3, ks=(1, 2))
    ideal2 = 1 + 0.5 / math.log2(3)
    assert out[("ndcg", 1)][0] == pytest.approx(0.5)
    assert out[("ndcg", 2)][0] == pytest.approx(0.5 / ideal2)
    assert out[("label_f1", 2)][0] == pytest.approx((2 / 3 + 0) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_equals_torchmetrics(seed):
    rng = np.random.default_rng(seed)
    n, m, d, f = 20, 30, 8, 5
    q, g = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((m, d)))
    sq, sg = rng.random((n, f)) < 0.3, rng.random((m, f)) < 0.3
    gains = graded.jaccard_gains(sq, sg)
    for k in (1, 5, 10):
        ours = graded.graded_scores(q, g, sq, np.ones(n, bool), sg, np.ones(m, bool), ks=(k,))[("ndcg", k)]
        metric = RetrievalNormalizedDCG(top_k=k, empty_target_action="skip")
        s = torch.from_numpy(q) @ torch.from_numpy(g).T
        idx = torch.arange(n)[:, None].expand_as(s)
        ref = float(metric(s.reshape(-1), gains.float().reshape(-1), indexes=idx.reshape(-1)))
        assert np.nanmean(ours) == pytest.approx(ref, abs=1e-5)


def test_label_sets_drop_no_finding_and_mark_unknown_rows():
    f = np.array([[1, 0, np.nan], [np.nan, np.nan, np.nan], [0, 1, 1]], np.float32)
    sets, known = graded.label_sets(f, ["No Finding", "Edema", "Atelectasis"])
    np.testing.assert_array_equal(sets, [[False, False], [False, False], [True, True]])
    np.testing.assert_array_equal(known, [True, False, True])


def test_unknown_query_sets_are_excluded_and_unknown_gallery_items_gain_nothing():
    q = _unit([[1, 0], [1, 0]])
    g = _unit([[1, 0.01], [0.2, 1]])
    sets = np.array([[1], [1]], bool)
    out = graded.graded_scores(q, g, sets, [True, False], sets, [False, True], ks=(1,))
    assert out[("ndcg", 1)][0] == 0.0  # best-scored item has an unknown set: gain 0; the ideal is 1
    assert np.isnan(out[("ndcg", 1)][1])


def test_no_finding_labels_is_a_clear_error():
    with pytest.raises(graded.NoFindingLabels, match="finding labels"):
        graded.label_sets(None)


def test_chance_equals_the_mean_over_random_rankings():
    rng = np.random.default_rng(0)
    n, f, k = 12, 4, 3
    sets = rng.random((n, f)) < 0.4
    known = np.ones(n, bool)
    chance = graded.graded_chance(sets, known, sets, known, ks=(k,))
    sims = []
    for _ in range(3000):
        e = _unit(rng.standard_normal((n, 6)))
        sims.append(graded.graded_scores(e, _unit(rng.standard_normal((n, 6))), sets, known, sets, known,
                                         ks=(k,))[("ndcg", k)])
    assert np.nanmean(chance[("ndcg", k)]) == pytest.approx(np.nanmean(sims), abs=0.01)
