"""Contrastive adaptation of an open_clip backbone on the training split (notebook 00).

The image tower is trained end to end on radiographs streamed from disk; the text tower is locked
(default: each distinct report's features are computed once and cached, which makes CPU training fast;
notebook 00 reads them from the base backbone's frozen embedding set, the same text tower's, which make
builds first: ``AdaptConfig.text_features``) or trained too. The objective is :class:`cxrlib.losses.MultiTaskLoss`, the projector's loss, applied to the
backbone's own normalised embeddings (BCE through a small linear head on them). Default weights are
CLIP only: adaptation aligns the image tower with the report space, and the paper's multi-task
objective (and its ablation) stays with the projector, so SupCon/BCE effects are not baked into the
backbone. AdamW with linear warm-up then cosine decay; validation loss and retrieval recall each
epoch; early stopping on ``monitor``; the best epoch's weights are kept.

The checkpoint is ``torch.save({"backbone", "state_dict", "config", "history", "classifier"})`` at
:func:`checkpoint_path`, written atomically; ``cxrlib.backbones.load_backbone(name,
checkpoint=path)`` loads it. Under ``torchrun`` (``WORLD_SIZE > 1``: ``python -m cxrlib.adapt``)
the model is wrapped in DDP, each rank takes a shard of every epoch and the contrastive terms gather
across ranks; rank 0 writes the checkpoint.

Small datasets (the offline demo) can set ``cache_images``: every image is decoded and resized
once and kept in memory as uint8, and the same augmentations run on tensors, so epochs no longer
re-decode PNGs. The offline profile also adds SupCon and BCE to CLIP (its tower starts random and
the labels are there); what that adaptation reaches is in notebook 00's ``adapt_history.csv`` under
``results/``, never typed here.

``adapt()`` runs named steps: :func:`_prepare_rows` (train/val rows, distinct reports, groups),
:func:`_prepare_text` (the locked-text cache or tokens), :func:`_build_net` (trainable parameters,
classifier head, DDP), :func:`_make_loaders` (streamed or cached images), :func:`_optimiser`, then
:func:`_fit` (epochs, validation, early stopping) and :func:`_run_record` (what the checkpoint records).
Rank, device, autocast, the warm-up-cosine schedule and parameter groups come from :mod:`cxrlib.runtime`.

Radiograph augmentation: a small random-resized crop, a few degrees of rotation, brightness and
contrast jitter; no horizontal flip by default (it moves the heart to the wrong side).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm.auto import tqdm

from cxrlib import accel, runtime, settings
from cxrlib.backbones import ADAPTED_SUFFIX  # noqa: F401  (re-exported: defined once, in backbones)
from cxrlib.embed import cache_key, text_items, trim_padding  # trim_padding: also re-exported
from cxrlib.embstore import load_embeddings
from cxrlib.images import ImageReadError, load_cxr_image
from cxrlib.projector import clamp_logit_scale_
from cxrlib.runtime import param_groups, resolve_device

REQUIRED_COLUMNS = ("study_id", "image_id", "image_path", "report", "label_abnormal", "split")
MONITORS = {"val_loss": "min", "val_recall": "max"}
#: autocast precisions; fp16 (for GPUs without bf16) trains with a loss scaler (accel.grad_scaler)
PRECISIONS = ("fp32", "bf16", "fp16")
#: the precision of the locked-text cache (:func:`encode_texts` runs without autocast); features read from a
#: frozen embedding set must have been extracted in it
TEXT_CACHE_PRECISION = "fp32"


# ---- configuration -------------------------------------------------------------------------------

@dataclass
class AugmentConfig:
    """Train-time augmentation for radiographs (all mild; ``hflip`` off because it breaks anatomy)."""

    scale: tuple[float, float] = (0.85, 1.0)
    ratio: tuple[float, float] = (0.9, 1.1)
    rotation: float = 7.0
    brightness: float = 0.2
    contrast: float = 0.2
    hflip: bool = False


#: notebook 00's settings (cxrlib.settings, group "adapt"), by AdaptConfig field name; the loss weights
#: ``adapt_w_<term>`` form the one field ``weights`` (term -> weight)
_ADAPT_SETTINGS = settings.defaults("adapt")
_W_PREFIX = settings.WEIGHT_PREFIX[settings.ADAPT]
_WEIGHTS = settings.weights_from(_ADAPT_SETTINGS, _W_PREFIX)
_ADAPT = {k.removeprefix("adapt_"): v for k, v in _ADAPT_SETTINGS.items() if not k.startswith(_W_PREFIX)}


@dataclass
class AdaptConfig:
    """Every setting of one adaptation run (recorded in the checkpoint); the ones notebook 00 exposes take
    their defaults from :mod:`cxrlib.settings` (``adapt_epochs`` -> ``epochs`` ...)."""

    backbone: str
    dataset: str = ""
    seed: int = 0
    epochs: int = _ADAPT["epochs"]
    lr: float = _ADAPT["lr"]
    weight_decay: float = 0.05
    batch_size: int = _ADAPT["batch_size"]
    warmup_frac: float = 0.1
    lock_text: bool = _ADAPT["lock_text"]
    image_size: int | None = _ADAPT["image_size"]
    #: loss term -> weight (cxrlib.losses.MultiTaskLoss; a term left out keeps its ``adapt_w_<term>`` default)
    weights: dict[str, float] = field(default_factory=lambda: dict(_WEIGHTS))
    supcon_temperature: float = 0.1
    #: DataLoader workers reading images: an int, or "auto" (from the cores, resolved where the loaders are built)
    num_workers: int | str = _ADAPT["num_workers"]
    #: decode + resize every image once and keep it in memory (uint8; augmentation on tensors)
    cache_images: bool = _ADAPT["cache_images"]
    max_steps: int | None = _ADAPT["max_steps"]
    monitor: str = _ADAPT["monitor"]
    patience: int = _ADAPT["patience"]
    precision: str = _ADAPT["precision"]
    device: str = "cpu"
    eval_batch_size: int = 64
    recall_ks: tuple[int, ...] = (1, 5, 10)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    #: the base backbone's frozen embedding set's ``text.npz`` (notebook 00: the one make builds first): with a
    #: locked text tower the reports' features are read from it (:func:`read_text_features`) when it was
    #: extracted by this text tower, in fp32, from this table; otherwise (or None) they are encoded here
    text_features: str | None = None

    def __post_init__(self):
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig(**self.augment)
        if self.text_features is not None:
            self.text_features = str(self.text_features)
        self.recall_ks = tuple(int(k) for k in self.recall_ks)
        unknown = sorted(set(self.weights) - set(_WEIGHTS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown} in AdaptConfig.weights; the terms are {', '.join(_WEIGHTS)}")
        self.weights = {**_WEIGHTS, **self.weights}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (the schema's validator for the notebook's settings)."""
        names = {n: f"adapt_{n}" if f"adapt_{n}" in _ADAPT_SETTINGS else n for n in _ADAPT}
        settings.validate(settings.ADAPT, {**{names[n]: getattr(self, n) for n in _ADAPT},
                                           **settings.flat_weights(self.weights, _W_PREFIX)})
        checks = {"warmup_frac": 0 <= self.warmup_frac < 1, "seed": isinstance(self.seed, int) and self.seed >= 0}
        for k, ok in checks.items():
            if not ok:
                raise ValueError(f"{k} out of range: {getattr(self, k)!r}")
        if self.precision == "fp16" and str(self.device).startswith(("cpu", "mps")):
            raise ValueError(f"precision fp16 is for GPUs (trained with a loss scaler); on {self.device} use fp32 or bf16")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def workers(self) -> int:
        """``num_workers`` as a count (``"auto"``: :func:`cxrlib.accel.default_num_workers`)."""
        return accel.default_num_workers() if self.num_workers == "auto" else int(self.num_workers)


def checkpoint_path(dataset: str, backbone: str) -> Path:
    """``models_dir()/<dataset>/<backbone>-adapted.pt`` (the path the make DAG expects)."""
    from cxrlib.backbones import adapted_checkpoint

    return adapted_checkpoint(dataset, backbone)


# ---- transforms ----------------------------------------------------------------------------------

def image_config(model: nn.Module, preprocess: Any = None) -> dict[str, Any]:
    """The model's input size, mean, std (from ``visual.preprocess_cfg`` or the eval ``preprocess``)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", None) or {})
    if preprocess is not None and ("mean" not in cfg or "std" not in cfg):
        for t in getattr(preprocess, "transforms", []):
            if isinstance(t, T.Normalize):
                cfg.setdefault("mean", tuple(t.mean))
                cfg.setdefault("std", tuple(t.std))
    size = cfg.get("size") or getattr(model.visual, "image_size", None)
    if size is None or "mean" not in cfg:
        raise ValueError("cannot derive the input size / mean / std of this backbone's image tower")
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return {"size": size, "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"])}


def train_transform(size: int, mean: tuple, std: tuple, aug: AugmentConfig | None = None) -> T.Compose:
    """Random-resized crop (mild), rotation, brightness/contrast; optional flip; then normalise."""
    aug = aug or AugmentConfig()
    steps: list[Any] = [T.RandomResizedCrop(size, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                                            interpolation=T.InterpolationMode.BICUBIC)]
    if aug.rotation > 0:
        steps.append(T.RandomRotation(aug.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


# ---- data ----------------------------------------------------------------------------------------

class ImageReportDataset(Dataset):
    """Row ``i`` of a study table -> ``{"index": i, "image": tensor}``, read from disk each time.

    An unreadable image yields ``{"index": i, "error": reason}`` instead of raising, so a worker
    never dies on one bad file; :func:`collate_skipping` moves it to the batch's ``skipped`` list.
    """

    def __init__(self, image_paths: list[str], transform: Any):
        self.image_paths = [str(p) for p in image_paths]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            img = load_cxr_image(self.image_paths[i], mode="RGB")
        except ImageReadError as exc:
            return {"index": i, "error": exc.reason}
        return {"index": i, "image": self.transform(img)}


class CachedImageDataset(Dataset):
    """Like :class:`ImageReportDataset` but each image is decoded once, up front, and kept in memory.

    Training rows are stored as 1-channel uint8 tensors resized (shortest side) and centre-cropped to
    ``size`` and augmented on tensors (:func:`tensor_train_transform`); evaluation rows store the
    output of ``eval_transform`` (the backbone's own preprocessing) so validation sees exactly what
    embedding extraction sees. Saves re-decoding PNGs every epoch, the main CPU cost of small towers.
    """

    def __init__(self, image_paths: list[str], rows: list[int], size: int, transform: Any,
                 eval_transform: Any = None, progress: bool = False):
        self.transform, self.items = transform, {}
        resize = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(size),
                            T.PILToTensor()])
        for i in tqdm(rows, desc="cache images", disable=not progress, leave=False):
            try:
                img = load_cxr_image(image_paths[i], mode="L" if eval_transform is None else "RGB")
            except ImageReadError as exc:
                self.items[i] = exc.reason
                continue
            self.items[i] = resize(img) if eval_transform is None else eval_transform(img)
        self.rows = list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int) -> dict[str, Any]:
        i = self.rows[j]
        item = self.items[i]
        if isinstance(item, str):
            return {"index": i, "error": item}
        return {"index": i, "image": self.transform(item) if self.transform is not None else item}


def _gray_to_rgb(x: torch.Tensor) -> torch.Tensor:
    return x.expand(3, -1, -1)


def tensor_train_transform(size: int, mean: tuple, std: tuple, aug: AugmentConfig | None = None) -> T.Compose:
    """:func:`train_transform` on a cached 1-channel uint8 tensor: same augmentations, then 3 channels."""
    aug = aug or AugmentConfig()
    steps: list[Any] = [T.RandomResizedCrop(size, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                                            interpolation=T.InterpolationMode.BILINEAR, antialias=True)]
    if aug.rotation > 0:
        steps.append(T.RandomRotation(aug.rotation, interpolation=T.InterpolationMode.BILINEAR))
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(T.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    if aug.hflip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.Lambda(_gray_to_rgb), T.ConvertImageDtype(torch.float32),
                              T.Normalize(mean, std)])


def collate_skipping(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable items; unreadable ones go to ``skipped`` as ``(index, reason)``."""
    good = [it for it in items if "image" in it]
    return {"index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "image": torch.stack([it["image"] for it in good]) if good else None,
            "skipped": [(it["index"], it["error"]) for it in items if "error" in it]}


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def check_table(table: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"study table lacks columns {missing}")
    for split in ("train", "val"):
        if not (table["split"] == split).any():
            raise ValueError(f"study table has no {split!r} rows: adaptation needs train and val")


# ---- model pieces --------------------------------------------------------------------------------

class AdaptModel(nn.Module):
    """The open_clip model plus a linear normal/abnormal head on its normalised embeddings.

    ``forward(images, text)`` returns the dict ``MultiTaskLoss`` expects; ``text`` is either token
    ids (text tower trained) or cached normalised text features (text tower locked).
    """

    def __init__(self, model: nn.Module, embed_dim: int, text_is_features: bool):
        super().__init__()
        self.model = model
        self.classifier = nn.Linear(embed_dim, 1)
        self.text_is_features = text_is_features

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        img = self.model.encode_image(images, normalize=True)
        txt = text if self.text_is_features else self.model.encode_text(text, normalize=True)
        scale = self.model.logit_scale.exp()  # kept <= log(100) in place after each step (clamp_logit_scale_)
        return {"image": img, "text": txt, "logit_scale": scale,
                "image_logits": self.classifier(img.float()).squeeze(-1),
                "text_logits": self.classifier(txt.float()).squeeze(-1)}


def set_trainable(model: nn.Module, lock_text: bool) -> list[str]:
    """Image tower (``visual.*``) and the logit scale train; the rest only when the text is unlocked."""
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad_(not lock_text or name.startswith("visual.") or name in ("logit_scale", "logit_bias"))
        if p.requires_grad:
            trainable.append(name)
    return trainable


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 64,
                 device: str | torch.device = "cpu", progress: bool = True) -> torch.Tensor:
    """L2-normalised text features of ``texts`` (the locked-text cache), in eval mode.

    Texts are batched by token length and padding is trimmed (:func:`trim_padding`), which makes a
    BERT-style tower several times faster on short reports; rows come back in the input order.
    """
    was_training = model.training
    model.eval()
    if not texts:
        return torch.empty(0)
    tokens = torch.cat([tokenizer(texts[i:i + 512]) for i in range(0, len(texts), 512)])
    order = torch.argsort((tokens != 0).sum(1), stable=True)
    out = torch.empty(0)
    for i in tqdm(range(0, len(texts), batch_size), desc="encode reports", disable=not progress, leave=False):
        rows = order[i:i + batch_size]
        feats = model.encode_text(trim_padding(tokenizer, tokens[rows]).to(device), normalize=True).float().cpu()
        if out.numel() == 0:
            out = torch.empty(len(texts), feats.shape[1])
        out[rows] = feats
    model.train(was_training)
    return out


def recall_at_k(img: torch.Tensor, txt: torch.Tensor, groups: np.ndarray, ks: tuple[int, ...]) -> dict[str, float]:
    """Image->text and text->image Recall@K; a hit is any item with the query's report group.

    Identical reports (same ``groups`` id) are interchangeable, so retrieving a duplicate of the
    paired report counts; ``i2t_R@k``, ``t2i_R@k`` and their mean ``recall`` (over all K) are returned.
    """
    g = torch.as_tensor(np.asarray(groups))
    same = g[:, None] == g[None, :]
    sims = img.float() @ txt.float().T
    out: dict[str, float] = {}
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        k_max = min(max(ks), s.shape[1])
        top = s.topk(k_max, dim=1).indices
        hits = same.gather(1, top)  # same is symmetric
        for k in ks:
            out[f"{name}_R@{k}"] = float(hits[:, :min(k, k_max)].any(1).float().mean())
    out["recall"] = float(np.mean([v for v in out.values()]))
    return out


# ---- training ------------------------------------------------------------------------------------

@dataclass
class AdaptResult:
    """The adapted open_clip model, per-epoch history, best epoch, skipped images and the config."""

    model: nn.Module
    classifier: nn.Module
    history: pd.DataFrame
    best_epoch: int
    skipped: pd.DataFrame
    config: dict[str, Any]


class _SkipLog:
    """Unreadable images by id (first reason kept); counted once however many epochs meet them."""

    def __init__(self, image_ids: np.ndarray):
        self.image_ids, self.reasons = image_ids, {}

    def add(self, skipped: list[tuple[int, str]]) -> None:
        for i, reason in skipped:
            self.reasons.setdefault(str(self.image_ids[i]), reason)

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"image_id": k, "reason": v} for k, v in self.reasons.items()],
                            columns=["image_id", "reason"])


def _loader(dataset: Dataset, batch_size: int, shuffle: bool, cfg: AdaptConfig, seed: int,
            drop_last: bool) -> DataLoader:
    _, world = runtime.world()
    sampler = None
    if world > 1 and shuffle:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
    g = torch.Generator().manual_seed(seed)
    workers = cfg.workers()
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, collate_fn=collate_skipping, drop_last=drop_last,
                      worker_init_fn=_seed_worker, generator=g, persistent_workers=workers > 0,
                      pin_memory=False)


def _text_input(idx: torch.Tensor, text_rows: torch.Tensor, text_cache: torch.Tensor | None,
                tokens: torch.Tensor | None, device: str, tokenizer: Any = None) -> torch.Tensor:
    rows = text_rows[idx]
    return (text_cache[rows] if text_cache is not None else trim_padding(tokenizer, tokens[rows])).to(device)


@torch.no_grad()
def _evaluate(net: AdaptModel, loader: DataLoader, labels: torch.Tensor, text_rows: torch.Tensor,
              text_cache: torch.Tensor | None, tokens: torch.Tensor | None, groups: np.ndarray,
              loss_fn: nn.Module, cfg: AdaptConfig, device: str, skips: _SkipLog, progress: bool,
              tokenizer: Any = None) -> dict[str, float]:
    """Validation loss (fixed batches of ``eval_batch_size``, in eval mode) and Recall@K on all val pairs."""
    net.eval()
    totals: dict[str, float] = {}
    n_batches = 0
    imgs, txts, kept = [], [], []
    for batch in tqdm(loader, desc="validate", disable=not progress, leave=False):
        skips.add(batch["skipped"])
        if batch["image"] is None or len(batch["index"]) < 2:
            continue
        idx = batch["index"]
        with runtime.autocast(device, cfg.precision):
            out = net(batch["image"].to(device), _text_input(idx, text_rows, text_cache, tokens, device, tokenizer))
        terms = loss_fn(out, labels[idx].to(device))
        for k, v in terms.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_batches += 1
        imgs.append(out["image"].float().cpu())
        txts.append(out["text"].float().cpu())
        kept.append(idx)
    net.train()
    if not n_batches:
        raise RuntimeError("no readable validation batch: every validation image was skipped")
    result = {f"val_{k}": v / n_batches for k, v in totals.items()}
    result["val_loss"] = result.pop("val_total")
    rec = recall_at_k(torch.cat(imgs), torch.cat(txts), groups[torch.cat(kept).numpy()], cfg.recall_ks)
    result.update({f"val_{k}": v for k, v in rec.items()})
    return result


@dataclass
class _Rows:
    """The train and val rows of one adaptation: their reports (each distinct text once), labels, groups."""

    table: pd.DataFrame
    texts: np.ndarray
    text_rows: torch.Tensor
    labels: torch.Tensor
    groups: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    skips: _SkipLog


@dataclass
class _Text:
    """What the model reads as text: cached features (locked tower) or token ids (trained tower); where the
    cached features came from (a frozen set's file, or ``"encoded"``: all here), how many were encoded here."""

    cache: torch.Tensor | None
    tokens: torch.Tensor | None
    tokenizer: Any
    seconds: float
    source: str | None = None
    n_encoded: int = 0
    note: str = ""

    def batch(self, rows: _Rows, idx: torch.Tensor, device: str) -> torch.Tensor:
        return _text_input(idx, rows.text_rows, self.cache, self.tokens, device, self.tokenizer)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _image_settings(model: nn.Module, backbone: Any, cfg: AdaptConfig) -> dict[str, Any]:
    icfg = image_config(model, backbone.preprocess)
    if cfg.image_size is not None and cfg.image_size != icfg["size"]:
        # load_backbone rebuilds the tower from its config, so a resized tower could not be loaded back
        raise ValueError(f"image_size={cfg.image_size} differs from backbone {cfg.backbone!r}'s input size "
                         f"{icfg['size']}: set the size in the backbone's config (configs/models/) or use None")
    return icfg


def _prepare_rows(table: pd.DataFrame) -> _Rows:
    """Train and val rows only (test rows are never read); each distinct report once."""
    table = table[table["split"].isin(["train", "val"])].reset_index(drop=True)
    texts, text_rows_np = np.unique(table["report"].astype(str).to_numpy(), return_inverse=True)
    groups = (table["report_group"].to_numpy(np.int64) if "report_group" in table else text_rows_np.astype(np.int64))
    split = table["split"].to_numpy()
    return _Rows(table=table, texts=texts, text_rows=torch.as_tensor(text_rows_np, dtype=torch.long),
                 labels=torch.tensor(table["label_abnormal"].to_numpy(np.int64)), groups=groups,
                 train_idx=np.flatnonzero(split == "train"), val_idx=np.flatnonzero(split == "val"),
                 skips=_SkipLog(table["image_id"].astype(str).to_numpy()))


def read_text_features(path: str | os.PathLike, table: pd.DataFrame, rows: _Rows,
                       backbone: Any) -> tuple[np.ndarray | None, np.ndarray, str]:
    """The locked-text cache of ``rows.texts`` read from a frozen embedding set's text file (keyed by study id).

    The file is used only when its cache key is the one :mod:`cxrlib.embed` computes for this backbone's text
    tower (``Backbone.text_key``, tokenizer, context length), :data:`TEXT_CACHE_PRECISION` and ``table``'s
    reports (all splits: the table the set was extracted from); each distinct report takes the feature of its
    first study found in the file (identical reports have identical features there). Returns ``(features,
    missing, note)``: ``features`` (rows of ``missing`` reports are zero) or None when the file is not usable,
    ``missing`` a mask over ``rows.texts`` (reports no study of which is in the file, e.g. an empty report the
    extractor skipped), ``note`` why the file was not used ("" when it was)."""
    n = len(rows.texts)
    try:
        emb = load_embeddings(path)
    except FileNotFoundError:
        return None, np.ones(n, bool), f"{path} absent"
    except (OSError, ValueError, KeyError) as exc:
        return None, np.ones(n, bool), f"{path} unreadable ({exc})"
    meta = emb.meta
    want = cache_key("text", backbone, TEXT_CACHE_PRECISION, *text_items(table))
    if meta.get("cache_key") != want:
        tower = getattr(backbone, "text_key", backbone.fingerprint)
        if meta.get("text_fingerprint") != tower:
            why = f"written for another text tower ({meta.get('text_fingerprint')}, this one {tower})"
        elif meta.get("precision") != TEXT_CACHE_PRECISION:
            why = f"{meta.get('precision')} features, the locked-text cache is {TEXT_CACHE_PRECISION}"
        else:
            why = "written for other reports or another tokenizer (its cache key is not this table's)"
        return None, np.ones(n, bool), f"{path}: {why}"
    index = {k: i for i, k in enumerate(emb.ids)}
    pos = np.array([index.get(sid, -1) for sid in rows.table["study_id"].astype(str)], dtype=np.int64)
    found = np.flatnonzero(pos >= 0)
    texts, first = np.unique(rows.text_rows.numpy()[found], return_index=True)
    src = np.full(n, -1, dtype=np.int64)
    src[texts] = pos[found[first]]
    feats = np.zeros((n, emb.dim), dtype=np.float32)
    feats[src >= 0] = emb.emb[src[src >= 0]]
    return feats, src < 0, ""


def _prepare_text(model: nn.Module, backbone: Any, rows: _Rows, cfg: AdaptConfig, device: str,
                  progress: bool, table: pd.DataFrame | None = None) -> _Text:
    """A locked tower's features of every distinct report (read from ``cfg.text_features`` where that file
    holds them, else computed once), or the reports' tokens. ``table``: the whole study table (default the
    rows'), whose reports the file must have been extracted from. One printed line says where they came from."""
    t0 = time.perf_counter()
    if not cfg.lock_text:
        tokens = torch.cat([backbone.tokenizer(list(rows.texts[i:i + 256])) for i in range(0, len(rows.texts), 256)])
        return _Text(None, tokens, backbone.tokenizer, time.perf_counter() - t0)
    n = len(rows.texts)
    feats, missing, note = (None, np.ones(n, bool), "no text_features file given") if cfg.text_features is None \
        else read_text_features(cfg.text_features, rows.table if table is None else table, rows, backbone)
    todo = np.flatnonzero(missing)
    if len(todo):
        enc = encode_texts(model, backbone.tokenizer, list(rows.texts[todo]), cfg.eval_batch_size, device, progress)
        if feats is None:
            feats = np.zeros((n, enc.shape[1]), dtype=np.float32)
        feats[todo] = enc.numpy()
    if note:
        note = f"text features: {note}: {len(todo)} distinct reports encoded with the locked text tower"
    else:
        examples = ", ".join(repr(t[:40]) for t in rows.texts[todo[:3]])
        note = (f"text features: {n - len(todo)} of {n} distinct reports read from {cfg.text_features}"
                + (f"; {len(todo)} not in it encoded here ({examples})" if len(todo) else ""))
    if cfg.text_features is not None and runtime.world()[0] == 0:
        print(note)
    source = "encoded" if len(todo) == n else str(cfg.text_features)
    return _Text(torch.from_numpy(feats), None, backbone.tokenizer, time.perf_counter() - t0, source, len(todo), note)


def _build_net(model: nn.Module, embed_dim: int, cfg: AdaptConfig, device: str,
               world: int) -> tuple[AdaptModel, nn.Module, list[str]]:
    """``(net, the module to call in training (DDP-wrapped under torchrun), trainable parameter names)``."""
    trainable = set_trainable(model, cfg.lock_text)
    net = AdaptModel(model, embed_dim, text_is_features=cfg.lock_text).to(device)
    clamp_logit_scale_(model.logit_scale)  # the loss reads exp(logit_scale) unclamped
    # parameters no active term uses stay frozen (DDP requires every trainable parameter to get a gradient)
    from cxrlib import losses

    if not losses.needs(cfg.weights, "needs_logit_scale"):
        model.logit_scale.requires_grad_(False)
    net.classifier.requires_grad_(losses.needs(cfg.weights, "needs_logits"))
    model.train()
    if cfg.lock_text:  # a locked text tower is never run; keep its dropout/norm statistics fixed anyway
        for name, m in model.named_children():
            if name not in ("visual",):
                m.eval()
    if world > 1:
        return net, nn.parallel.DistributedDataParallel(
            net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None), trainable
    return net, net, trainable


def _make_loaders(rows: _Rows, icfg: dict[str, Any], eval_tf: Any, cfg: AdaptConfig, world: int,
                  progress: bool) -> tuple[DataLoader, DataLoader, float]:
    """``(train loader, val loader, seconds spent caching images)``; batch ``index`` values are table rows."""
    paths_all = rows.table["image_path"].astype(str).tolist()
    t0 = time.perf_counter()
    if cfg.cache_images:
        train_ds: Dataset = CachedImageDataset(
            paths_all, rows.train_idx.tolist(), icfg["size"],
            tensor_train_transform(icfg["size"], icfg["mean"], icfg["std"], cfg.augment), progress=progress)
        val_ds: Dataset = CachedImageDataset(paths_all, rows.val_idx.tolist(), icfg["size"], None, eval_tf, progress)
        cache_seconds = time.perf_counter() - t0
    else:
        train_tf = train_transform(icfg["size"], icfg["mean"], icfg["std"], cfg.augment)
        train_ds = torch.utils.data.Subset(ImageReportDataset(paths_all, train_tf), rows.train_idx.tolist())
        val_ds = torch.utils.data.Subset(ImageReportDataset(paths_all, eval_tf), rows.val_idx.tolist())
        cache_seconds = 0.0
    if len(rows.train_idx) < cfg.batch_size * world:
        raise ValueError(f"{len(rows.train_idx)} training rows are fewer than one batch of {cfg.batch_size} x "
                         f"{world} ranks")
    return (_loader(train_ds, cfg.batch_size, True, cfg, cfg.seed, drop_last=True),
            _loader(val_ds, cfg.eval_batch_size, False, cfg, cfg.seed, drop_last=False), cache_seconds)


def _losses(cfg: AdaptConfig) -> tuple[nn.Module, nn.Module]:
    """The training loss (gathers across ranks) and the validation loss (every rank scores all val rows alone)."""
    from cxrlib.losses import MultiTaskLoss

    return MultiTaskLoss.from_config(cfg), MultiTaskLoss.from_config(cfg, rank=0, world_size=1)


def _optimiser(net: nn.Module, cfg: AdaptConfig, total_steps: int):
    """AdamW on :func:`cxrlib.runtime.param_groups`, warm-up over ``warmup_frac`` of the steps, then cosine."""
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.lr)
    warmup = int(round(total_steps * cfg.warmup_frac))
    return optimizer, runtime.warmup_cosine_scheduler(optimizer, warmup, total_steps)


@dataclass
class _Fit:
    history: list[dict[str, Any]]
    best_epoch: int
    best: float


def _fit(net: AdaptModel, train_net: nn.Module, model: nn.Module, rows: _Rows, text: _Text,
         loaders: tuple[DataLoader, DataLoader], losses: tuple[nn.Module, nn.Module], optimizer, scheduler,
         total_steps: int, cfg: AdaptConfig, device: str, world: int, show: bool) -> _Fit:
    """Epochs of training, each followed by validation; early stopping on ``cfg.monitor``. The best epoch's
    weights (epoch 0 = the start, so no improvement keeps the start weights) are loaded back into ``net``."""
    train_loader, val_loader = loaders
    loss_fn, val_loss_fn = losses

    def evaluate() -> dict[str, float]:
        t0 = time.perf_counter()
        out = _evaluate(net, val_loader, rows.labels, rows.text_rows, text.cache, text.tokens, rows.groups,
                        val_loss_fn, cfg, device, rows.skips, show, text.tokenizer)
        return {**out, "val_seconds": time.perf_counter() - t0}

    history: list[dict[str, Any]] = [{"epoch": 0, "step": 0, "lr": 0.0, "seconds": 0.0, "images_per_s": float("nan"),
                                      **evaluate(), "skipped": len(rows.skips.reasons)}]
    mode = MONITORS[cfg.monitor]
    best = history[0][cfg.monitor]
    best_epoch, bad_epochs, step = 0, 0, 0
    best_state = copy.deepcopy(net.state_dict())
    scaler = accel.grad_scaler(cfg.precision, device)
    bar = tqdm(total=total_steps, desc=f"adapt {cfg.backbone}", disable=not show)
    for epoch in range(1, cfg.epochs + 1):
        if isinstance(train_loader.sampler, torch.utils.data.distributed.DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        t0, n_images, sums, n_batches = time.perf_counter(), 0, {}, 0
        for batch in train_loader:
            rows.skips.add(batch["skipped"])
            if batch["image"] is None or len(batch["index"]) < 2:
                continue
            idx = batch["index"]
            with runtime.autocast(device, cfg.precision):
                out = train_net(batch["image"].to(device), text.batch(rows, idx, device))
            terms = loss_fn(out, rows.labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(terms["total"]).backward()  # plain backward / step unless fp16
            scaler.step(optimizer)
            scaler.update()
            clamp_logit_scale_(model.logit_scale)
            scheduler.step()
            step += 1
            n_images += len(idx)
            n_batches += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}")
            if step >= total_steps:
                break
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
               "images_per_s": n_images * world / seconds if seconds > 0 else float("nan")}
        row["train_loss"] = sums.pop("total", float("nan")) / max(n_batches, 1)
        row.update({f"train_{k}": v / max(n_batches, 1) for k, v in sums.items()})
        row.update(evaluate())
        row["skipped"] = len(rows.skips.reasons)
        history.append(row)
        value = row[cfg.monitor]
        if value < best if mode == "min" else value > best:
            best, best_epoch, bad_epochs = value, epoch, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad_epochs += 1
        if bad_epochs >= cfg.patience or step >= total_steps:
            break
    bar.close()
    net.load_state_dict(best_state)
    return _Fit(history, best_epoch, best)


def _run_record(cfg: AdaptConfig, backbone: Any, icfg: dict[str, Any], rows: _Rows, text: _Text, fit: _Fit,
                trainable: list[str], world: int, cache_seconds: float) -> dict[str, Any]:
    """What the checkpoint records: the backbone's open_clip config (load_backbone checks it) + this run."""
    run = {**cfg.to_dict(), "image_size": icfg["size"], "mean": list(icfg["mean"]), "std": list(icfg["std"]),
           "base_fingerprint": getattr(backbone, "fingerprint", None), "best_epoch": fit.best_epoch,
           "monitor_best": fit.best, "trainable_tensors": len(trainable), "world_size": world,
           "n_train": int(len(rows.train_idx)), "n_val": int(len(rows.val_idx)), "skipped": len(rows.skips.reasons),
           "n_reports_encoded": text.n_encoded, "text_features_from": text.source, "text_features_note": text.note,
           "text_cache_seconds": text.seconds,
           "image_cache_seconds": cache_seconds}
    return {**copy.deepcopy(getattr(backbone, "config", {}) or {}), "adapt": run}


def adapt(table: pd.DataFrame, backbone: Any, cfg: AdaptConfig, progress: bool = True) -> AdaptResult:
    """Train ``backbone.model`` contrastively on ``table``'s train rows; early-stop on its val rows.

    ``backbone`` is a :class:`cxrlib.backbones.Backbone`; its model is trained in place and the
    best epoch's weights are restored at the end. Every unreadable image is reported in
    ``AdaptResult.skipped`` (by ``image_id``) and counted in the history, never silently dropped.
    """
    cfg.validate()
    check_table(table)
    rank, world = runtime.world()
    device = resolve_device(cfg.device)
    _seed_everything(cfg.seed)
    model = backbone.model.to(device)
    icfg = _image_settings(model, backbone, cfg)
    rows = _prepare_rows(table)
    text = _prepare_text(model, backbone, rows, cfg, device, progress, table)
    net, train_net, trainable = _build_net(model, backbone.embed_dim, cfg, device, world)
    train_loader, val_loader, cache_seconds = _make_loaders(rows, icfg, backbone.preprocess, cfg, world, progress)
    total_steps = len(train_loader) * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer, scheduler = _optimiser(net, cfg, total_steps)
    fit = _fit(net, train_net, model, rows, text, (train_loader, val_loader), _losses(cfg), optimizer, scheduler,
               total_steps, cfg, device, world, progress and rank == 0)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return AdaptResult(model=model, classifier=net.classifier, history=pd.DataFrame(fit.history),
                       best_epoch=fit.best_epoch, skipped=rows.skips.table(),
                       config=_run_record(cfg, backbone, icfg, rows, text, fit, trainable, world, cache_seconds))


def save_adapted(path: str | os.PathLike, result: AdaptResult) -> Path:
    """Write the checkpoint atomically through :func:`cxrlib.backbones.write_checkpoint` (the format
    ``load_backbone(name, checkpoint=path)`` reads), with the history, skips and classifier head."""
    from cxrlib.backbones import write_checkpoint

    history = json.loads(result.history.to_json(orient="records"))
    return write_checkpoint(path, result.config["adapt"]["backbone"], result.model, result.config, extra={
        "history": history, "skipped": result.skipped.to_dict("records"),
        "classifier": {k: v.detach().cpu() for k, v in result.classifier.state_dict().items()}})


# ---- torchrun entry point ------------------------------------------------------------------------

def n_devices() -> int:
    """How many GPUs this process sees (torchrun is used when more than one)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_command(table: str | os.PathLike, cfg: AdaptConfig, out: str | os.PathLike, nproc: int) -> list[str]:
    """The ``torchrun`` command that runs :func:`main` on ``nproc`` devices."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cxrlib.adapt", "--table", str(table), "--out", str(out), "--config", json.dumps(cfg.to_dict())]


@dataclass
class AdaptRun:
    """What a notebook needs after a run, in-process or under torchrun: history, skips, config, file."""

    history: pd.DataFrame
    skipped: pd.DataFrame
    config: dict[str, Any]
    checkpoint: Path

    @property
    def best_epoch(self) -> int:
        return int(self.config["adapt"]["best_epoch"])


def read_run(path: str | os.PathLike) -> AdaptRun:
    """History, skipped images and config of a saved adaptation checkpoint."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return AdaptRun(history=pd.DataFrame(obj["history"]),
                    skipped=pd.DataFrame(obj.get("skipped", []), columns=["image_id", "reason"]),
                    config=obj["config"], checkpoint=Path(path))


def launch(table_path: str | os.PathLike, cfg: AdaptConfig, out: str | os.PathLike, progress: bool = True) -> AdaptRun:
    """Adapt and save to ``out``: in this process on one device, under ``torchrun`` on several GPUs."""
    cfg.validate()
    nproc = n_devices() if resolve_device(cfg.device).startswith("cuda") else 1
    if nproc > 1:
        import subprocess

        subprocess.run(torchrun_command(table_path, cfg, out, nproc), check=True)
        return read_run(out)
    from cxrlib.backbones import load_backbone

    backbone = load_backbone(cfg.backbone, device=resolve_device(cfg.device))
    result = adapt(pd.read_parquet(table_path), backbone, cfg, progress=progress)
    save_adapted(out, result)
    return AdaptRun(history=result.history, skipped=result.skipped, config=result.config, checkpoint=Path(out))


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrlib.adapt --table T --out CKPT --config JSON`` (also under torchrun)."""
    ap = argparse.ArgumentParser(prog="python -m cxrlib.adapt")
    ap.add_argument("--table", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True, help="AdaptConfig fields as a JSON object")
    args = ap.parse_args(argv)
    cfg = AdaptConfig(**json.loads(args.config))
    from cxrlib.backbones import load_backbone

    with runtime.process_group(cfg.device) as device:
        rank, _ = runtime.world()
        backbone = load_backbone(cfg.backbone, device=resolve_device(device))
        result = adapt(pd.read_parquet(args.table), backbone, cfg, progress=rank == 0)
        if rank == 0:
            save_adapted(args.out, result)
            if len(result.skipped):
                print(f"skipped {len(result.skipped)} unreadable images: {result.skipped.head().to_dict('records')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
