"""2-D maps (t-SNE, UMAP) of image and report embeddings before and after the projector, and the
numbers that say what the maps show.

The paper's claim ("normal and abnormal studies cluster more clearly after fine-tuning") is judged
in the ORIGINAL embedding space, never on the 2-D map, whose distances t-SNE and UMAP distort:

* ``silhouette``: mean silhouette of the normal/abnormal labels, cosine distance (-1..1, higher =
  better separated clusters);
* ``knn_acc`` / ``knn_balanced_acc``: leave-one-out k-NN vote of the label (``knn_chance`` = the
  majority-class rate a space without structure gets); ``knn_acc_finding`` the same for finding groups;
* ``label_centroid_dist``: cosine distance between the normal and the abnormal centroid;
* joint space (images and reports together): ``centroid_gap``, the Euclidean distance between the
  image and the report centroids of the L2-normalised embeddings (the "modality gap", Liang et al.,
  NeurIPS 2022), ``silhouette_modality`` (how cleanly the two modalities separate), ``pair_cosine``
  (mean cosine of an image and its own report), and cross-modal label k-NN (``knn_acc_i2t``: an
  image's k nearest reports vote its label; ``knn_acc_t2i`` the reverse).

Maps: t-SNE runs on a PCA reduction to ``pca_dims`` (~50) dimensions with Euclidean distance (on
L2-normalised vectors that ranks pairs like cosine), scikit-learn below ``opentsne_above`` points and
openTSNE above; UMAP runs with cosine on the embeddings themselves (cosine on PCA-centred coordinates
would be another similarity than the one retrieval uses). ``umap`` is imported inside
:func:`project_2d` only: importing it costs ~20 s.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cxrlib.io import atomic_path, write_json

METHODS = ("tsne", "umap")
STAGES = ("before", "after")
SPACES = ("image", "text", "joint")
#: below this many points a 2-D map is meaningless: PCA to 2-D instead (with a warning)
MIN_MAP_POINTS = 5
#: finding groups that are not one finding (coloured grey, left out of the finding k-NN score)
MIXED_GROUPS = ("multiple", "other abnormal", "unlabelled")


class ProjectionWarning(UserWarning):
    """A requested setting could not be used as given; the message says what was used instead."""


# --- 2-D projection ---------------------------------------------------------------------------------------

def _check_matrix(x: Any, name: str = "x") -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"{name} has no rows: nothing to project")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"{name} has non-finite values in rows {bad[:5].tolist()}")
    return x


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dims = min(dims, x.shape[0], x.shape[1])
    return PCA(n_components=dims, random_state=seed).fit_transform(x).astype(np.float32)


def _pca_2d(x: np.ndarray, seed: int) -> np.ndarray:
    if len(x) < 2 or np.ptp(x, axis=0).max() == 0:
        return np.zeros((len(x), 2), dtype=np.float32)
    xy = _pca(x, 2, seed)
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


def _note(info: dict, message: str) -> None:
    info["fallbacks"].append(message)
    warnings.warn(message, ProjectionWarning, stacklevel=3)


def project_2d(x: Any, method: str = "tsne", seed: int = 0, perplexity: float = 30.0, n_neighbors: int = 15,
               pca_dims: int | None = 50, min_dist: float = 0.1, opentsne_above: int = 1000, n_jobs: int = 1,
               info: dict | None = None) -> np.ndarray:
    """A seeded 2-D map [N, 2] of the rows of ``x`` by t-SNE or UMAP.

    Settings the data cannot support are lowered with a :class:`ProjectionWarning` instead of failing
    deep in a library: perplexity above ``(N - 1) / 3``, ``n_neighbors >= N``; fewer than
    ``MIN_MAP_POINTS`` points or identical points give a PCA map. ``n_jobs`` caps the threads (default 1:
    deterministic, and polite on shared machines). Pass a dict as ``info`` to get
    what was used (``backend``, ``perplexity``/``n_neighbors``, ``pca_dims``, ``fallbacks``).
    """
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose one of {METHODS}")
    x = _check_matrix(x)
    info = {} if info is None else info
    info.clear()
    info.update(method=method, n=len(x), seed=seed, fallbacks=[])
    n = len(x)
    if n < MIN_MAP_POINTS or np.ptp(x, axis=0).max() == 0:
        why = (f"only {n} points (a {method} map needs >= {MIN_MAP_POINTS})" if n < MIN_MAP_POINTS
               else "all points are identical")
        _note(info, f"{why}: using a PCA map instead of {method}")
        info["backend"] = "pca"
        return _pca_2d(x, seed)
    from threadpoolctl import threadpool_limits

    # cap OpenMP/BLAS threads: on a shared machine oversubscribed OpenMP made scikit-learn's t-SNE 3-10x slower
    with threadpool_limits(limits=n_jobs):
        if method == "tsne":
            return _tsne(x, seed, perplexity, pca_dims, opentsne_above, n_jobs, info)
        return _umap(x, seed, n_neighbors, min_dist, info)


def _tsne(x: np.ndarray, seed: int, perplexity: float, pca_dims: int | None, opentsne_above: int, n_jobs: int,
          info: dict) -> np.ndarray:
    n = len(x)
    if not perplexity > 0:
        raise ValueError(f"perplexity must be > 0, got {perplexity}")
    max_perplexity = (n - 1) / 3.0  # openTSNE's bound; scikit-learn's (perplexity < N) is looser
    if perplexity > max_perplexity:
        _note(info, f"perplexity {perplexity:g} is too large for {n} points (max (N-1)/3 = {max_perplexity:.3g}): "
                    f"using {max_perplexity:.3g}")
        perplexity = max_perplexity
    if pca_dims and x.shape[1] > pca_dims:
        x = _pca(x, pca_dims, seed)
    info.update(perplexity=float(perplexity), pca_dims=int(x.shape[1]))
    if n >= opentsne_above:
        import openTSNE

        info["backend"] = "openTSNE"
        emb = openTSNE.TSNE(n_components=2, perplexity=perplexity, metric="euclidean", initialization="pca",
                            random_state=seed, n_jobs=n_jobs, verbose=False).fit(x)
        return np.asarray(emb, dtype=np.float32)
    from sklearn.manifold import TSNE

    info["backend"] = "sklearn"
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="euclidean", init="pca", learning_rate="auto",
                random_state=seed, n_jobs=n_jobs)
    return tsne.fit_transform(x).astype(np.float32)


def import_umap():
    """``import umap`` with its numba functions compiled to numba's on-disk cache (``cache=True``).

    umap-learn and pynndescent JIT-compile most of their functions without ``cache=True``, so every
    fresh kernel (each node of a rerun) compiles them again before its first fit, at seconds per run.
    The decorators are wrapped only while umap is first imported (restored after, also on error);
    what is compiled, and so every map, is the same; ``NUMBA_CACHE_DIR`` moves the cache. A function
    numba cannot cache still compiles, with numba's warning. Imported here only: the import is slow.
    """
    import sys

    if "umap" in sys.modules:
        return sys.modules["umap"]
    import numba

    njit, jit = numba.njit, numba.jit

    def cached(decorator):
        @functools.wraps(decorator)
        def wrapper(*args, **kwargs):
            kwargs.setdefault("cache", True)
            return decorator(*args, **kwargs)
        return wrapper

    numba.njit, numba.jit = cached(njit), cached(jit)
    try:
        import umap
    finally:
        numba.njit, numba.jit = njit, jit
    return umap


def _umap(x: np.ndarray, seed: int, n_neighbors: int, min_dist: float, info: dict) -> np.ndarray:
    n = len(x)
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    if n_neighbors >= n:
        _note(info, f"n_neighbors {n_neighbors} needs more than {n} points: using {n - 1}")
        n_neighbors = n - 1
    umap = import_umap()

    info.update(backend="umap-learn", n_neighbors=int(n_neighbors), min_dist=float(min_dist), pca_dims=None)
    # random_state makes UMAP reproducible but forces it onto one thread (umap-learn's rule): keep N modest
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist, metric="cosine",
                        random_state=seed, init="spectral" if n > 20 else "random")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)


# --- numbers in the original space -----------------------------------------------------------------------

def _normalise(x: np.ndarray, name: str) -> np.ndarray:
    x = _check_matrix(x, name).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = np.flatnonzero(norms[:, 0] == 0)
    if zero.size:
        raise ValueError(f"{name} has all-zero rows {zero[:5].tolist()}: no direction to compare")
    return x / norms


def knn_vote(neighbour_labels: np.ndarray) -> np.ndarray:
    """Majority label of each row of ``neighbour_labels`` [N, k] (nearest first); a tie goes to the
    tied label with the nearest neighbour."""
    nl = np.asarray(neighbour_labels)
    classes, inv = np.unique(nl, return_inverse=True)
    inv = inv.reshape(nl.shape)
    n, k = nl.shape
    rows = np.repeat(np.arange(n), k)
    counts = np.zeros((n, len(classes)))
    np.add.at(counts, (rows, inv.ravel()), 1.0)
    first = np.full((n, len(classes)), k)
    np.minimum.at(first, (rows, inv.ravel()), np.tile(np.arange(k), n))
    # the rank bonus lies in (0, 1): it orders tied labels, never outweighs a whole vote
    return classes[(counts + (k - first) / (k + 1)).argmax(axis=1)]


def knn_predict(query: np.ndarray, gallery: np.ndarray | None, gallery_labels: np.ndarray, k: int) -> np.ndarray:
    """k-NN (cosine) label vote for each query; ``gallery=None`` = leave-one-out within ``query``."""
    from sklearn.neighbors import NearestNeighbors

    n_gallery = len(query) - 1 if gallery is None else len(gallery)
    k = min(k, n_gallery)
    if k < 1:
        raise ValueError("k-NN needs at least 2 points")
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
    if gallery is None:
        idx = nn.fit(query).kneighbors(return_distance=False)  # excludes each point itself
    else:
        idx = nn.fit(gallery).kneighbors(query, return_distance=False)
    return knn_vote(np.asarray(gallery_labels)[idx])


def _silhouette(x: np.ndarray, labels: np.ndarray, seed: int, max_points: int, what: str,
                notes: list[str]) -> float:
    from sklearn.metrics import silhouette_score

    n_classes = len(np.unique(labels))
    if n_classes < 2:
        notes.append(f"{what}: only one class present ({labels[0]}): silhouette undefined (NaN)")
        return float("nan")
    if n_classes >= len(labels):
        notes.append(f"{what}: every point is its own class: silhouette undefined (NaN)")
        return float("nan")
    sample = max_points if len(labels) > max_points else None
    return float(silhouette_score(x, labels, metric="cosine", sample_size=sample, random_state=seed))


def _label_scores(x: np.ndarray, labels: np.ndarray, k: int, seed: int, max_points: int, what: str,
                  notes: list[str]) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    out = {"silhouette": _silhouette(x, labels, seed, max_points, what, notes)}
    pred = knn_predict(x, None, labels, k)
    out["knn_acc"] = float((pred == labels).mean())
    out["knn_balanced_acc"] = float(balanced_accuracy_score(labels, pred)) if len(np.unique(labels)) > 1 \
        else float("nan")
    classes = np.unique(labels)
    if len(classes) == 2:
        c0, c1 = (x[labels == c].mean(axis=0) for c in classes)
        out["label_centroid_dist"] = float(1.0 - c0 @ c1 / (np.linalg.norm(c0) * np.linalg.norm(c1)))
    else:
        out["label_centroid_dist"] = float("nan")
    return out


def embedding_metrics(img: Any, txt: Any, labels: Any, seed: int = 0, k: int = 10, groups: Any = None,
                      max_silhouette_points: int = 10000) -> dict[str, Any]:
    """Cluster and modality-gap numbers of paired embeddings in their own (cosine) space.

    ``img``/``txt`` [N, D] (row i: study i's image and report), ``labels`` [N] normal (0) / abnormal
    (1), ``groups`` [N] optional finding group names (:func:`finding_groups`). Returns
    ``{"image": {...}, "text": {...}, "joint": {...}, "n", "k", "seed", "knn_chance", "notes"}``; a
    number that cannot be computed (one class present, image and text dims differ) is NaN with a note.
    ``seed`` drives the silhouette subsample above ``max_silhouette_points`` points.
    """
    img, txt = _normalise(img, "image embeddings"), _normalise(txt, "text embeddings")
    labels = np.asarray(labels)
    if not (len(img) == len(txt) == len(labels)):
        raise ValueError(f"image ({len(img)}), text ({len(txt)}) and labels ({len(labels)}) differ in length")
    if len(labels) < 3:
        raise ValueError(f"embedding metrics need at least 3 studies, got {len(labels)}")
    notes: list[str] = []
    _, counts = np.unique(labels, return_counts=True)
    out: dict[str, Any] = {"n": int(len(labels)), "k": int(min(k, len(labels) - 1)), "seed": int(seed),
                           "knn_chance": float(counts.max() / counts.sum())}
    if len(counts) < 2:
        notes.append(f"only one label ({labels[0]}) among {len(labels)} studies: label separation is undefined")
    single = None
    if groups is not None:
        groups = np.asarray(groups).astype(str)
        if len(groups) != len(labels):
            raise ValueError(f"groups ({len(groups)}) and labels ({len(labels)}) differ in length")
        single = ~np.isin(groups, MIXED_GROUPS)
        if single.sum() < 3 or len(np.unique(groups[single])) < 2:
            notes.append("fewer than 2 single-finding groups: no finding k-NN score")
            single = None
    for name, x in (("image", img), ("text", txt)):
        out[name] = _label_scores(x, labels, k, seed, max_silhouette_points, name, notes)
        if single is not None:
            pred = knn_predict(x[single], None, groups[single], k)
            out[name]["knn_acc_finding"] = float((pred == groups[single]).mean())
    if img.shape[1] != txt.shape[1]:
        notes.append(f"image ({img.shape[1]}) and text ({txt.shape[1]}) dims differ: no joint space")
        out["joint"] = {}
    else:
        both = np.concatenate([img, txt])
        joint = {"silhouette": _silhouette(both, np.concatenate([labels, labels]), seed, max_silhouette_points,
                                           "joint", notes)}
        modality = np.repeat(np.array(["image", "text"]), len(labels))
        joint["silhouette_modality"] = _silhouette(both, modality, seed, max_silhouette_points, "modality", notes)
        joint["centroid_gap"] = float(np.linalg.norm(img.mean(axis=0) - txt.mean(axis=0)))
        joint["pair_cosine"] = float(np.einsum("nd,nd->n", img, txt).mean())
        joint["knn_acc_i2t"] = float((knn_predict(img, txt, labels, k) == labels).mean())
        joint["knn_acc_t2i"] = float((knn_predict(txt, img, labels, k) == labels).mean())
        out["joint"] = joint
    out["notes"] = notes
    for note in notes:
        warnings.warn(note, ProjectionWarning, stacklevel=2)
    return out


def score_caption(metrics: Mapping[str, Any], space: str) -> str:
    """One line of the numbers behind a map, for its panel title (computed in the embedding space)."""
    m = metrics.get(space) or {}
    if space == "joint":
        return (f"centroid gap {m.get('centroid_gap', float('nan')):.2f} · "
                f"label silhouette {m.get('silhouette', float('nan')):.2f}") if m else ""
    return (f"silhouette {m.get('silhouette', float('nan')):.2f} · "
            f"{metrics.get('k', '')}-NN acc. {m.get('knn_acc', float('nan')):.2f}") if m else ""


def metrics_frame(results: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Tidy table (stage, space, metric, value, n, k, seed) of ``{stage: embedding_metrics(...)}``."""
    rows = []
    for stage, res in results.items():
        for space in SPACES:
            for metric, value in (res.get(space) or {}).items():
                rows.append({"stage": stage, "space": space, "metric": metric, "value": value, "n": res["n"],
                             "k": res["k"], "seed": res["seed"]})
        rows.append({"stage": stage, "space": "all", "metric": "knn_chance", "value": res["knn_chance"],
                     "n": res["n"], "k": res["k"], "seed": res["seed"]})
    return pd.DataFrame(rows, columns=["stage", "space", "metric", "value", "n", "k", "seed"])


def metrics_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """Markdown table: one row per (space, metric), one column per stage, plus after - before."""
    wide = frame.set_index(["space", "metric", "stage"])["value"].unstack("stage")
    wide = wide.loc[list(dict.fromkeys(zip(frame["space"], frame["metric"])))]  # keep the order of the rows
    stages = [s for s in STAGES if s in wide.columns] + [s for s in wide.columns if s not in STAGES]
    header = ["space", "metric", *stages] + (["change"] if {"before", "after"} <= set(stages) else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    fmt = f"{{:.{digits}f}}"
    for (space, metric), row in wide.iterrows():
        cells = [space, metric] + [("n/a" if pd.isna(row[s]) else fmt.format(row[s])) for s in stages]
        if "change" in header:
            d = row["after"] - row["before"]
            cells.append("n/a" if pd.isna(d) else f"{round(d, digits) + 0.0:+.{digits}f}")  # + 0.0: no "-0.000"
        lines.append("| " + " | ".join(cells) + " |")
    n, k, seed = (frame[c].iloc[0] for c in ("n", "k", "seed"))
    lines.append("")
    lines.append(f"n = {n} studies, k = {k} neighbours (cosine), seed = {seed}; computed in the embedding "
                 "space, not on the 2-D maps.")
    return "\n".join(lines) + "\n"


def write_metrics(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                  settings: Mapping[str, Any] | None = None, stem: str = "embedding_metrics") -> dict[str, Path]:
    """Write ``<stem>.csv`` (tidy), ``<stem>.json`` (results + seed + settings) and ``<stem>.md``, atomically."""
    out_dir = Path(out_dir)
    frame = metrics_frame(results)
    paths = {"csv": out_dir / f"{stem}.csv", "json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    with atomic_path(paths["csv"], suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    seeds = {int(r["seed"]) for r in results.values()}
    write_json(paths["json"], {"seed": seeds.pop() if len(seeds) == 1 else sorted(seeds),
                               "settings": dict(settings or {}), "results": json.loads(json.dumps(
                                   dict(results), default=float, allow_nan=True))})
    with atomic_path(paths["md"], suffix=".md") as tmp:
        tmp.write_text(metrics_markdown(frame))
    return paths


# --- inputs: frozen embeddings, projected embeddings, finding groups ---------------------------------------

def finding_groups(findings: np.ndarray | None, names: Iterable[str], labels: Any, top: int = 6) -> np.ndarray:
    """One colour group per study: ``normal``, its single finding (the ``top`` most frequent single
    findings), ``multiple`` (two or more), ``other abnormal`` (abnormal with none of them, or a rarer
    one) or ``unlabelled`` (findings unknown)."""
    labels = np.asarray(labels)
    out = np.where(labels == 0, "normal", "other abnormal").astype(object)
    if findings is None:
        return out.astype(str)
    names = list(names)
    f = np.asarray(findings, dtype=np.float32)
    if f.shape != (len(labels), len(names)):
        raise ValueError(f"findings {f.shape} do not match {len(labels)} studies x {len(names)} names")
    cols = [i for i, nm in enumerate(names) if nm != "No Finding"]
    pos = np.nan_to_num(f[:, cols]) == 1
    n_pos = pos.sum(axis=1)
    singles = (n_pos == 1) & (labels == 1)
    first = pos.argmax(axis=1)
    counts = pd.Series(np.asarray(cols)[first[singles]]).value_counts()
    keep = set(counts.index[:top].tolist())
    for i in np.flatnonzero(singles):
        if cols[first[i]] in keep:
            out[i] = names[cols[first[i]]]
    out[(n_pos >= 2) & (labels == 1)] = "multiple"
    out[np.isnan(f[:, cols]).all(axis=1) & (labels == 1)] = "unlabelled"
    return out.astype(str)


def sample_rows(n: int, size: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random sample of ``size`` of ``n`` rows (all rows when size is 0/None/>= n)."""
    if not size or size >= n:
        return np.arange(n)
    if size < 0:
        raise ValueError(f"sample_size must be >= 0, got {size}")
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def apply_projector(model: Any, img: np.ndarray, txt: np.ndarray, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """``model.encode_image`` / ``encode_text`` over numpy arrays in batches, on CPU (:func:`cxrlib.models.project`)."""
    from cxrlib.models import project

    return project(model, img, txt, batch_size)


@dataclass
class VizData:
    """Studies to map: ``spaces[stage] = (img, txt)`` row-aligned with ``labels``/``groups``/``study_ids``."""

    spaces: dict[str, tuple[np.ndarray, np.ndarray]]
    labels: np.ndarray
    groups: np.ndarray
    study_ids: np.ndarray
    n_split: int
    info: dict[str, Any] = field(default_factory=dict)


def load_viz_data(dataset: str, backbone: str, projector_path: str | Path | None, split: str = "test",
                  sample_size: int | None = None, seed: int = 0) -> VizData:
    """Frozen embeddings of ``split`` (before) and the projector's output (after, when a path is given)."""
    from cxrlib.dag import embedding_dir
    from cxrlib.datasets.labels import FINDING_LABELS
    from cxrlib.pairs import load_paired

    # the one paired-split loader: it refuses embeddings cached for another backbone
    pair = load_paired(dataset, backbone, (split,), finding_columns=list(FINDING_LABELS))[split]
    emb_dir = embedding_dir(dataset, backbone)
    idx = sample_rows(len(pair), sample_size, seed)
    names = [c for c in FINDING_LABELS if c in pair.table.columns]
    findings = pair.findings[idx] if pair.findings is not None else None
    data = VizData(spaces={"before": (pair.img[idx], pair.txt[idx])}, labels=pair.labels[idx],
                   groups=finding_groups(findings, names, pair.labels[idx]), study_ids=pair.study_ids[idx],
                   n_split=len(pair), info={"dataset": dataset, "backbone": backbone, "split": split,
                                            "embeddings": str(emb_dir)})
    if projector_path is not None:
        from cxrlib.models import load_checked_projector

        model, _ = load_checked_projector(projector_path, backbone, dataset, (pair.img.shape[1], pair.txt.shape[1]))
        data.spaces["after"] = apply_projector(model, *data.spaces["before"])
        data.info["projector"] = str(projector_path)
    return data


def _map_key(x: np.ndarray, method: str, settings: Mapping[str, Any]) -> str:
    """What decides a map: the points' bytes, the method, every setting and the libraries' versions."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.blake2b(digest_size=16)
    x = np.ascontiguousarray(x)
    h.update(f"{x.dtype}|{x.shape}|{method}|{json.dumps(dict(settings), sort_keys=True, default=str)}".encode())
    for lib in ("openTSNE", "scikit-learn", "umap-learn", "numpy"):
        try:
            h.update(f"{lib}={version(lib)}".encode())
        except PackageNotFoundError:
            h.update(f"{lib}=absent".encode())
    h.update(memoryview(x).cast("B"))
    return h.hexdigest()


def cached_project_2d(x: np.ndarray, method: str, cache_dir: str | Path | None, info: dict,
                      **settings: Any) -> np.ndarray:
    """:func:`project_2d`, read from ``cache_dir/<key>.npz`` when the same points and settings were mapped
    before (a rerun after a loss weight changes maps only the projector's new embeddings). ``info["cached"]``
    says which; the file is written atomically."""
    if cache_dir is None:
        out = project_2d(x, method, info=info, **settings)
        info["cached"] = False
        return out
    path = Path(cache_dir) / f"{method}-{_map_key(x, method, settings)}.npz"
    if path.is_file():
        with np.load(path) as z:
            info.clear()
            info.update(json.loads(str(z["info"])))
            info["cached"] = True
            return z["xy"].astype(np.float32)
    out = project_2d(x, method, info=info, **settings)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, xy=out, info=json.dumps(info, default=str))
    info["cached"] = False
    return out


def default_map_cache() -> Path:
    """``data_dir()/cache/maps``: 2-D maps keyed by their inputs (:func:`cached_project_2d`)."""
    from cxrlib import paths

    return paths.data_dir() / "cache" / "maps"


def project_views(data: VizData, methods: Iterable[str], seed: int = 0, perplexity: float = 30.0,
                  n_neighbors: int = 15, cache_dir: str | Path | None | bool = True,
                  **kwargs: Any) -> tuple[dict[tuple[str, str, str], np.ndarray], pd.DataFrame]:
    """Every map: ``{(method, stage, space): xy}`` for spaces image, text and joint (images then reports),
    plus a table of what each projection used (backend, effective perplexity / n_neighbors, fallbacks, cached).

    ``cache_dir`` (True: :func:`default_map_cache`; False/None: no cache) reuses a map of identical points
    and settings, so the frozen backbone's maps are computed once, not on every projector change."""
    cache = default_map_cache() if cache_dir is True else (cache_dir or None)
    jobs = [(m, st, sp) for m in methods for st in data.spaces for sp in SPACES]
    maps, log = {}, []
    for method, stage, space in tqdm(jobs, desc="2-D maps"):
        img, txt = data.spaces[stage]
        if space == "joint" and img.shape[1] != txt.shape[1]:
            log.append({"method": method, "stage": stage, "space": space, "backend": None,
                        "fallbacks": "image and text dims differ: no joint map"})
            continue
        x = {"image": img, "text": txt}.get(space)
        x = np.concatenate([img, txt]) if x is None else x
        info: dict = {}
        maps[(method, stage, space)] = cached_project_2d(x, method, cache, info, seed=seed, perplexity=perplexity,
                                                         n_neighbors=n_neighbors, **kwargs)
        log.append({"method": method, "stage": stage, "space": space, **info,
                    "fallbacks": "; ".join(info["fallbacks"])})
    return maps, pd.DataFrame(log)


def warm_jit_cache(n: int = 200, dim: int = 32, seed: int = 0) -> dict[str, str]:
    """Map ``n`` random points once by UMAP and once by openTSNE, so that the numba functions a map of this
    size compiles (umap-learn's and pynndescent's, through :func:`import_umap`) land in numba's on-disk cache.

    ``make env`` runs it: a fresh environment would otherwise compile them in its first maps (notebook 04's
    first run, the first ``make test``). Returns the backend each method used."""
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    used = {}
    for method in METHODS:
        info: dict = {}
        project_2d(x, method, seed=seed, perplexity=10.0, opentsne_above=n // 2, info=info)
        used[method] = info["backend"]
    return used


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cxrlib.embedding_viz", description="embedding map helpers")
    ap.add_argument("command", choices=["warm-jit"], help="warm-jit: compile the map libraries' numba cache")
    ap.parse_args(argv)
    print(f"numba cache warmed: {warm_jit_cache()}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
