"""Embedding extraction: batched, cached, resumable, and sharded across torchrun ranks.

``extract_embeddings(table, backbone, out_dir)`` writes ``<out_dir>/image.npz`` (keyed by
``image_id``) and ``<out_dir>/text.npz`` (keyed by ``study_id``, one report per study) as
L2-normalised float32 through :mod:`cxrlib.embstore`, then ``done.json`` last.

Cache and resume. Each modality's items are cut into fixed chunks (in table order); every chunk is
written as an atomic shard under ``<out_dir>/.partial/<modality>-<key>/`` and the shards are merged
by id at the end. The key hashes what decides that modality's features: for images the backbone
fingerprint (weights, so also the checkpoint) and the preprocessing, for reports the text tower's
fingerprint (its weights and tokenizer, :func:`cxrlib.backbones.text_fingerprint`) and context
length; then the precision and the rows' ids and inputs. A rerun with the same key reads the
cache; an interrupted run recomputes only the chunks without a shard; a changed input changes the
key, so a stale shard is never reused. ``done.json`` is deleted before any recomputation and
written after the merge, so a half-written set never passes for a whole one.

Shared text features. With ``text_store`` (the command line's default: :func:`cxrlib.paths.text_store_dir`)
each text file is also kept there under its key, so another embedding set whose backbone has the same
text tower (the frozen backbone and its image-only adaptation, ``lock_text``) copies it instead of
encoding every report again; the copy carries its own set's backbone name and fingerprint and is
stamped like any other. A text tower that was trained has other weights, so another key.

Bad input. An unreadable image is a counted skip listed by id and reason in ``done.json`` and in the
returned :class:`ExtractionResult` (never a zero vector); an empty report likewise; a study whose
rows carry different reports is an error naming it.

Many processes. Under ``torchrun --nproc-per-node N -m cxrlib.embed ...`` (gloo on CPU, nccl on GPU)
chunk ``c`` goes to rank ``c % N``; ranks write their shards to the shared ``out_dir`` and rank 0
merges by id (dropping any duplicate id, as one would drop ``DistributedSampler``'s padding; the
chunking here pads nothing). Across nodes ``out_dir`` must be on a shared file system.

GPU. On CUDA (see :mod:`cxrlib.accel`) JPEGs are decoded in batches on the GPU and resized and
normalised there (``decode="auto"``; PNG and 16-bit files are decoded by CPU workers and resized
on the GPU), workers and
prefetch are sized from the cores, memory is pinned and copies are non-blocking, ``cudnn.benchmark``
is on for convolutional towers, ``compile=True`` wraps the image forward in ``torch.compile``, and
``batch_size="auto"`` probes for the largest batch that fits. A batch that runs out of memory is
split in ordered halves and the smaller size kept (no item lost or duplicated); ``done.json``
records the decode path, the batch size used and the back-offs.

Precision. ``"auto"`` uses bf16 autocast on GPUs that support it (else fp16) and on CPUs with
native bf16 (AMX / AVX512-BF16); elsewhere fp32, because emulated bf16 is slower than fp32
(``benchmarks/embed_throughput.py`` measures it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cxrlib import accel, determinism, paths, runtime, settings
from cxrlib.backbones import Backbone, load_backbone
from cxrlib.embstore import Embeddings, load_embeddings, save_embeddings
from cxrlib.images import ImageReadError, load_cxr_image
from cxrlib.io import atomic_path, write_json

MODALITIES = ("image", "text")
#: bump when image reading or the shard layout changes (part of every cache key)
CACHE_VERSION = 1
#: ``batch_size="auto"``: the batch on CPU, and the probe's start and limit on a GPU
#: (the limit also bounds the host memory of prefetched batches: workers x prefetch x batch items)
AUTO_BATCH = {"cpu": 64, "start": 32, "image_limit": 256, "text_limit": 256}
STAMP = "done.json"
PARTIAL = ".partial"


class ExtractionResult(dict):
    """``{modality: Path}`` plus what a notebook wants to see: skips, cache hits, the stamp."""

    def __init__(self, files: dict[str, Path], skipped: dict[str, list[dict[str, str]]],
                 cached: dict[str, bool], stamp: Path, counts: dict[str, int]):
        super().__init__(files)
        self.skipped, self.cached, self.stamp, self.counts = skipped, cached, stamp, counts

    def __repr__(self) -> str:
        parts = [f"{m}: {self.counts.get(m, 0)} embedded, {len(self.skipped.get(m, []))} skipped"
                 f"{' (cache)' if self.cached.get(m) else ''}" for m in self]
        return f"ExtractionResult({'; '.join(parts)})"


# ---- precision and device ---------------------------------------------------------------------

# one definition each, in cxrlib.runtime (these names stay importable from here)
resolve_device, resolve_precision, autocast = runtime.resolve_device, runtime.resolve_precision, runtime.autocast
cpu_has_native_bf16 = runtime.cpu_has_native_bf16


# ---- items -------------------------------------------------------------------------------------

def _require(table: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"study table lacks columns {missing} (has {list(table.columns)})")


def image_items(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(image ids, image paths) in table order; duplicate or empty ids are errors naming them."""
    _require(table, ["image_id", "image_path"])
    ids = table["image_id"].astype(str).tolist()
    dup = table["image_id"][table["image_id"].duplicated()].astype(str).unique().tolist()
    if dup:
        raise ValueError(f"duplicate image_id in the study table: {dup[:5]}")
    if table["image_path"].isna().any():
        raise ValueError(f"image_path missing for image_id {table.loc[table['image_path'].isna(), 'image_id'].tolist()[:5]}")
    return ids, table["image_path"].astype(str).tolist()


def text_items(table: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(study ids, report texts), one per study in order of first appearance."""
    _require(table, ["study_id", "report"])
    rows = table[["study_id", "report"]].copy()
    rows["study_id"] = rows["study_id"].astype(str)
    rows["report"] = rows["report"].fillna("").astype(str)
    n_texts = rows.groupby("study_id", sort=False)["report"].nunique()
    conflicting = n_texts[n_texts > 1].index.tolist()
    if conflicting:
        raise ValueError(f"studies with different reports on different rows: {conflicting[:5]}")
    first = rows.drop_duplicates("study_id")
    return first["study_id"].tolist(), first["report"].tolist()


def _hash_items(ids: Sequence[str], values: Sequence[str]) -> str:
    h = hashlib.sha256()
    for i, v in zip(ids, values):
        h.update(i.encode())
        h.update(b"\x00")
        h.update(v.encode())
        h.update(b"\x01")
    return h.hexdigest()


def cache_key(modality: str, backbone: Backbone, precision: str, ids: Sequence[str], values: Sequence[str],
              decode: str = "cpu") -> str:
    """What decides the embeddings: the weights that compute them (images: the whole backbone, so the
    checkpoint; reports: the text tower's, ``Backbone.text_key``), preprocessing/tokenizer, precision, rows,
    and for images the decode path when it is not the CPU reader (device decoding differs in rounding)."""
    weights = backbone.fingerprint if modality == "image" else getattr(backbone, "text_key", backbone.fingerprint)
    parts = {
        "version": CACHE_VERSION, "modality": modality, "fingerprint": weights,
        "precision": precision, "rows": _hash_items(ids, values),
        "transform": repr(backbone.preprocess) if modality == "image" else
        f"{type(backbone.tokenizer).__name__}:{backbone.context_length}",
    }
    if modality == "image" and decode != "cpu":
        parts["decode"] = decode
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


# ---- datasets ----------------------------------------------------------------------------------

class ImageFiles(Dataset):
    """Item ``i``: ``(i, tensor, None)``, or ``(i, None, reason)`` when the file cannot be read."""

    def __init__(self, paths: Sequence[str], preprocess):
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_cxr_image(self.paths[i])), None
        except ImageReadError as exc:
            return i, None, exc.reason
        except Exception as exc:  # noqa: BLE001 - a transform failing on one odd file is that file's skip
            return i, None, f"preprocess failed: {type(exc).__name__}: {exc}"


class Texts(Dataset):
    """Item ``i``: ``(i, text, None)``, or ``(i, None, "empty report")``."""

    def __init__(self, texts: Sequence[str]):
        self.texts = list(texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        text = self.texts[i].strip()
        return (i, text, None) if text else (i, None, "empty report")


def collate_items(batch):
    """-> (indices of good items, their tensors stacked or texts listed (None if none), [(index, reason)])."""
    good = [(i, x) for i, x, r in batch if r is None]
    bad = [(i, r) for i, _, r in batch if r is not None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.long)
    if not good:
        return idx, None, bad
    xs = [x for _, x in good]
    return idx, (torch.stack(xs) if isinstance(xs[0], torch.Tensor) else xs), bad


# ---- shards ------------------------------------------------------------------------------------

def _shard_path(shard_dir: Path, chunk: int) -> Path:
    return shard_dir / f"chunk-{chunk:06d}.npz"


def _write_shard(path: Path, ids: list[str], emb: np.ndarray, bad: list[tuple[str, str]]) -> None:
    try:
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=np.array(ids, dtype=str), emb=emb.astype(np.float32),
                         bad_ids=np.array([b[0] for b in bad], dtype=str),
                         bad_reasons=np.array([b[1] for b in bad], dtype=str))
    except OSError as exc:
        raise OSError(f"cannot write embedding shard {path} ({exc.strerror or exc}); is the disk full?") from exc


def _read_shard(path: Path, expected: list[str]) -> dict[str, Any] | None:
    """A shard's contents, or None when it is unreadable or does not cover exactly ``expected``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("ids", "emb", "bad_ids", "bad_reasons")}
    except Exception:  # noqa: BLE001 - any unreadable shard is recomputed
        return None
    got = out["ids"].tolist() + out["bad_ids"].tolist()
    if sorted(got) != sorted(expected) or len(out["ids"]) != len(out["emb"]):
        return None
    return out


# ---- the extraction loop -----------------------------------------------------------------------

def trim_padding(tokenizer: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Drop trailing all-padding columns for Hugging Face text towers (they mask padding, so the
    features are unchanged); open_clip's own text transformer needs the full context, so it is kept."""
    from open_clip.tokenizer import HFTokenizer

    if not isinstance(tokenizer, HFTokenizer) or tokens.numel() == 0:
        return tokens
    pad = tokenizer.tokenizer.pad_token_id
    used = (tokens != pad).any(0).nonzero()
    return tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]


def _encode(model, modality: str, x, tokenizer, device: str, precision: str, to_numpy: bool = True):
    """L2-normalised float32 features of one batch: a numpy array, or with ``to_numpy=False`` a tensor
    left on the device (no host sync: the extraction loop reads a chunk's features once)."""
    with torch.inference_mode():
        with autocast(device, precision):
            if modality == "image":
                out = model.encode_image(x.to(device, non_blocking=True))
            else:  # texts arrive length-sorted within a chunk, so trimming padding saves most of the work
                out = model.encode_text(trim_padding(tokenizer, tokenizer(x)).to(device))
        out = F.normalize(out.float(), dim=-1)  # in float32, outside autocast
    return out.cpu().numpy() if to_numpy else out


def _valid_chunks(shard_dir: Path, ids: list[str], chunk_size: int) -> set[int]:
    if not shard_dir.is_dir():
        return set()
    n_chunks = -(-len(ids) // chunk_size)
    return {c for c in range(n_chunks) if _shard_path(shard_dir, c).is_file() and
            _read_shard(_shard_path(shard_dir, c), ids[c * chunk_size:(c + 1) * chunk_size]) is not None}


def _run_chunks(modality: str, values: list[str], ids: list[str], chunks: list[int], chunk_size: int,
                backbone: Backbone, shard_dir: Path, batch_size: int, num_workers: int | str, device: str,
                precision: str, progress: bool, desc: str, decode: str = "cpu", compile_model: bool = False,
                limiter: accel.BatchLimiter | None = None) -> None:
    """Embed the listed chunks and write one shard per chunk (``limiter`` shrinks on out-of-memory)."""
    if not chunks:
        return
    limiter = limiter or accel.BatchLimiter(batch_size)
    batches, owner = [], []
    copies: dict[int, list[int]] = {}  # a text's first row in its chunk -> the chunk's other rows of that text
    for c in chunks:
        lo, hi = c * chunk_size, min((c + 1) * chunk_size, len(ids))
        rows = list(range(lo, hi))
        if modality == "text":  # identical reports are encoded once per chunk (bit-identical features)
            first: dict[str, int] = {}
            for i in rows:
                if values[i] in first:
                    copies.setdefault(first[values[i]], []).append(i)
                else:
                    first[values[i]] = i
            rows = sorted(first.values(), key=lambda i: len(values[i]))  # similar lengths share a batch
        for b in range(0, len(rows), batch_size):
            batches.append(rows[b:b + batch_size])
            owner.append(c)
    left = Counter(owner)
    on_device = modality == "image" and decode == "device"
    if on_device:
        dataset = accel.EncodedImages(values, backbone.preprocess, load_cxr_image)
        pre = accel.DevicePreprocess.from_backbone(backbone)
    else:
        dataset = ImageFiles(values, backbone.preprocess) if modality == "image" else Texts(values)
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=accel.collate_encoded if on_device else collate_items,
                        **accel.loader_settings(device, num_workers if modality == "image" else 0))
    model = backbone.model
    if compile_model and modality == "image":  # open_clip's encode_image through torch.compile, model untouched
        model = _Encoders(accel.maybe_compile(backbone.model.encode_image, True), backbone.model.encode_text)
    acc: dict[int, dict[str, list]] = {}
    n_items = sum(len(b) for b in batches)
    with tqdm(total=n_items, desc=desc, unit=modality, disable=not progress, smoothing=0.05) as bar:
        for c, (idx, x, bad) in zip(owner, loader):
            a = acc.setdefault(c, {"ids": [], "emb": [], "bad": []})
            if isinstance(x, accel.EncodedBatch):  # JPEG bytes -> decoded, resized, normalised on the device
                x, kept, failed = accel.decode_on_device(x, idx.tolist(), pre, device, dataset.cpu_item)
                idx, bad = idx[kept], bad + failed
            if x is not None and len(idx):
                emb = accel.run_in_batches(
                    lambda part: _encode(model, modality, part, backbone.tokenizer, device, precision, to_numpy=False),
                    x, limiter)
                rows = [(j, i) for j, i in enumerate(idx.tolist()) for i in (i, *copies.get(i, ()))]
                a["emb"].append(emb[[j for j, _ in rows]] if copies else emb)
                a["ids"].extend(ids[i] for _, i in rows)
            a["bad"].extend((ids[k], r) for i, r in bad for k in (i, *copies.get(i, ())))
            bar.update(len(idx) + len(bad))
            left[c] -= 1
            if left[c] == 0:
                with torch.inference_mode():  # the chunk's one device-to-host copy
                    emb = torch.cat(a["emb"]).cpu().numpy() if a["emb"] else np.zeros((0, backbone.embed_dim), np.float32)
                _write_shard(_shard_path(shard_dir, c), a["ids"], emb, a["bad"])
                del acc[c]


class _Encoders:
    """``encode_image`` / ``encode_text`` stand-in (a compiled image forward beside the model's text forward)."""

    def __init__(self, encode_image, encode_text):
        self.encode_image, self.encode_text = encode_image, encode_text


def resolve_decode(decode: str, device: str, backbone: Backbone) -> str:
    """``auto`` -> ``device`` on CUDA when the GPU decoder works and the transform has a device twin, else ``cpu``.

    ``device`` asked for explicitly and impossible is an error saying why (e.g. a CPU build of torchvision).
    """
    if decode not in ("auto", "cpu", "device"):
        raise ValueError(f"decode must be auto, cpu or device, got {decode!r}")
    if decode == "cpu" or (decode == "auto" and not accel.is_cuda(device)):
        return "cpu"
    problem = None if accel.DevicePreprocess.from_backbone(backbone) else \
        f"backbone {backbone.name}'s image transform has no device version"
    problem = problem or accel.decoder_problem(device)
    if problem and decode == "device":
        raise accel.DeviceError(f"decode=device: {problem}")
    if problem:
        print(f"decoding images on CPU workers: {problem}", file=sys.stderr)
        return "cpu"
    return "device"


def resolve_batch_size(batch_size: int | str, modality: str, backbone: Backbone, device: str,
                       precision: str) -> int:
    """An int passes; ``auto`` -> :data:`AUTO_BATCH` ``cpu`` on CPU, else the largest probed batch that fits."""
    if batch_size != "auto":
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
        return batch_size
    if not accel.is_cuda(device):
        return AUTO_BATCH["cpu"]
    if modality == "image":
        size = accel.DevicePreprocess.from_backbone(backbone)
        hw = size.size if size else (224, 224)

        def probe(n: int):
            return _encode(backbone.model, "image", torch.zeros(n, 3, *hw), None, device, precision)
        limit = AUTO_BATCH["image_limit"]
    else:
        def probe(n: int):  # full-context texts: the most memory a text batch can take
            return _encode(backbone.model, "text", ["x " * 2 * backbone.context_length] * n, backbone.tokenizer,
                           device, precision)
        limit = AUTO_BATCH["text_limit"]
    return accel.find_batch_size(probe, start=AUTO_BATCH["start"], limit=limit)


def _merge(modality: str, ids: list[str], shard_dir: Path, n_chunks: int, chunk_size: int,
           meta: dict[str, Any], out_path: Path) -> tuple[int, list[dict[str, str]]]:
    """Merge the shards by id in item order; returns (count, skipped)."""
    emb_by_id: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    for c in range(n_chunks):
        shard = _read_shard(_shard_path(shard_dir, c), ids[c * chunk_size:(c + 1) * chunk_size])
        if shard is None:
            raise RuntimeError(f"embedding shard {c} of {modality} is missing or incomplete in {shard_dir}")
        for i, e in zip(shard["ids"].tolist(), shard["emb"]):
            emb_by_id.setdefault(i, e)  # a duplicate id (padding) keeps its first copy
        skipped.update(zip(shard["bad_ids"].tolist(), shard["bad_reasons"].tolist()))
    order = [i for i in ids if i in emb_by_id]
    if not order:
        raise RuntimeError(f"no {modality} could be embedded: all {len(ids)} skipped "
                           f"(e.g. {list(skipped.items())[:3]})")
    emb = np.stack([emb_by_id[i] for i in order]).astype(np.float32)
    skips = [{"id": i, "reason": skipped[i]} for i in ids if i in skipped]
    meta = {**meta, "dim": int(emb.shape[1]), "n_skipped": len(skips), "skipped": skips}
    try:
        save_embeddings(out_path, Embeddings(ids=np.array(order), emb=emb, meta=meta))
    except OSError as exc:
        raise OSError(f"cannot write {out_path} ({exc.strerror or exc}); is the disk full?") from exc
    return len(order), skips


_dist, _barrier = runtime.world, runtime.barrier


def _read_stamp(out_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _meta(path: Path) -> dict[str, Any] | None:
    """The metadata of an embedding file, or None when it is absent or unreadable."""
    if not path.is_file():
        return None
    try:
        return load_embeddings(path).meta
    except (OSError, ValueError, KeyError):
        return None


def _has_key(path: Path, key: str | None) -> bool:
    """True when the embedding file ``path`` exists and was written for ``key``."""
    meta = _meta(path) if key else None
    return meta is not None and meta.get("cache_key") == key


def _cached(out_dir: Path, modality: str, key: str | None) -> bool:
    """True when ``<modality>.npz`` exists and was written for ``key`` (files are atomic and self-describing)."""
    return _has_key(out_dir / f"{modality}.npz", key)


def store_path(store: Path, modality: str, key: str) -> Path:
    """A modality's file in the shared store, named by its cache key."""
    return store / f"{modality}-{key}.npz"


def _source(out_dir: Path, modality: str, key: str, store: Path | None) -> Path | None:
    """Where embeddings for ``key`` already are: the set's own file, else the shared store's, else None."""
    own = out_dir / f"{modality}.npz"
    if _has_key(own, key):
        return own
    shared = store_path(store, modality, key) if store is not None and modality == "text" else None
    return shared if shared is not None and _has_key(shared, key) else None


def _is_own(out_dir: Path, modality: str, source: Path, label: str, fp: str) -> bool:
    """The set's own file, written for this backbone name and fingerprint (nothing to rewrite)."""
    meta = _meta(source) or {}
    return source == out_dir / f"{modality}.npz" and meta.get("backbone") == label and meta.get("fingerprint") == fp


def _adopt(source: Path, target: Path, meta: dict[str, Any]) -> None:
    """Write ``source``'s embeddings to ``target`` (atomically) under this set's ``meta``."""
    emb = load_embeddings(source)
    emb.meta = {**emb.meta, **meta}
    if source != target:
        emb.meta["copied_from"] = source.name
    save_embeddings(target, emb)


def _publish(path: Path, store: Path, modality: str, key: str) -> None:
    """Copy a freshly merged file into the shared store (atomically); a failure only costs reuse."""
    try:
        with atomic_path(store_path(store, modality, key), suffix=".npz") as tmp:
            shutil.copyfile(path, tmp)
    except OSError as exc:
        print(f"warning: could not keep {modality} embeddings in the shared store {store}: {exc}", file=sys.stderr)


def extract_embeddings(table: pd.DataFrame | str | os.PathLike, backbone: Backbone | str,
                       out_dir: str | os.PathLike, modalities: Sequence[str] = MODALITIES,
                       batch_size: int | str = 64, num_workers: int | str = 2, precision: str = "auto",
                       device: str = "auto", checkpoint: str | os.PathLike | None = None,
                       name: str | None = None, chunk_size: int | None = None,
                       progress: bool = True, decode: str = "auto", compile: bool = False,
                       text_store: str | os.PathLike | None = None) -> ExtractionResult:
    """Embed a study table's images and/or reports into ``out_dir`` (cached, resumable, rank-sharded).

    ``backbone`` is a loaded :class:`Backbone` or a name for :func:`load_backbone` (with
    ``checkpoint``); ``name`` is recorded as the embeddings' backbone (default: the backbone's name,
    e.g. ``offline-adapted`` for an adapted checkpoint). ``chunk_size`` (default 16 batches) is the
    unit of resumption. ``batch_size`` and ``num_workers`` may be ``"auto"``; ``decode`` is ``auto``,
    ``cpu`` or ``device`` and ``compile`` wraps the image forward in ``torch.compile`` (module docstring).
    ``text_store`` (a folder) shares text features across sets whose backbones have one text tower.
    Returns ``{modality: path}`` with ``.skipped``, ``.cached`` (True: nothing encoded), ``.counts``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    bad_mod = [m for m in modalities if m not in MODALITIES]
    if bad_mod or not modalities:
        raise ValueError(f"modalities must be a non-empty subset of {MODALITIES}, got {list(modalities)}")
    resolve_batch_size(batch_size, "image", None, "cpu", "fp32")  # validates before any work
    device = accel.require_device(resolve_device(device))
    if isinstance(table, (str, os.PathLike)):
        table = pd.read_parquet(table)
    precision = resolve_precision(precision, device)
    if isinstance(backbone, str):
        backbone = load_backbone(backbone, device=device, checkpoint=checkpoint)
    else:
        backbone.model.to(device).eval()
    label = name or backbone.name
    chunk_size = int(chunk_size or (AUTO_BATCH["cpu"] if batch_size == "auto" else batch_size) * 16)
    rank, world = _dist()
    decode = resolve_decode(decode, device, backbone) if "image" in modalities else "cpu"

    items = {m: image_items(table) if m == "image" else text_items(table) for m in modalities}
    keys = {m: cache_key(m, backbone, precision, *items[m], decode=decode) for m in modalities}
    store = Path(text_store) if text_store else None
    stamp = _read_stamp(out_dir)
    sources = {m: _source(out_dir, m, keys[m], store) for m in modalities}
    cached = {m: sources[m] is not None for m in modalities}
    # found under this key but written for another set (the shared store) or another name: rewritten, not encoded
    adopt = [m for m in modalities if cached[m] and not _is_own(out_dir, m, sources[m], label, backbone.fingerprint)]
    if store is not None and rank == 0 and "text" in modalities and sources["text"] == out_dir / "text.npz" \
            and not store_path(store, "text", keys["text"]).is_file():  # a set embedded before the store existed
        _publish(sources["text"], store, "text", keys["text"])
    _barrier()  # every rank has read the stamp before rank 0 may remove it
    todo = [m for m in modalities if not cached[m]]
    # chunks with a valid shard from an interrupted run (scanned before any rank writes)
    done_chunks = {m: _valid_chunks(out_dir / PARTIAL / f"{m}-{keys[m]}-c{chunk_size}", items[m][0], chunk_size)
                   for m in todo}
    _barrier()
    if (todo or adopt) and rank == 0:
        (out_dir / STAMP).unlink(missing_ok=True)
    if not todo and not adopt and stamp.get("backbone") == label and stamp.get("fingerprint") == backbone.fingerprint \
            and all(stamp.get("modalities", {}).get(m, {}).get("key") == keys[m] for m in modalities):
        if rank == 0:  # a cache hit still stamps its target: make sees it up to date, not stale forever
            os.utime(out_dir / STAMP)
        return ExtractionResult({m: out_dir / f"{m}.npz" for m in modalities},
                                {m: stamp["modalities"][m]["skipped"] for m in modalities}, cached,
                                out_dir / STAMP, {m: stamp["modalities"][m]["n"] for m in modalities})

    meta_of = {m: {"backbone": label, "fingerprint": backbone.fingerprint, "modality": m, "precision": precision,
                   "cache_key": keys[m], "source_backbone": backbone.name,
                   **({"text_fingerprint": getattr(backbone, "text_key", backbone.fingerprint)} if m == "text" else {})}
               for m in modalities}
    if rank == 0:
        for m in adopt:
            _adopt(sources[m], out_dir / f"{m}.npz", meta_of[m])
    backends = accel.configure_backends(backbone.model.visual, device) if "image" in todo else {}
    limiters = {}
    for m in todo:
        ids, values = items[m]
        shard_dir = out_dir / PARTIAL / f"{m}-{keys[m]}-c{chunk_size}"
        shard_dir.mkdir(parents=True, exist_ok=True)
        n_chunks = -(-len(ids) // chunk_size)
        mine = [c for c in range(n_chunks) if c % world == rank and c not in done_chunks[m]]
        limiters[m] = accel.BatchLimiter(resolve_batch_size(batch_size, m, backbone, device, precision)
                                         if mine or batch_size != "auto" else AUTO_BATCH["cpu"])
        _run_chunks(m, values, ids, mine, chunk_size, backbone, shard_dir, limiters[m].size, num_workers, device,
                    precision, progress and rank == 0, f"{label} {m}" + (f" [rank {rank}/{world}]" if world > 1 else ""),
                    decode=decode, compile_model=compile, limiter=limiters[m])
    _barrier()

    if rank == 0:
        for m in todo:
            ids, _ = items[m]
            shard_dir = out_dir / PARTIAL / f"{m}-{keys[m]}-c{chunk_size}"
            _merge(m, ids, shard_dir, -(-len(ids) // chunk_size), chunk_size, meta_of[m], out_dir / f"{m}.npz")
            shutil.rmtree(shard_dir, ignore_errors=True)  # only once the merged file is on disk
            if store is not None and m == "text":
                _publish(out_dir / f"{m}.npz", store, m, keys[m])
        with contextlib.suppress(OSError):
            (out_dir / PARTIAL).rmdir()
        entries = {m: _entry(out_dir, m) for m in modalities}
        for m in todo:
            entries[m]["chunks_reused"] = len(done_chunks[m])
        for m in adopt:
            entries[m]["copied_from"] = str(sources[m])
        # other modalities embedded earlier stay listed while their files still hold the key they had
        for m, old in stamp.get("modalities", {}).items():
            if m not in entries and _cached(out_dir, m, old.get("key")):
                entries[m] = _entry(out_dir, m)
        write_json(out_dir / STAMP, {
            "backbone": label, "source_backbone": backbone.name, "fingerprint": backbone.fingerprint,
            "checkpoint": str(checkpoint) if checkpoint else None, "precision": precision, "device": device,
            "world_size": world, "batch_size": batch_size, "chunk_size": chunk_size, "decode": decode,
            "compile": bool(compile), **backends,
            # rank 0's batch size after any out-of-memory back-off, and how many back-offs it took
            "batch_size_used": {m: lim.size for m, lim in limiters.items()},
            "oom_backoffs": {m: lim.backoffs for m, lim in limiters.items()},
            "seconds": round(time.perf_counter() - t0, 2), "modalities": entries,
        })
    _barrier()
    entries = _read_stamp(out_dir)["modalities"]
    return ExtractionResult({m: out_dir / f"{m}.npz" for m in modalities},
                            {m: entries[m]["skipped"] for m in modalities}, cached,
                            out_dir / STAMP, {m: entries[m]["n"] for m in modalities})


def _entry(out_dir: Path, modality: str) -> dict[str, Any]:
    """The stamp's record of one embedding file, from the file's own metadata."""
    emb = load_embeddings(out_dir / f"{modality}.npz")
    skips = emb.meta.get("skipped", [])
    return {"key": emb.meta["cache_key"], "file": f"{modality}.npz", "n": len(emb.ids), "dim": emb.dim,
            "n_skipped": len(skips), "skip_reasons": dict(Counter(_reason_kind(s["reason"]) for s in skips)),
            "skipped": skips}


def _reason_kind(reason: str) -> str:
    """The reason's category for counting (``file not found``, ``OSError``, ``empty report``, ...)."""
    return reason.split(":", 1)[0].strip()


# ---- command line (plain or under torchrun) ----------------------------------------------------

def _init_distributed(device: str) -> str:
    """Join the torchrun process group when WORLD_SIZE > 1; returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    use_cuda = resolve_device(device).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=12))
    return device


def _int_or_auto(value: str) -> int | str:
    return "auto" if value == "auto" else int(value)


def torchrun_command(table: str | os.PathLike, out_dir: str | os.PathLike, nproc: int,
                     args: Iterable[str] = ()) -> list[str]:
    """The ``torchrun`` command that extracts ``table`` into ``out_dir`` on ``nproc`` ranks (``args``: more of
    this module's command-line options, e.g. ``--backbone``)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "cxrlib.embed", "--table", str(table), "--out-dir", str(out_dir), *args]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.embed", description=__doc__.split("\n")[0])
    ap.add_argument("--table", required=True, help="study table (parquet)")
    ap.add_argument("--backbone", required=True, help="backbone name (see cxrlib.backbones)")
    ap.add_argument("--checkpoint", default=None, help="adapted weights for the backbone")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--name", default=None, help="name recorded as the embeddings' backbone")
    ap.add_argument("--modalities", default="image,text")
    default = {k: settings.lookup("embed", k).default for k in ("batch_size", "num_workers", "decode", "precision")}
    ap.add_argument("--batch-size", type=_int_or_auto, default=default["batch_size"], help="an int, or auto (largest that fits)")
    ap.add_argument("--num-workers", type=_int_or_auto, default=default["num_workers"], help="an int, or auto (from the cores)")
    ap.add_argument("--decode", default=default["decode"], choices=["auto", "cpu", "device"], help="where JPEGs are decoded")
    ap.add_argument("--compile", action="store_true", help="torch.compile the image forward")
    ap.add_argument("--precision", default=default["precision"], choices=["auto", "fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--text-store", default=None,
                    help="folder of text embeddings shared across sets by key (default: the embeddings' "
                         ".shared/text; '' turns sharing off)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:  # one line, before any work, for a device this machine cannot use
        accel.require_device(resolve_device(args.device))
    except accel.DeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    determinism.enable_from_env()  # make's run of a deterministic profile (cxrlib.determinism)
    device = _init_distributed(args.device)
    try:
        result = extract_embeddings(
            args.table, args.backbone, args.out_dir, modalities=[m for m in args.modalities.split(",") if m],
            batch_size=args.batch_size, num_workers=args.num_workers, precision=args.precision, device=device,
            checkpoint=args.checkpoint, name=args.name, chunk_size=args.chunk_size, progress=not args.no_progress,
            decode=args.decode, compile=args.compile,
            text_store=paths.text_store_dir() if args.text_store is None else (args.text_store or None))
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if _dist()[0] == 0 and int(os.environ.get("RANK", "0")) == 0:
        print(repr(result))
        for m, skips in result.skipped.items():
            for s in skips[:20]:
                print(f"skipped {m} {s['id']}: {s['reason']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
