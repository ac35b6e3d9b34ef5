"""Cross-modal retrieval: chunked similarity search (torch or faiss) and retrieval metrics.

Similarity is the dot product of L2-normalised embeddings (cosine). Queries are scored in blocks of
whole gallery rows, each block capped at :data:`MAX_BLOCK_ELEMENTS` scores, so the full
query x gallery matrix is never held, however large the gallery.

Ties are broken by gallery index everywhere (a lower index ranks first): ``topk_similarity`` and
the rank-based metrics agree item for item, and results never depend on a sort's internals.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

#: upper bound on the number of scores held at once (64 Mi float32 = 256 MiB)
MAX_BLOCK_ELEMENTS = 1 << 26
#: tolerance on the L2 norm of inputs that must be normalised
NORM_TOL = 1e-3


def as_tensor(x, name: str = "embeddings") -> torch.Tensor:
    """A float32 CPU tensor view of ``x`` (numpy or torch, 2-D); no copy when already float32."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    t = t.detach().to("cpu", torch.float32)
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [n, dim] array, got shape {tuple(t.shape)}")
    return t


def check_normalised(t: torch.Tensor, name: str) -> None:
    """Raise naming the first row whose L2 norm is not 1 (within :data:`NORM_TOL`) or is not finite."""
    norms = t.norm(dim=1)
    bad = ~(torch.isfinite(norms) & ((norms - 1).abs() <= NORM_TOL))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite and L2-normalised: row {i} has norm {float(norms[i]):.4g} "
                         f"({int(bad.sum())} bad rows)")


def rows_per_block(n_gallery: int, chunk_size: int) -> int:
    """Query rows scored at once: at most ``chunk_size`` and at most MAX_BLOCK_ELEMENTS scores."""
    return max(1, min(int(chunk_size), MAX_BLOCK_ELEMENTS // max(1, n_gallery)))


def _order_candidates(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's candidates by (score desc, index asc) and keep ``k``."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, by_score)[:, :k], indices.gather(1, by_score)[:, :k]


def _block_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row with ties broken by column index.

    ``torch.topk`` picks an arbitrary subset when several items tie with the k-th score; rows where
    that happens are redone with a stable full sort.
    """
    vals, idx = torch.topk(block, k, dim=1, largest=True, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    tied = (block == kth).sum(1) != (vals == kth).sum(1)
    vals, idx = _order_candidates(vals, idx, k)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        order = torch.argsort(block[rows], dim=1, descending=True, stable=True)[:, :k]
        idx[rows] = order
        vals[rows] = block[rows].gather(1, order)
    return vals, idx


def _topk_torch(q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int, progress: bool):
    n = len(q)
    step = rows_per_block(len(g), chunk_size)
    scores = torch.empty((n, k), dtype=torch.float32)
    indices = torch.empty((n, k), dtype=torch.int64)
    for s in tqdm(range(0, n, step), desc="top-k (torch)", disable=not progress, leave=False):
        block = q[s:s + step] @ g.T
        scores[s:s + step], indices[s:s + step] = _block_topk(block, k)
    return scores, indices


def _topk_faiss(q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int, progress: bool):
    """faiss ``IndexFlatIP``; rows whose k-th score may tie with unseen items are redone with torch."""
    import faiss

    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g.numpy())
    extra = min(len(g), k + 1)
    n = len(q)
    scores = torch.empty((n, k), dtype=torch.float32)
    indices = torch.empty((n, k), dtype=torch.int64)
    step = max(1, int(chunk_size))
    for s in tqdm(range(0, n, step), desc="top-k (faiss)", disable=not progress, leave=False):
        d, i = index.search(q[s:s + step].numpy(), extra)
        d, i = torch.from_numpy(d), torch.from_numpy(i)
        vals, idx = _order_candidates(d, i, k)
        if extra > k:  # the (k+1)-th equals the k-th: the selected set among ties is arbitrary
            tied = (d[:, k] >= vals[:, -1]).nonzero().squeeze(1)
            if len(tied):
                vals[tied], idx[tied] = _topk_torch(q[s:s + step][tied], g, k, chunk_size, False)
        scores[s:s + step], indices[s:s + step] = vals, idx
    return scores, indices


def topk_similarity(queries, gallery, k: int, chunk_size: int = 4096, backend: str = "torch",
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items by cosine similarity for every query: ``(scores, indices)``, both [n, k].

    Inputs are numpy arrays or torch tensors of L2-normalised rows (checked). ``backend="torch"``
    scores blocks of at most ``chunk_size`` queries (fewer for a huge gallery, see
    :func:`rows_per_block`); ``"faiss"`` searches an exact ``IndexFlatIP``. Both order results by
    score, then by gallery index, so they return the same items.
    """
    q, g = as_tensor(queries, "queries"), as_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but the gallery has dim {g.shape[1]}")
    if not 1 <= k <= len(g):
        raise ValueError(f"k={k} must be between 1 and the gallery size ({len(g)})")
    check_normalised(q, "queries")
    check_normalised(g, "gallery")
    if backend == "torch":
        s, i = _topk_torch(q, g, k, chunk_size, progress)
    elif backend == "faiss":
        s, i = _topk_faiss(q, g, k, chunk_size, progress)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'faiss'")
    return s.numpy(), i.numpy()


def label_precision_at_k(query_emb, gallery_emb, query_labels, gallery_labels, k: int) -> float:
    """Mean over queries of the fraction of the top-``k`` gallery items sharing the query's label.

    The label-match Precision@K of cross-modal retrieval (relevant = same normal/abnormal label);
    cheap enough for early stopping on a validation split.
    """
    ql, gl = np.asarray(query_labels).reshape(-1), np.asarray(gallery_labels).reshape(-1)
    if len(ql) != len(query_emb) or len(gl) != len(gallery_emb):
        raise ValueError(f"labels ({len(ql)}, {len(gl)}) do not match embeddings "
                         f"({len(query_emb)}, {len(gallery_emb)})")
    _, idx = topk_similarity(query_emb, gallery_emb, k)
    return float((gl[idx] == ql[:, None]).mean())
