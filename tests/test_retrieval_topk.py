"""topk_similarity and label_precision_at_k against naive references (full matrix + lexsort, loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrlib import retrieval


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_topk(q, g, k):
    """Full score matrix in float64-free torch, ordered by (score desc, index asc) with np.lexsort."""
    s = (torch.from_numpy(q) @ torch.from_numpy(g).T).numpy()
    idx = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
    return np.take_along_axis(s, idx, 1), idx


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_topk_matches_naive(backend, chunk):
    rng = np.random.default_rng(0)
    q, g = _unit(rng, 37, 16), _unit(rng, 101, 16)
    s, i = retrieval.topk_similarity(q, g, 10, chunk_size=chunk, backend=backend)
    s_ref, i_ref = _naive_topk(q, g, 10)
    np.testing.assert_array_equal(i, i_ref)
    np.testing.assert_allclose(s, s_ref, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_topk_ties_break_by_gallery_index(backend):
    rng = np.random.default_rng(1)
    base = _unit(rng, 4, 8)
    # a gallery of many exact duplicates: ties everywhere, including across the k-th position
    g = base[rng.integers(0, 4, size=60)]
    q = base[[0, 1, 2, 3, 0]]
    s, i = retrieval.topk_similarity(q, g, 5, backend=backend)
    _, i_ref = _naive_topk(q, g, 5)
    np.testing.assert_array_equal(i, i_ref)
    for row in range(len(q)):  # hand check: the first 5 duplicates of the query, in gallery order
        dup = np.flatnonzero((g == q[row]).all(1))
        np.testing.assert_array_equal(i[row], dup[:5])


def test_topk_accepts_torch_and_small_blocks(monkeypatch):
    rng = np.random.default_rng(2)
    q, g = _unit(rng, 20, 8), _unit(rng, 50, 8)
    monkeypatch.setattr(retrieval, "MAX_BLOCK_ELEMENTS", 120)  # forces 2-row blocks
    assert retrieval.rows_per_block(50, 4096) == 2
    s, i = retrieval.topk_similarity(torch.from_numpy(q), torch.from_numpy(g), 3)
    np.testing.assert_array_equal(i, _naive_topk(q, g, 3)[1])


def test_topk_bad_input_errors():
    rng = np.random.default_rng(3)
    q, g = _unit(rng, 5, 8), _unit(rng, 6, 8)
    with pytest.raises(ValueError, match="gallery size"):
        retrieval.topk_similarity(q, g, 7)
    with pytest.raises(ValueError, match="row 2"):
        bad = q.copy()
        bad[2] *= 3
        retrieval.topk_similarity(bad, g, 2)
    with pytest.raises(ValueError, match="dim"):
        retrieval.topk_similarity(q, g[:, :4], 2)
    with pytest.raises(ValueError, match="backend"):
        retrieval.topk_similarity(q, g, 2, backend="annoy")


def test_label_precision_matches_loop():
    rng = np.random.default_rng(4)
    q, g = _unit(rng, 30, 8), _unit(rng, 40, 8)
    ql, gl = rng.integers(0, 2, 30), rng.integers(0, 2, 40)
    k = 5
    hits = []
    for a in range(30):  # naive: score every pair, sort with Python's stable sort on (-score, index)
        sims = [(-float(np.dot(q[a], g[b])), b) for b in range(40)]
        top = [b for _, b in sorted(sims)[:k]]
        hits.append(np.mean([gl[b] == ql[a] for b in top]))
    assert retrieval.label_precision_at_k(q, g, ql, gl, k) == pytest.approx(np.mean(hits), abs=1e-12)


def test_label_precision_hand_case():
    # 2-d: queries on the axes; gallery items near each axis with known labels
    q = np.array([[1, 0], [0, 1]], np.float32)
    g = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8]], np.float32)
    ql, gl = np.array([0, 1]), np.array([0, 1, 1, 1])
    # query 0 top-2: items 0 (label 0), 1 (label 1) -> 1/2; query 1 top-2: 2, 3 (both 1) -> 1
    assert retrieval.label_precision_at_k(q, g, ql, gl, 2) == pytest.approx(0.75)


def test_ranking_equals_stable_argsort_with_signed_zeros_and_ties():
    rng = np.random.default_rng(5)
    values = np.array([-1, -0.5, -0.0, 0.0, 1e-30, -1e-30, 0.3, 0.3, 1], np.float32)
    for block in (torch.from_numpy(rng.choice(values, (30, 80))), torch.randn(20, 64)):
        expected = torch.argsort(block, dim=1, descending=True, stable=True)
        assert torch.equal(retrieval._ranking(block), expected)
