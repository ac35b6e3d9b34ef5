"""Cross-modal retrieval: chunked similarity search (torch or faiss) and retrieval metrics.

Similarity is the dot product of L2-normalised embeddings (cosine). Queries are scored in blocks of
whole gallery rows, each block capped at :data:`MAX_BLOCK_ELEMENTS` scores, so the full
query x gallery matrix is never held, however large the gallery.

Ties are broken by gallery index everywhere (a lower index ranks first): ``topk_similarity`` and
the rank-based metrics agree item for item, and results never depend on a sort's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cxrlib import stats
from cxrlib.pairs import PairedSplit

#: upper bound on the number of scores held at once by top-k search (64 Mi float32 = 256 MiB)
MAX_BLOCK_ELEMENTS = 1 << 26
#: the same for the metric scan, whose full-row sort (AP) holds a few block-sized temporaries
SCAN_BLOCK_ELEMENTS = 1 << 24
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


def rows_per_block(n_gallery: int, chunk_size: int, max_elements: int | None = None) -> int:
    """Query rows scored at once: at most ``chunk_size`` and at most ``max_elements`` scores
    (default :data:`MAX_BLOCK_ELEMENTS`)."""
    cap = MAX_BLOCK_ELEMENTS if max_elements is None else max_elements
    return max(1, min(int(chunk_size), cap // max(1, n_gallery)))


def _order_candidates(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row's candidates by (score desc, index asc) and keep ``k``."""
    by_index = torch.argsort(indices, dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)
    return scores.gather(1, by_score)[:, :k], indices.gather(1, by_score)[:, :k]


def _block_topk(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each row with ties broken by column index.

    ``torch.topk`` picks an arbitrary subset when several items tie with the k-th score. One extra
    candidate shows where that can happen (the (k+1)-th score equals the k-th); only those rows are
    redone with a stable full sort.
    """
    extra = min(k + 1, block.shape[1])
    vals, idx = torch.topk(block, extra, dim=1, largest=True, sorted=True)
    tied = vals[:, k] == vals[:, k - 1] if extra > k else torch.zeros(len(block), dtype=torch.bool, device=block.device)
    vals, idx = _order_candidates(vals[:, :k], idx[:, :k], k)
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        order = torch.argsort(block[rows], dim=1, descending=True, stable=True)[:, :k]
        idx[rows] = order
        vals[rows] = block[rows].gather(1, order)
    return vals, idx


def _topk_torch(q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int, progress: bool):
    """Blocks of up to ``chunk_size`` gallery items x as many queries as fit MAX_BLOCK_ELEMENTS;
    each block's exact top-k is merged into the running top-k (same order rule, so the merge is exact)."""
    n, m = len(q), len(g)
    g_step = max(1, min(int(chunk_size), m))
    q_step = max(1, min(n, MAX_BLOCK_ELEMENTS // g_step))
    scores = torch.empty((n, k), dtype=torch.float32, device=q.device)
    indices = torch.empty((n, k), dtype=torch.int64, device=q.device)
    with tqdm(total=n * m, desc="top-k (torch)", disable=not progress, leave=False, unit="pair",
              unit_scale=True) as bar:
        for s in range(0, n, q_step):
            qb = q[s:s + q_step]
            best_s = best_i = None
            for t in range(0, m, g_step):
                block = qb @ g[t:t + g_step].T
                bs, bi = _block_topk(block, min(k, block.shape[1]))
                bi += t
                if best_s is None:
                    best_s, best_i = bs, bi
                else:
                    best_s, best_i = _order_candidates(torch.cat([best_s, bs], 1), torch.cat([best_i, bi], 1), k)
                bar.update(block.numel())
            scores[s:s + q_step], indices[s:s + q_step] = best_s, best_i
    return scores, indices


def _topk_faiss(q: torch.Tensor, g: torch.Tensor, k: int, chunk_size: int, progress: bool, device: str = "cpu"):
    """faiss ``IndexFlatIP`` (on the GPU when ``device`` is CUDA and faiss-gpu is installed); rows whose
    k-th score may tie with unseen items are redone with torch."""
    import faiss

    index = faiss.IndexFlatIP(g.shape[1])
    if str(device).startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), torch.device(device).index or 0, index)
    index.add(g.numpy())
    extra = min(len(g), k + 1)
    n = len(q)
    g_dev = g.to(device)
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
                tv, ti = _topk_torch(q[s:s + step][tied].to(device), g_dev, k, chunk_size, False)
                vals[tied], idx[tied] = tv.cpu(), ti.cpu()
        scores[s:s + step], indices[s:s + step] = vals, idx
    return scores, indices


def topk_similarity(queries, gallery, k: int, chunk_size: int = 4096, backend: str = "torch",
                    progress: bool = False, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery items by cosine similarity for every query: ``(scores, indices)``, both [n, k].

    Inputs are numpy arrays or torch tensors of L2-normalised rows (checked). ``backend="torch"``
    scores blocks of ``chunk_size`` gallery items against as many queries as keep a block under
    :data:`MAX_BLOCK_ELEMENTS` scores and merges each block's top-k; ``"faiss"`` searches an exact
    ``IndexFlatIP`` ``chunk_size`` queries at a time. Both order results by
    score, then by gallery index, so they return the same items. ``device`` (e.g. ``cuda``) is where
    the scores are computed: the torch blocks, or faiss's GPU index when faiss-gpu is installed.
    """
    q, g = as_tensor(queries, "queries"), as_tensor(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"queries have dim {q.shape[1]} but the gallery has dim {g.shape[1]}")
    if not 1 <= k <= len(g):
        raise ValueError(f"k={k} must be between 1 and the gallery size ({len(g)})")
    check_normalised(q, "queries")
    check_normalised(g, "gallery")
    if backend == "torch":
        s, i = _topk_torch(q.to(device), g.to(device), k, chunk_size, progress)
    elif backend == "faiss":
        s, i = _topk_faiss(q, g, k, chunk_size, progress, device)
    else:
        raise ValueError(f"unknown backend {backend!r}; choose 'torch' or 'faiss'")
    return s.cpu().numpy(), i.cpu().numpy()


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


# --- per-query metrics -------------------------------------------------------------------------

DIRECTIONS = ("image_to_text", "text_to_image")
GALLERIES = ("raw", "merged")
QUERY_CLASSES = ("all", "normal", "abnormal")
#: metric -> how a per-query vector is summarised (all others are means of per-query values)
SUMMARY = {"median_rank": "median"}


def _first_relevant_rank(block: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's best relevant item (ties by index), NaN where none is relevant.

    Counted, not sorted: items scoring higher, plus items scoring equal at a lower index.
    """
    masked = torch.where(rel, block, torch.tensor(-torch.inf))
    best = masked.max(dim=1, keepdim=True).values
    first = (rel & (block == best)).to(torch.uint8).argmax(dim=1, keepdim=True)
    cols = torch.arange(block.shape[1]).unsqueeze(0)
    ahead = (block > best).sum(1) + ((block == best) & (cols < first)).sum(1)
    rank = (ahead + 1).to(torch.float64)
    rank[~rel.any(1)] = torch.nan
    return rank


def _ranking(block: torch.Tensor) -> torch.Tensor:
    """Each row's gallery indices by (score desc, index asc).

    Equal to a stable descending argsort, but about 2-3x faster: scores map to integers of the same
    order (IEEE-754 bit trick), combined with the index into unique keys, so an unstable sort is exact.
    """
    x = (block + 0.0).numpy()  # -0.0 -> +0.0: they compare equal, so they must tie
    bits = x.view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # integer order == float order
    keys = -ordered * x.shape[1] + np.arange(x.shape[1])
    return torch.from_numpy(np.argsort(keys, axis=1))


def _average_precision(order: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """AP over the full ranking ``order`` (each row's gallery indices, best first); NaN where nothing is relevant."""
    r = rel.gather(1, order).to(torch.float64)
    hits = r.cumsum(1)
    prec = hits / torch.arange(1, r.shape[1] + 1, dtype=torch.float64)
    n_rel = r.sum(1)
    return torch.where(n_rel > 0, (prec * r).sum(1) / n_rel.clamp(min=1), torch.tensor(torch.nan, dtype=torch.float64))


def scan_metrics(queries, gallery, relevance: dict, ks, chunk_size: int = 4096,
                 progress: bool = False) -> dict[tuple[str, str, int], np.ndarray]:
    """Per-query metrics of one query set against one gallery, for several relevance definitions.

    ``relevance`` maps a name to ``(fn, kinds)``: ``fn(start, stop)`` returns the [rows, gallery]
    boolean relevance of queries ``start:stop``; ``kinds`` is a subset of ``{"rank", "topk", "ap"}``.
    Returns ``{(name, metric, k): values}`` with metrics ``rank`` (of the best relevant item),
    ``precision``/``hit`` at each k (``"topk"``) and ``ap``; k is 0 for k-free metrics. A query with no
    relevant item gets NaN (callers count and exclude it). Scores are computed once per block.
    """
    q, g = as_tensor(queries, "queries"), as_tensor(gallery, "gallery")
    check_normalised(q, "queries")
    check_normalised(g, "gallery")
    ks = sorted({int(k) for k in ks})
    if any(k < 1 or k > len(g) for k in ks):
        raise ValueError(f"every k must be between 1 and the gallery size ({len(g)}), got {ks}")
    n = len(q)
    out: dict[tuple[str, str, int], np.ndarray] = {}
    for name, (_, kinds) in relevance.items():
        unknown = set(kinds) - {"rank", "topk", "ap"}
        if unknown:
            raise ValueError(f"relevance {name!r}: unknown metric kinds {sorted(unknown)}")
        keys = [("rank", 0)] * ("rank" in kinds) + [("ap", 0)] * ("ap" in kinds)
        keys += [(m, k) for k in ks for m in ("precision", "hit")] if "topk" in kinds else []
        out.update({(name, m, k): np.full(n, np.nan) for m, k in keys})
    step = rows_per_block(len(g), chunk_size, SCAN_BLOCK_ELEMENTS)
    need_topk = any("topk" in kinds for _, kinds in relevance.values())
    for s in tqdm(range(0, n, step), desc="retrieval metrics", disable=not progress, leave=False):
        e = min(n, s + step)
        block = q[s:e] @ g.T
        top = _block_topk(block, ks[-1])[1] if need_topk and ks else None
        order = None  # the full ranking (stable sort: ties by index), computed once if any AP is asked for
        for name, (fn, kinds) in relevance.items():
            rel = torch.as_tensor(fn(s, e), dtype=torch.bool)
            if rel.shape != block.shape:
                raise ValueError(f"relevance {name!r} returned shape {tuple(rel.shape)}, expected {tuple(block.shape)}")
            has = rel.any(1).numpy()
            if "rank" in kinds:
                out[(name, "rank", 0)][s:e] = _first_relevant_rank(block, rel).numpy()
            if "ap" in kinds:
                if order is None:
                    order = _ranking(block)
                out[(name, "ap", 0)][s:e] = _average_precision(order, rel).numpy()
            if "topk" in kinds and top is not None:
                rel_top = rel.gather(1, top).numpy()
                for k in ks:
                    out[(name, "precision", k)][s:e] = np.where(has, rel_top[:, :k].mean(1), np.nan)
                    out[(name, "hit", k)][s:e] = np.where(has, rel_top[:, :k].any(1), np.nan)
    return out


# --- a paired split: both directions, every metric, CIs ----------------------------------------

#: tidy columns of :func:`summarise` / :func:`evaluate_pairs` (see its docstring)
COLUMNS = ["model", "direction", "gallery", "query_class", "metric", "k", "value", "ci_low", "ci_high",
           "n", "n_excluded", "n_patients", "gallery_size", "note"]
PAIRED_COLUMNS = ["model_a", "model_b", "direction", "gallery", "query_class", "metric", "k", "value_a",
                  "value_b", "diff", "ci_low", "ci_high", "p_value", "n", "n_patients", "n_perm", "exact"]

ScoreKey = tuple  # (direction, gallery, metric, k); k = 0 for k-free metrics


@dataclass
class QueryScores:
    """Per-query metric values of one model on one split (NaN = query excluded: nothing relevant).

    ``skipped`` maps keys that were not computed (k larger than the gallery) to the reason.
    """

    model: str
    values: dict[ScoreKey, np.ndarray]
    gallery_size: dict[tuple[str, str], int]
    skipped: dict[ScoreKey, str]
    labels: np.ndarray
    patient_ids: np.ndarray
    study_ids: np.ndarray


def _binary_findings(findings: np.ndarray | None) -> np.ndarray | None:
    """Positive finding indicators (1 = present; 0 and NaN = not present), or None if none is positive."""
    if findings is None or findings.size == 0:
        return None
    pos = np.nan_to_num(np.asarray(findings, np.float32), nan=0.0) == 1
    return pos.astype(np.float32) if pos.any() else None


def group_representatives(emb: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(embeddings, group ids)``: one item per report group for the merged gallery, in group-id order.

    A group's item is the mean of its members' embeddings, re-normalised. Members share their normalised
    text but not always their raw text (case, punctuation, the removed ``XXXX``), so their embeddings can
    differ; unlike "the first member", the mean does not depend on the order of the rows.
    """
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    emb = np.asarray(emb, dtype=np.float64)
    sums = np.zeros((len(keys), emb.shape[1]), np.float64)
    np.add.at(sums, inverse, emb)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"report group {keys[np.flatnonzero(norms[:, 0] == 0)[0]]}: its members' embeddings "
                         "sum to zero, so the group has no mean direction")
    return (sums / norms).astype(np.float32), keys


def query_scores(split: PairedSplit, model_name: str, ks=(1, 5, 10), chunk_size: int = 4096,
                 progress: bool = False) -> QueryScores:
    """Every per-query metric of ``split`` in both directions (see :func:`evaluate_pairs`)."""
    n = len(split)
    ks = sorted({int(k) for k in ks})
    groups = np.asarray(split.report_groups)
    labels = np.asarray(split.labels)
    fpos = _binary_findings(split.findings)
    idx = torch.arange(n)
    values: dict[ScoreKey, np.ndarray] = {}
    sizes: dict[tuple[str, str], int] = {}
    skipped: dict[ScoreKey, str] = {}

    def key_rel(qkey, gkey):
        qk, gk = torch.as_tensor(np.asarray(qkey)), torch.as_tensor(np.asarray(gkey))
        return lambda s, e: qk[s:e, None] == gk[None, :]

    lab_rel = key_rel(labels, labels)
    if fpos is not None:
        ft = torch.from_numpy(fpos)

        def find_rel(s, e):
            return (ft[s:e] @ ft.T) > 0

    for direction in DIRECTIONS:
        q, g = (split.img, split.txt) if direction == "image_to_text" else (split.txt, split.img)
        merged_gallery, merged_keys = group_representatives(g, groups) if direction == "image_to_text" else (g, groups)
        passes = {"raw": (g, {"pair": (key_rel(idx, idx), {"rank"}), "label": (lab_rel, {"topk", "ap"})}),
                  "merged": (merged_gallery, {"pair": (key_rel(groups, merged_keys), {"rank"})})}
        if fpos is not None:
            passes["raw"][1]["finding"] = (find_rel, {"topk", "ap"})
        for gallery, (gal, rel) in passes.items():
            size = len(gal)
            sizes[(direction, gallery)] = size
            ok = [k for k in ks if k <= size]
            for k in sorted(set(ks) - set(ok)):
                names = ["recall"] + [f"{r}_{m}" for r in rel if r != "pair" for m in ("precision", "hit")]
                for m in names:
                    skipped[(direction, gallery, m, k)] = f"k={k} exceeds the {gallery} gallery size ({size})"
            raw = scan_metrics(q, gal, rel, ok, chunk_size=chunk_size, progress=progress)
            for (name, metric, k), v in raw.items():
                if name == "pair":  # rank -> recall@k, reciprocal rank, rank
                    values[(direction, gallery, "mrr", 0)] = 1.0 / v
                    values[(direction, gallery, "median_rank", 0)] = v
                    for kk in ok:
                        values[(direction, gallery, "recall", kk)] = np.where(np.isnan(v), np.nan, v <= kk)
                else:
                    values[(direction, gallery, f"{name}_{'map' if metric == 'ap' else metric}", k)] = v
    return QueryScores(model_name, values, sizes, skipped, labels, np.asarray(split.patient_ids),
                       np.asarray(split.study_ids))


def _class_masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {"all": np.ones(len(labels), bool), "normal": labels == 0, "abnormal": labels == 1}


def summarise(scores: QueryScores, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Tidy table of point estimates and patient-bootstrap CIs, per query class (see evaluate_pairs)."""
    rows = []
    masks = _class_masks(scores.labels)
    for (direction, gallery, metric, k), v in scores.values.items():
        for cls, mask in masks.items():
            base = dict(model=scores.model, direction=direction, gallery=gallery, query_class=cls,
                        metric=metric, k=k or pd.NA, gallery_size=scores.gallery_size[(direction, gallery)])
            if not mask.any():
                rows.append({**base, "value": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": 0,
                             "n_excluded": 0, "n_patients": 0, "note": f"no {cls} queries in the split"})
                continue
            vm = v[mask]
            iv = stats.bootstrap_ci(vm, scores.patient_ids[mask], n_boot, seed, SUMMARY.get(metric, "mean"),
                                    confidence)
            excluded = int(np.isnan(vm).sum())
            note = f"{excluded} queries without a relevant item excluded" if excluded else ""
            if iv.n and np.isnan(iv.ci_low) and n_boot > 0:
                note = "; ".join(filter(None, [note, "fewer than 2 patients: no CI"]))
            rows.append({**base, "value": iv.value, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n": iv.n,
                         "n_excluded": excluded, "n_patients": iv.n_clusters, "note": note})
    for (direction, gallery, metric, k), reason in scores.skipped.items():
        for cls in masks:
            rows.append(dict(model=scores.model, direction=direction, gallery=gallery, query_class=cls,
                             metric=metric, k=k, value=np.nan, ci_low=np.nan, ci_high=np.nan, n=0, n_excluded=0,
                             n_patients=0, gallery_size=scores.gallery_size[(direction, gallery)], note=reason))
    df = pd.DataFrame(rows, columns=COLUMNS)
    df["k"] = df["k"].astype("Int64")
    return df.sort_values(["model", "direction", "gallery", "query_class", "metric", "k"],
                          kind="stable", ignore_index=True)


def evaluate_pairs(split: PairedSplit, model_name: str, ks=(1, 5, 10), n_boot: int = 1000, seed: int = 0,
                   chunk_size: int = 4096, confidence: float = 0.95, progress: bool = False) -> pd.DataFrame:
    """Image-to-text and text-to-image retrieval metrics of one model with patient-bootstrap CIs.

    Tidy columns (:data:`COLUMNS`): ``model``; ``direction`` (``image_to_text``/``text_to_image``);
    ``gallery``: ``raw`` (every study's item is separate) or ``merged`` (identical report texts,
    ``split.report_groups``, count as one item: image-to-text searches one text per group (the members'
    mean embedding, re-normalised: :func:`group_representatives`) and a hit is the query's group;
    text-to-image counts any image whose report is identical as a hit);
    ``query_class`` (``all``/``normal``/``abnormal``); ``metric``; ``k`` (empty for k-free metrics);
    ``value`` with ``ci_low``/``ci_high``; ``n`` queries used, ``n_excluded`` queries without a relevant
    item, ``n_patients``, ``gallery_size``, ``note`` (exclusions, skipped k). Metrics:

    * exact pair (raw and merged): ``recall`` (@k), ``mrr``, ``median_rank`` (1-based; median, not mean);
    * label relevance (same normal/abnormal label, raw gallery): ``label_precision``/``label_hit`` (@k),
      ``label_map`` (AP over the whole ranking);
    * finding overlap (shares at least one positive finding of ``split.findings``; only when findings
      exist): ``finding_precision``/``finding_hit`` (@k), ``finding_map``.

    Ties rank by gallery index (a deterministic stand-in for a random tie-break): on the raw gallery a
    verbatim duplicate of the true report ties with it exactly, which is why the merged gallery exists.
    A k larger than a gallery gives a NaN row whose note says so.
    """
    scores = query_scores(split, model_name, ks, chunk_size=chunk_size, progress=progress)
    return summarise(scores, n_boot=n_boot, seed=seed, confidence=confidence)


def compare_models(a: QueryScores, b: QueryScores, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0,
                   confidence: float = 0.95) -> pd.DataFrame:
    """Paired tests of model ``a`` minus model ``b`` on the same queries, for every mean-type metric.

    Columns :data:`PAIRED_COLUMNS`: ``diff`` = value_a - value_b with its patient-bootstrap CI and the
    two-sided patient sign-flip permutation ``p_value`` (``exact`` when all flips were enumerated).
    A class whose queries all lack a relevant item has no row (its exclusion is in :func:`summarise`).
    """
    if not np.array_equal(a.study_ids, b.study_ids):
        raise ValueError(f"models {a.model!r} and {b.model!r} were evaluated on different queries")
    rows = []
    for key in a.values:
        direction, gallery, metric, k = key
        if key not in b.values or SUMMARY.get(metric, "mean") != "mean":
            continue
        for cls, mask in _class_masks(a.labels).items():
            if not mask.any():
                continue
            r = stats.paired_test(a.values[key][mask], b.values[key][mask], a.patient_ids[mask], n_boot,
                                  n_perm, seed, confidence)
            if r.n == 0:  # every query of the class excluded (no relevant item): summarise() states it
                continue
            rows.append(dict(model_a=a.model, model_b=b.model, direction=direction, gallery=gallery,
                             query_class=cls, metric=metric, k=k or pd.NA, value_a=r.value_a, value_b=r.value_b,
                             diff=r.diff, ci_low=r.ci_low, ci_high=r.ci_high, p_value=r.p_value, n=r.n,
                             n_patients=r.n_clusters, n_perm=r.n_perm, exact=r.exact))
    df = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    df["k"] = df["k"].astype("Int64")
    return df


# --- the models of a comparison moved to cxrlib.models; these names stay importable from here ----
from cxrlib.models import (  # noqa: E402,F401  (re-exported for callers not yet moved: cxrlib.search)
    ModelSpec,
    apply_projector,
    load_eval_split,
    load_model_split,
    projector_path,
)


def example_queries(labels: np.ndarray, seed: int, per_class: int = 1) -> np.ndarray:
    """Query indices for example galleries: ``per_class`` of each label present, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    out = [rng.choice(np.flatnonzero(labels == c), size=min(per_class, int((labels == c).sum())), replace=False)
           for c in np.unique(labels)]
    return np.concatenate(out).astype(np.int64) if out else np.array([], np.int64)
