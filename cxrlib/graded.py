"""Clinically graded relevance: nDCG@K and label-F1@K from the overlap of finding labels.

Exact-pair recall calls every report but the study's own a miss, however close it is clinically;
label match calls any report of the same normal/abnormal class a hit. Graded relevance sits between:
the gain of a retrieved item is the overlap of its finding labels with the query's.

* A study's *label set* is its positive findings among the 14 CheXpert-style columns
  (``cxrlib.datasets.labels.FINDING_LABELS``) except ``"No Finding"``: a normal study is the empty
  set. A finding that is 0 or NaN (not derivable) is not in the set. A study whose findings are all
  NaN has an *unknown* set: as a query it is excluded (NaN, counted); as a gallery item its gain is 0.
* ``ndcg@k``: gain = Jaccard(query set, item set), two empty sets = 1; DCG with the linear gain and
  ``1/log2(rank + 1)`` discount over the top k, divided by the ideal DCG of the same gallery (the
  definition of ``torchmetrics.retrieval.RetrievalNormalizedDCG``, which the tests use as reference).
  A query whose every gain is 0 has no ideal ranking: NaN, excluded and counted.
* ``label_f1@k``: mean over the top k of the F1 between the two label sets
  (``2|A & B| / (|A| + |B|)``, two empty sets = 1).

Heavier report metrics (BERTScore, F1-CheXbert, RadGraph F1) compare report texts with a model whose
weights this package does not ship: :mod:`cxrlib.report_metrics` computes them where the weights are
present locally, and the ``graded`` protocol (:mod:`cxrlib.protocols`) reports them beside nDCG and
label-F1, or records each one as a skipped metric with the missing file as its reason.
"""

from __future__ import annotations

import numpy as np
import torch

from cxrlib.datasets.labels import FINDING_LABELS

#: the finding that marks a normal study; it is not part of a label set (normal = the empty set)
NORMAL_FINDING = "No Finding"
GRADED_METRICS = ("ndcg", "label_f1")


class NoFindingLabels(ValueError):
    """Graded relevance was asked for on data without finding labels."""


def label_sets(findings: np.ndarray | None, columns: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(sets, known)``: [N, F] booleans (finding present) and [N] booleans (set known).

    ``columns`` names the columns of ``findings`` (default: the finding columns of
    :data:`FINDING_LABELS` except ``"No Finding"``, the order ``retrieval`` notebooks load them in);
    a ``"No Finding"`` column is dropped. No findings at all is a :class:`NoFindingLabels` error.
    """
    if findings is None or np.asarray(findings).size == 0:
        raise NoFindingLabels("graded relevance needs finding labels (the 14 CheXpert-style columns), and this "
                              "split has none; evaluate it with protocols that do not need them")
    f = np.asarray(findings, np.float32)
    if f.ndim != 2:
        raise ValueError(f"findings must be a 2-D [n, labels] array, got shape {f.shape}")
    if columns is not None:
        if len(columns) != f.shape[1]:
            raise ValueError(f"{len(columns)} column names for {f.shape[1]} finding columns")
        keep = [i for i, c in enumerate(columns) if c != NORMAL_FINDING]
        f = f[:, keep]
    known = ~np.isnan(f).all(axis=1)
    return np.nan_to_num(f, nan=0.0) == 1, known


def default_columns() -> list[str]:
    """The finding columns graded relevance uses: every CheXpert finding except ``"No Finding"``."""
    return [c for c in FINDING_LABELS if c != NORMAL_FINDING]


def _overlap(q: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersection sizes [b, N] and the set sizes of queries [b, 1] and gallery items [1, N]."""
    return q @ g.T, q.sum(1, keepdim=True), g.sum(1).unsqueeze(0)


def jaccard_gains(q_sets: np.ndarray, g_sets: np.ndarray) -> torch.Tensor:
    """Jaccard index of every (query, gallery item) pair of label sets; two empty sets = 1."""
    q, g = torch.as_tensor(q_sets, dtype=torch.float64), torch.as_tensor(g_sets, dtype=torch.float64)
    inter, nq, ng = _overlap(q, g)
    union = nq + ng - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def f1_gains(q_sets: np.ndarray, g_sets: np.ndarray) -> torch.Tensor:
    """F1 (Dice) of every (query, gallery item) pair of label sets; two empty sets = 1."""
    q, g = torch.as_tensor(q_sets, dtype=torch.float64), torch.as_tensor(g_sets, dtype=torch.float64)
    inter, nq, ng = _overlap(q, g)
    total = nq + ng
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(inter))


def discounts(k: int) -> torch.Tensor:
    """``1 / log2(rank + 1)`` for ranks 1..k."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))


def ndcg_from_top(gains: torch.Tensor, top: torch.Tensor, k: int) -> torch.Tensor:
    """nDCG@k of each row: ``gains`` [b, N] of every gallery item, ``top`` [b, >=k] the ranking's first items.

    NaN where the ideal DCG is 0 (no item has a positive gain).
    """
    d = discounts(k)
    dcg = (gains.gather(1, top[:, :k]) * d).sum(1)
    ideal = (gains.topk(min(k, gains.shape[1]), dim=1).values * d[:gains.shape[1]]).sum(1)
    return torch.where(ideal > 0, dcg / ideal.clamp(min=1e-300), torch.tensor(torch.nan, dtype=torch.float64))


def graded_scores(queries, gallery, q_sets: np.ndarray, q_known: np.ndarray, g_sets: np.ndarray,
                  g_known: np.ndarray, ks, chunk_size: int = 4096) -> dict[tuple[str, int], np.ndarray]:
    """Per-query ``ndcg`` and ``label_f1`` at each k of one query set against one gallery.

    Embeddings are L2-normalised rows (checked); the ranking is the one of
    :func:`cxrlib.retrieval.topk_similarity` (score, then gallery index). Queries with an unknown
    label set get NaN; gallery items with one have gain 0.
    """
    from cxrlib import retrieval

    q, g = retrieval.as_tensor(queries, "queries"), retrieval.as_tensor(gallery, "gallery")
    retrieval.check_normalised(q, "queries")
    retrieval.check_normalised(g, "gallery")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > len(g):
        raise ValueError(f"every k must be between 1 and the gallery size ({len(g)}), got {ks}")
    if len(q_sets) != len(q) or len(g_sets) != len(g):
        raise ValueError(f"label sets ({len(q_sets)}, {len(g_sets)}) do not match embeddings ({len(q)}, {len(g)})")
    gk = torch.as_tensor(np.asarray(g_known, bool))
    out = {(m, k): np.full(len(q), np.nan) for m in GRADED_METRICS for k in ks}
    step = retrieval.rows_per_block(len(g), chunk_size, retrieval.SCAN_BLOCK_ELEMENTS)
    for s in range(0, len(q), step):
        e = min(len(q), s + step)
        top = retrieval._block_topk(q[s:e] @ g.T, ks[-1])[1]
        jac = jaccard_gains(q_sets[s:e], g_sets) * gk
        f1 = f1_gains(q_sets[s:e], g_sets) * gk
        known = np.asarray(q_known[s:e], bool)
        for k in ks:
            out[("ndcg", k)][s:e] = np.where(known, ndcg_from_top(jac, top, k).numpy(), np.nan)
            out[("label_f1", k)][s:e] = np.where(known, f1.gather(1, top[:, :k]).mean(1).numpy(), np.nan)
    return out


def graded_chance(q_sets: np.ndarray, q_known: np.ndarray, g_sets: np.ndarray, g_known: np.ndarray,
                  ks) -> dict[tuple[str, int], np.ndarray]:
    """Expected per-query ``ndcg``/``label_f1`` at each k under a uniformly random ranking.

    Every rank's expected gain is the query's mean gain over the gallery, so E[DCG@k] is that mean
    times the sum of the first k discounts (the ideal DCG does not depend on the ranking).
    """
    gk = torch.as_tensor(np.asarray(g_known, bool))
    jac = jaccard_gains(q_sets, g_sets) * gk
    f1 = f1_gains(q_sets, g_sets) * gk
    known = np.asarray(q_known, bool)
    out = {}
    for k in sorted({int(k) for k in ks}):
        d = discounts(k)
        ideal = (jac.topk(min(k, jac.shape[1]), dim=1).values * d[:jac.shape[1]]).sum(1)
        expected = jac.mean(1) * d.sum()
        nd = torch.where(ideal > 0, expected / ideal.clamp(min=1e-300), torch.tensor(torch.nan, dtype=torch.float64))
        out[("ndcg", k)] = np.where(known, nd.numpy(), np.nan)
        out[("label_f1", k)] = np.where(known, f1.mean(1).numpy(), np.nan)
    return out
