"""The retrieval protocols of the field, by name: one ranking, several definitions of a hit.

Papers report "Recall@K" and "Precision@K" under incompatible rules (how verbatim-duplicate reports
count, whether any same-label report is a hit). Each protocol here is a documented function of the
same cosine ranking (:mod:`cxrlib.retrieval`: score, then gallery index), registered by name, so every
number in ``retrieval.csv`` says which published protocol it follows and what chance would score.

Protocols (``PROTOCOLS``; :func:`get_protocol` lists them on a wrong name):

* ``strict`` - only the study's own report (image) is a hit;
* ``unique_text`` - the text gallery is the set of unique report strings;
* ``duplicate_positive`` - every item whose canonicalised text equals the query's is a hit;
* ``label_match`` - relevant = same normal/abnormal label (the paper's task);
* ``label_match_class`` - relevant = same one-hot class (BenchX MIMIC-5x200);
* ``finding_overlap`` - relevant = shares a positive finding (this package's own);
* ``graded`` - nDCG@K and label-F1@K with finding-overlap gains (:mod:`cxrlib.graded`), and the heavier
  report metrics of :mod:`cxrlib.report_metrics` (BERTScore, F1-CheXbert, RadGraph F1) where their
  weights are present locally; each one absent is a skipped metric with its reason.

Each protocol fills a ``gallery`` value of :data:`cxrlib.retrieval.COLUMNS` (``raw``, ``merged``,
``duplicates``) and metric names such that ``(gallery, metric)`` names the protocol; the tidy table
adds ``protocol`` and ``chance`` (the metric's expected value under a uniformly random ranking of the
same gallery, averaged over the same queries; NaN where no closed form is used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from cxrlib import graded, report_metrics, retrieval
from cxrlib.pairs import PairedSplit

#: the column of a study table holding a one-hot class (written by the MIMIC-5x200 builder)
CLASS_COLUMN = "onehot_label"
#: tidy columns: retrieval's, with the protocol and its chance level
COLUMNS = (retrieval.COLUMNS[:2] + ["protocol"] + retrieval.COLUMNS[2:9] + ["chance"] + retrieval.COLUMNS[9:])
PAIRED_COLUMNS = retrieval.PAIRED_COLUMNS[:3] + ["protocol"] + retrieval.PAIRED_COLUMNS[3:]


@dataclass
class Pass:
    """One protocol in one direction: queries, gallery, and either a boolean relevance or graded values.

    ``relevance(start, stop)`` returns the [rows, gallery] relevance of queries ``start:stop``;
    ``kinds`` are :func:`cxrlib.retrieval.scan_metrics` kinds; ``prefix`` names top-k metrics
    (``"label"`` -> ``label_precision``). ``values``/``chance`` are filled directly by graded protocols,
    ``skipped_metrics`` (metric -> reason) names metrics of the pass that cannot run here.
    """

    queries: np.ndarray
    gallery: np.ndarray
    relevance: Callable[[int, int], torch.Tensor] | None = None
    kinds: frozenset = frozenset()
    prefix: str = ""
    values: dict = field(default_factory=dict)
    chance: dict = field(default_factory=dict)
    skipped_metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Protocol:
    """A named protocol: ``build(split, direction, ks, chunk_size) -> Pass``; ``None`` from
    ``requires(split)`` means it applies, a string is the reason it is skipped."""

    name: str
    gallery: str
    metrics: tuple[str, ...]
    follows: str
    build: Callable[..., Pass]
    requires: Callable[[PairedSplit], str | None] = lambda split: None


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, gallery: str, metrics: tuple[str, ...], follows: str,
                      requires: Callable[[PairedSplit], str | None] | None = None):
    """Decorator: register ``build`` under ``name`` (the docstring of ``build`` documents the protocol)."""
    def wrap(build):
        PROTOCOLS[name] = Protocol(name, gallery, metrics, follows, build, requires or (lambda split: None))
        return build
    return wrap


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name``; an unknown name is an error listing the valid ones."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown retrieval protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def resolve_protocols(names) -> list[Protocol]:
    """Protocols for a list of names (``None`` or ``"all"``: every registered one, in registry order)."""
    if names is None or names == "all":
        return list(PROTOCOLS.values())
    if isinstance(names, str):
        names = [names]
    return [get_protocol(n) for n in names]


def _pair(split: PairedSplit, direction: str) -> tuple[np.ndarray, np.ndarray]:
    if direction not in retrieval.DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {retrieval.DIRECTIONS}")
    return (split.img, split.txt) if direction == "image_to_text" else (split.txt, split.img)


def _key_relevance(q_keys, g_keys) -> Callable[[int, int], torch.Tensor]:
    qk, gk = torch.as_tensor(np.asarray(q_keys)), torch.as_tensor(np.asarray(g_keys))
    return lambda s, e: qk[s:e, None] == gk[None, :]


def report_strings(split: PairedSplit) -> np.ndarray:
    """Integer id of each row's exact report string (``split.table["report"]``)."""
    if "report" not in split.table:
        raise ValueError("the split's table has no 'report' column: unique_text needs the report strings")
    return pd.factorize(split.table["report"].astype(str))[0].astype(np.int64)


# --- the protocols -------------------------------------------------------------------------------

@register_protocol("strict", "raw", ("recall", "mrr", "median_rank"),
                   "open_clip training get_clip_metrics (ground truth of row i = column i); MedProbCLIP; "
                   "Ko et al. (arXiv 2509.15234) image-text evaluation")
def strict(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """Only the study's own item is a hit (open_clip's training ``get_clip_metrics``: the ground truth
    of row i is column i).

    A verbatim duplicate of the true report ranks where its score puts it: with equal embeddings it ties
    with the true report, and ties rank by gallery index, so it may come first. Chance: R@K = K/N.
    """
    q, g = _pair(split, direction)
    idx = np.arange(len(split))
    return Pass(q, g, _key_relevance(idx, idx), frozenset({"rank"}))


@register_protocol("unique_text", "merged", ("recall", "mrr", "median_rank"),
                   "CXR-CLIP evaluator.py::retrieval_image_text (image-to-text; both directions here)")
def unique_text(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """The text gallery is the set of unique report *strings*; a hit is the query's string.

    Image-to-text follows CXR-CLIP's ``evaluator.py::retrieval_image_text``: one gallery text per
    distinct string, the query's string is the one hit. The string's item is the mean of its rows'
    embeddings, re-normalised (:func:`cxrlib.retrieval.group_representatives`): identical strings embed
    alike only up to batch-dependent rounding, and the mean, unlike the first row (CXR-CLIP's choice),
    ignores row order. CXR-CLIP has no text-to-image counterpart; here a report query's hits are every
    image whose report is the same string. Strings that differ in case or
    punctuation stay apart (``duplicate_positive`` merges them).
    """
    q, g = _pair(split, direction)
    strings = report_strings(split)
    if direction == "image_to_text":
        items, keys = retrieval.group_representatives(g, strings)
        return Pass(q, items, _key_relevance(strings, keys), frozenset({"rank"}))
    return Pass(q, g, _key_relevance(strings, strings), frozenset({"rank"}))


@register_protocol("duplicate_positive", "duplicates", ("recall", "mrr", "median_rank"),
                   "Ko et al. (arXiv 2509.15234) text evaluation: identical (canonicalised) answers are all positive")
def duplicate_positive(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """Every gallery item whose canonicalised report equals the query's is a hit; the gallery keeps
    every study (duplicates occupy ranks, unlike ``unique_text``).

    Canonical text = ``cxrlib.datasets.table.normalise_report`` (lower case, alphanumerics only,
    single spaces), i.e. ``split.report_groups``; Ko et al. hash canonicalised texts in the same spirit,
    their exact canonicalisation is not reproduced. Chance: Hit@K = 1 - C(N-m, K) / C(N, K) for m hits.
    """
    q, g = _pair(split, direction)
    groups = np.asarray(split.report_groups)
    return Pass(q, g, _key_relevance(groups, groups), frozenset({"rank"}))


@register_protocol("label_match", "raw", ("label_precision", "label_hit", "label_map"),
                   "GLoRIA / BenchX label-conditioned Precision@K, with the paper's normal/abnormal label")
def label_match(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """Relevant = same normal/abnormal label (``split.labels``); Precision@K, Hit@K and mAP over the raw
    gallery (the query's own item counts: it has the query's label). Chance: P@K = m/N."""
    q, g = _pair(split, direction)
    return Pass(q, g, _key_relevance(split.labels, split.labels), frozenset({"topk", "ap"}), "label")


def _class_labels(split: PairedSplit) -> np.ndarray | None:
    col = split.table.get(CLASS_COLUMN) if hasattr(split.table, "get") else None
    return None if col is None else col.astype(str).to_numpy()


def _requires_class(split: PairedSplit) -> str | None:
    labels = _class_labels(split)
    if labels is None:
        return (f"no one-hot class column {CLASS_COLUMN!r} in this evaluation set (it exists on "
                f"EVAL_SET=mimic_5x200)")
    return None


@register_protocol("label_match_class", "raw", ("class_precision", "class_hit", "class_map"),
                   "BenchX (yangzhou12/BenchX) MIMIC-5x200 retrieval: Precision@K by one-hot CheXpert class",
                   requires=_requires_class)
def label_match_class(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """Relevant = same one-hot class (column ``onehot_label``: one of Atelectasis, Cardiomegaly,
    Consolidation, Edema, Pleural Effusion on MIMIC-5x200), BenchX's definition; chance on 5x200 = 20%."""
    q, g = _pair(split, direction)
    labels = pd.factorize(_class_labels(split))[0]
    return Pass(q, g, _key_relevance(labels, labels), frozenset({"topk", "ap"}), "class")


def _requires_findings(split: PairedSplit) -> str | None:
    f = retrieval._binary_findings(split.findings)
    return None if f is not None else "no positive finding labels in this evaluation set"


@register_protocol("finding_overlap", "raw", ("finding_precision", "finding_hit", "finding_map"),
                   "this package (no peer protocol): relevant = shares a positive finding",
                   requires=_requires_findings)
def finding_overlap(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """Relevant = shares at least one positive finding of ``split.findings`` (normal studies share none)."""
    q, g = _pair(split, direction)
    ft = torch.from_numpy(retrieval._binary_findings(split.findings))
    return Pass(q, g, lambda s, e: (ft[s:e] @ ft.T) > 0, frozenset({"topk", "ap"}), "finding")


def _requires_label_sets(split: PairedSplit) -> str | None:
    try:
        graded.label_sets(split.findings)
    except graded.NoFindingLabels as err:
        return str(err)
    return None


@register_protocol("graded", "raw", ("ndcg", "label_f1"),
                   "clinically graded relevance (cxrlib.graded): Jaccard / F1 of the 13 finding labels, and "
                   "BERTScore, F1-CheXbert, RadGraph F1 of the reports (cxrlib.report_metrics) where weights are local",
                   requires=_requires_label_sets)
def graded_protocol(split: PairedSplit, direction: str, ks, chunk_size: int) -> Pass:
    """nDCG@K with Jaccard gains and label-F1@K of the finding label sets (see :mod:`cxrlib.graded`);
    the same label sets on both sides, so both directions share the gains. Where their weights are
    present, also the mean over the top K of each heavier report metric (:mod:`cxrlib.report_metrics`)
    between the query study's report and each retrieved study's report; the others are skipped metrics."""
    q, g = _pair(split, direction)
    sets, known = graded.label_sets(split.findings)
    p = Pass(q, g, values=graded.graded_scores(q, g, sets, known, sets, known, ks, chunk_size),
             chance=graded.graded_chance(sets, known, sets, known, ks))
    for name, where in report_metrics.availability().items():
        columns = report_metrics.get_report_metric(name).metrics
        if "report" not in split.table:
            where = report_metrics.Skipped("the split's table has no 'report' column")
        if isinstance(where, report_metrics.Skipped):
            p.skipped_metrics.update({m: where.reason for m in columns})
            continue
        values, chance = report_metrics.ranking_scores(name, q, g, split.table["report"].to_numpy(), ks, chunk_size)
        p.values.update(values)
        p.chance.update(chance)
    return p


# --- chance levels -------------------------------------------------------------------------------

def _relevant_counts(p: Pass, n: int, chunk_size: int) -> np.ndarray:
    """Relevant gallery items of each query (block by block)."""
    step = retrieval.rows_per_block(len(p.gallery), chunk_size, retrieval.SCAN_BLOCK_ELEMENTS)
    return np.concatenate([torch.as_tensor(p.relevance(s, min(n, s + step))).sum(1).numpy()
                           for s in range(0, n, step)]).astype(np.int64)


def _first_rank_pmf(n: int, m: int) -> np.ndarray:
    """P(first of m relevant items is at rank r), r = 1..n, under a random permutation of n items."""
    r = np.arange(1, n + 1)
    return sps.hypergeom(n, m, r - 1).pmf(0) * (m / (n - r + 1)).clip(max=1.0) * (r <= n - m + 1)


def chance_values(m: np.ndarray, n: int, metric: str, k: int) -> np.ndarray:
    """Per-query expected ``metric`` (@``k``) under a random ranking of ``n`` items with ``m`` relevant.

    recall/hit: 1 - C(n-m, k)/C(n, k); precision: m/n; mrr: E[1/first rank]; median_rank: the median of
    the first relevant rank; other metrics (AP): NaN. Queries with m = 0 get NaN.
    """
    m = np.asarray(m, np.int64)
    out = np.full(len(m), np.nan)
    has = m > 0
    base = metric.split("_")[-1]
    if base in ("recall", "hit"):  # computed once per distinct m
        uniq, inv = np.unique(m[has], return_inverse=True)
        out[has] = sps.hypergeom(n, uniq, k).sf(0)[inv] if len(uniq) else []
    elif base == "precision":
        out[has] = m[has] / n
    elif metric in ("mrr", "median_rank"):
        for mm in np.unique(m[has]):
            pmf = _first_rank_pmf(n, int(mm))
            if metric == "mrr":
                val = float((pmf / np.arange(1, n + 1)).sum())
            else:  # the distribution's median; midway between two ranks where the CDF is exactly 1/2
                cdf = np.cumsum(pmf)
                lo = int(np.searchsorted(cdf, 0.5 - 1e-9))
                val = lo + 1.5 if abs(cdf[lo] - 0.5) < 1e-9 else lo + 1.0
            out[m == mm] = val
    return out


# --- scoring a split under several protocols -----------------------------------------------------

@dataclass
class ProtocolScores:
    """Per-query values of one model under several protocols (a :class:`retrieval.QueryScores`), the
    per-query chance of every key, the protocol of every ``(gallery, metric)`` and protocols skipped."""

    scores: retrieval.QueryScores
    chance: dict
    protocol_of: dict[tuple[str, str], str]
    skipped_protocols: dict[str, str]
    #: (protocol, metric) -> reason: a metric of a protocol that ran but that cannot run here (no weights)
    skipped_metrics: dict[tuple[str, str], str] = field(default_factory=dict)


def protocol_scores(split: PairedSplit, model_name: str, protocols=None, ks=(1, 5, 10), chunk_size: int = 4096,
                    progress: bool = False) -> ProtocolScores:
    """Every metric of every protocol in ``protocols`` (names; default all) for one model, both directions.

    A protocol that does not apply to the split (no one-hot class, no finding labels) is skipped with its
    reason in ``skipped_protocols``; a k larger than a gallery is skipped per key with the reason.
    """
    chosen = resolve_protocols(protocols)
    ks = sorted({int(k) for k in ks})
    values, sizes, skipped, chance, protocol_of, skipped_protocols, skipped_metrics = {}, {}, {}, {}, {}, {}, {}
    n = len(split)
    scans: dict[tuple, list] = {}  # passes over the same queries and gallery share one scan (scores once)
    for proto in chosen:
        reason = proto.requires(split)
        if reason:
            skipped_protocols[proto.name] = reason
            continue
        for metric in proto.metrics:
            protocol_of[(proto.gallery, metric)] = proto.name
        for direction in retrieval.DIRECTIONS:
            p = proto.build(split, direction, ks, chunk_size)
            size = len(p.gallery)
            sizes[(direction, proto.gallery)] = size
            ok = [k for k in ks if k <= size]
            for k in sorted(set(ks) - set(ok)):
                for metric in proto.metrics:
                    if metric not in ("mrr", "median_rank", f"{p.prefix}_map"):
                        skipped[(direction, proto.gallery, metric, k)] = (f"k={k} exceeds the {proto.name} "
                                                                          f"gallery size ({size})")
            if p.relevance is None:  # graded: values computed by the protocol itself
                skipped_metrics.update({(proto.name, m): r for m, r in p.skipped_metrics.items()})
                for (metric, k), v in p.values.items():
                    protocol_of[(proto.gallery, metric)] = proto.name
                    if k in ok:
                        values[(direction, proto.gallery, metric, k)] = v
                        chance[(direction, proto.gallery, metric, k)] = p.chance[(metric, k)]
                continue
            scans.setdefault((direction, id(p.queries), id(p.gallery)), []).append((proto, p))
    for (direction, _, _), group in scans.items():
        q, g = group[0][1].queries, group[0][1].gallery
        size = len(g)
        ok = [k for k in ks if k <= size]
        raw = retrieval.scan_metrics(q, g, {proto.name: (p.relevance, set(p.kinds)) for proto, p in group}, ok,
                                     chunk_size=chunk_size, progress=progress)
        for proto, p in group:
            m = _relevant_counts(p, n, chunk_size)
            for (name_, metric, k), v in raw.items():
                if name_ != proto.name:
                    continue
                if metric == "rank":
                    keys = {("mrr", 0): 1.0 / v, ("median_rank", 0): v}
                    keys.update({("recall", kk): np.where(np.isnan(v), np.nan, v <= kk) for kk in ok})
                else:
                    keys = {(f"{p.prefix}_{'map' if metric == 'ap' else metric}", k): v}
                for (name, kk), vals in keys.items():
                    key = (direction, proto.gallery, name, kk)
                    values[key] = vals
                    chance[key] = chance_values(m, size, name, kk)
    qs = retrieval.QueryScores(model_name, values, sizes, skipped, np.asarray(split.labels),
                               np.asarray(split.patient_ids), np.asarray(split.study_ids))
    return ProtocolScores(qs, chance, protocol_of, skipped_protocols, skipped_metrics)


def summarise(ps: ProtocolScores, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Tidy table (:data:`COLUMNS`): :func:`cxrlib.retrieval.summarise` with ``protocol`` and ``chance``,
    plus one NaN row per (direction, metric) of each skipped protocol (and of each skipped metric of a
    protocol that ran) whose note gives the reason."""
    df = retrieval.summarise(ps.scores, n_boot=n_boot, seed=seed, confidence=confidence)
    df.insert(2, "protocol", [ps.protocol_of.get((g, m), "") for g, m in zip(df["gallery"], df["metric"])])
    masks = retrieval._class_masks(ps.scores.labels)
    chance = []
    for r in df.itertuples(index=False):
        k = 0 if pd.isna(r.k) else int(r.k)
        per_query = ps.chance.get((r.direction, r.gallery, r.metric, k))
        if per_query is None:
            chance.append(np.nan)
            continue
        v = ps.scores.values[(r.direction, r.gallery, r.metric, k)]
        sel = per_query[masks[r.query_class] & ~np.isnan(v)]
        sel = sel[~np.isnan(sel)]
        if not len(sel):
            chance.append(np.nan)
        else:
            chance.append(float(np.median(sel) if r.metric == "median_rank" else np.mean(sel)))
    df.insert(df.columns.get_loc("ci_high") + 1, "chance", chance)
    rows = []
    for name, reason in ps.skipped_protocols.items():
        proto = PROTOCOLS[name]
        for direction in retrieval.DIRECTIONS:
            for metric in proto.metrics:
                rows.append(dict(model=ps.scores.model, direction=direction, protocol=name, gallery=proto.gallery,
                                 query_class="all", metric=metric, k=pd.NA, value=np.nan, ci_low=np.nan,
                                 ci_high=np.nan, chance=np.nan, n=0, n_excluded=0, n_patients=0, gallery_size=0,
                                 note=f"protocol skipped: {reason}"))
    for (name, metric), reason in ps.skipped_metrics.items():
        for direction in retrieval.DIRECTIONS:
            rows.append(dict(model=ps.scores.model, direction=direction, protocol=name,
                             gallery=PROTOCOLS[name].gallery, query_class="all", metric=metric, k=pd.NA,
                             value=np.nan, ci_low=np.nan, ci_high=np.nan, chance=np.nan, n=0, n_excluded=0,
                             n_patients=0, gallery_size=0, note=f"metric skipped: {reason}"))
    if rows:
        df = pd.concat([df, pd.DataFrame(rows, columns=COLUMNS)], ignore_index=True)
    df = df[COLUMNS]
    df["k"] = df["k"].astype("Int64")
    return df


def compare(a: ProtocolScores, b: ProtocolScores, n_boot: int = 1000, n_perm: int = 10000, seed: int = 0,
            confidence: float = 0.95) -> pd.DataFrame:
    """Paired tests of model ``a`` minus ``b`` for every protocol metric (:func:`retrieval.compare_models`),
    with the ``protocol`` column."""
    df = retrieval.compare_models(a.scores, b.scores, n_boot=n_boot, n_perm=n_perm, seed=seed, confidence=confidence)
    df.insert(3, "protocol", [a.protocol_of.get((g, m), "") for g, m in zip(df["gallery"], df["metric"])])
    return df[PAIRED_COLUMNS]


def describe() -> pd.DataFrame:
    """One row per registered protocol: name, metrics, the peer code it follows, its definition."""
    return pd.DataFrame([{"protocol": p.name, "metrics": ", ".join(p.metrics), "follows": p.follows,
                          "definition": (p.build.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")}
                         for p in PROTOCOLS.values()])
