"""Train the multi-task projector on cached (frozen-backbone) embeddings.

``train_projector(train, val, cfg)`` is seeded and deterministic on CPU: AdamW with linear warm-up and
cosine decay, early stopping on validation label-match Precision@K (image->text and text->image
averaged), the best epoch's weights returned. Per-epoch loss terms and validation metrics form
``TrainResult.history``; :func:`save_run` writes a run folder (projector.pt, history.csv, config.json,
metrics.json). Under ``torchrun`` every rank takes its shard of each global batch, gradients are averaged
(DDP) and both contrastive terms see the features of all ranks (see :mod:`cxrlib.losses`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cxrlib import accel, losses, settings
from cxrlib.io import atomic_path, write_json
from cxrlib.losses import MultiTaskLoss, _world
from cxrlib.pairs import PairedSplit, load_paired
from cxrlib.projector import ProjectorModel, build_projector, save_projector
from cxrlib.retrieval import label_precision_at_k
from cxrlib.runtime import param_groups, warmup_cosine  # noqa: F401  (warmup_cosine: re-exported)

#: the projector recipe's defaults: one source, :mod:`cxrlib.settings`
_RECIPE = settings.defaults("recipe")
#: the recipe's loss-weight settings ``w_<term>``: their prefix, and the default weights by term
_PREFIX = settings.WEIGHT_PREFIX[settings.TRAIN]
_WEIGHTS = settings.weights_from(_RECIPE, _PREFIX)


@dataclass
class TrainConfig:
    """Every setting of a projector run. The paper publishes none of these; the defaults are ours, each defined
    once in :mod:`cxrlib.settings` (group ``recipe``) and rendered here.

    Chosen defaults and why (README "Choices the paper leaves open" links here):

    - Projector ``kind={kind!r}``: per modality ``x + Linear(width->out)(act(Linear(in->width)(x)))``
      (``depth={depth}`` hidden layer(s), ``width={width}``, ``dropout={dropout}``, ``activation={activation!r}``),
      output layer zero-initialised so training starts from the frozen backbone's own space and can only move
      away from it where the loss says so; ``out_dim={out_dim}`` (None keeps the backbone's dimension).
      Classifier: ``classifier_hidden={classifier_hidden}`` hidden units (0: one linear layer) on the normalised
      projected embedding, shared by both modalities, fed by ``bce_on={bce_on!r}``.
    - Loss ``weights``: one per term of :mod:`cxrlib.losses` (term -> weight; the flat settings ``w_<term>``):
      {weights}; the paper names the terms, not their weights.
    - CLIP temperature: initial ``clip_temperature={clip_temperature}`` (CLIP's), learnable
      (``learn_temperature={learn_temperature}``), logit scale clamped as in open_clip. SupCon
      ``supcon_temperature={supcon_temperature}`` (the SupCon paper's range). BCE ``pos_weight={pos_weight}``
      (None: unweighted; "balanced" = n_normal / n_abnormal).
    - Optimiser AdamW, ``lr={lr:g}``, ``weight_decay={weight_decay:g}`` on weight matrices only (not biases or
      the logit scale); ``warmup_epochs={warmup_epochs:g}`` of linear warm-up then cosine decay to 0 over
      ``epochs={epochs}``; ``batch_size={batch_size}`` (the epoch's permutation split into near-equal batches,
      none dropped).
    - Early stopping: validation label-match Precision@``eval_k={eval_k}``, averaged over both directions,
      ``patience={patience}`` epochs without an improvement > ``min_delta={min_delta:g}``.

    :meth:`to_dict` / :meth:`from_dict` speak the flat recipe (``w_<term>`` keys, as make, papermill,
    ``config.json`` and :func:`cxrlib.dag.run_id` do); the object holds the weights as one mapping.
    """

    kind: str = _RECIPE["kind"]
    out_dim: int | None = _RECIPE["out_dim"]
    width: int = _RECIPE["width"]
    depth: int = _RECIPE["depth"]
    dropout: float = _RECIPE["dropout"]
    activation: str = _RECIPE["activation"]
    classifier_hidden: int = _RECIPE["classifier_hidden"]
    #: loss term -> weight (a term left out keeps its default, the ``w_<term>`` setting)
    weights: dict[str, float] = field(default_factory=lambda: dict(_WEIGHTS))
    clip_temperature: float = _RECIPE["clip_temperature"]
    learn_temperature: bool = _RECIPE["learn_temperature"]
    supcon_temperature: float = _RECIPE["supcon_temperature"]
    pos_weight: float | str | None = _RECIPE["pos_weight"]
    bce_on: str = _RECIPE["bce_on"]
    lr: float = _RECIPE["lr"]
    weight_decay: float = _RECIPE["weight_decay"]
    epochs: int = _RECIPE["epochs"]
    batch_size: int = _RECIPE["batch_size"]
    warmup_epochs: float = _RECIPE["warmup_epochs"]
    patience: int = _RECIPE["patience"]
    min_delta: float = _RECIPE["min_delta"]
    eval_k: int = _RECIPE["eval_k"]
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(losses.TERMS))
        if unknown:
            raise ValueError(f"unknown loss terms {unknown} in TrainConfig.weights; the terms are {', '.join(losses.TERMS)}")
        self.weights = {**losses.TERMS, **_WEIGHTS, **self.weights}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (before any training starts): the schema's one validator."""
        settings.validate_recipe(self.to_dict())
        losses.resolve_weights(self.weights)

    def to_dict(self) -> dict[str, Any]:
        """The flat recipe: every field, the weights as ``w_<term>`` in their place."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out.update(settings.flat_weights(v, _PREFIX) if f.name == "weights" else {f.name: copy.deepcopy(v)})
        return out

    @classmethod
    def keys(cls) -> set[str]:
        """The keys :meth:`from_dict` takes: the fields, ``w_<term>`` for every loss term."""
        return ({f.name for f in dataclasses.fields(cls)} - {"weights"}) | {f"{_PREFIX}{t}" for t in losses.TERMS}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a flat recipe (e.g. notebook parameters, a run's ``config.json``); unknown keys are an
        error naming them."""
        unknown = sorted(set(d) - cls.keys())
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; known: {sorted(cls.keys())}")
        weights = {k.removeprefix(_PREFIX): v for k, v in d.items() if k.startswith(_PREFIX)}
        return cls(**{k: v for k, v in d.items() if not k.startswith(_PREFIX)}, weights=weights)


if TrainConfig.__doc__:  # None under python -OO
    TrainConfig.__doc__ = TrainConfig.__doc__.format(
        **_RECIPE, weights=", ".join(f"``{_PREFIX}{t}={w:g}``" for t, w in _WEIGHTS.items()))


@dataclass
class TrainResult:
    """The best-epoch model (eval mode), per-epoch history, the best epoch and its validation metric."""

    model: ProjectorModel
    history: pd.DataFrame
    best_epoch: int
    best_metric: float
    config: dict[str, Any]




def resolve_pos_weight(pos_weight: float | str | None, labels: np.ndarray) -> float | None:
    """BCE weight of the abnormal class: ``"balanced"`` = n_normal / n_abnormal of ``labels``."""
    if pos_weight != "balanced":
        return pos_weight
    n_pos = int(np.sum(np.asarray(labels) == 1))
    return (len(labels) - n_pos) / max(1, n_pos)


def check_split(split: PairedSplit, name: str, need_labels: bool) -> None:
    """Clear errors before training: empty split, non-finite embeddings, labels missing or not 0/1."""
    if len(split) == 0:
        raise ValueError(f"{name} split is empty")
    for mod, arr in (("image", split.img), ("text", split.txt)):
        finite = np.isfinite(arr).all(axis=1)
        if not finite.all():
            bad = split.study_ids[~finite][:5].tolist()
            raise ValueError(f"{name} split: {int((~finite).sum())} rows have non-finite {mod} embeddings, "
                             f"e.g. study_ids {bad}")
    if need_labels:
        labels = np.asarray(split.labels)
        bad = ~np.isin(labels, (0, 1))
        if bad.any():
            raise ValueError(f"{name} split: {int(bad.sum())} rows have no 0/1 normal/abnormal label (needed by "
                             f"the loss terms that read labels and by validation), e.g. study_ids "
                             f"{split.study_ids[bad][:5].tolist()}")


def load_splits(dataset: str, backbone: str, splits: tuple[str, ...] = ("train", "val")) -> dict[str, PairedSplit]:
    """The study table's ``splits`` with the cached embeddings of ``backbone`` (see :func:`cxrlib.pairs.load_paired`)."""
    return load_paired(dataset, backbone, splits)


def label_precision(split: PairedSplit, model: ProjectorModel | None = None, k: int = 5,
                    device: str = "cpu") -> dict[str, float]:
    """Label-match Precision@k of ``split`` (image->text, text->image, mean); ``model=None`` scores the
    frozen backbone's embeddings themselves."""
    img, txt = _embed(split, model, device)
    i2t = label_precision_at_k(img, txt, split.labels, split.labels, k)
    t2i = label_precision_at_k(txt, img, split.labels, split.labels, k)
    return {"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2}


@torch.no_grad()
def _embed(split: PairedSplit, model: ProjectorModel | None, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    if model is not None:  # the one projector application, in one pass (cxrlib.models.project)
        from cxrlib.models import project

        return project(model, split.img, split.txt, batch_size=max(len(split), 1), device=str(device))
    img = torch.as_tensor(split.img, dtype=torch.float32, device=device)
    txt = torch.as_tensor(split.txt, dtype=torch.float32, device=device)
    zi, zt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
    return zi.cpu().numpy(), zt.cpu().numpy()


def project_split(split: PairedSplit, model: ProjectorModel, device: str = "cpu") -> PairedSplit:
    """A copy of ``split`` whose ``img``/``txt`` are the projector's normalised embeddings."""
    zi, zt = _embed(split, model, device)
    return dataclasses.replace(split, img=zi, txt=zt)


@torch.no_grad()
def _val_losses(model: ProjectorModel, loss_fn: MultiTaskLoss, img: torch.Tensor, txt: torch.Tensor,
                y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean loss terms over consecutive validation batches (single-process, no gather)."""
    sums: dict[str, float] = {}
    n_batches = max(1, math.ceil(len(y) / batch_size))
    for idx in torch.arange(len(y)).tensor_split(n_batches):
        terms = loss_fn(model(img[idx], txt[idx], classify=loss_fn.needs_logits), y[idx])
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(idx)
    return {k: v / len(y) for k, v in sums.items()}


def train_projector(train: PairedSplit, val: PairedSplit, cfg: TrainConfig | None = None,
                    progress: bool = True, compile: bool = False) -> TrainResult:
    """Train a projector on ``train``, early-stop on ``val`` label-match Precision@``cfg.eval_k``.

    ``compile``: torch.compile each step's forward and loss (one graph, compiled at the first step): fewer,
    fused kernels for a GPU, where an eager step of this small model is bound by kernel launches. How the
    recipe runs, not part of it; off by default, since compiled kernels round differently (the offline
    demo's numbers are pinned).

    History: one row per epoch (epoch 0 = the untrained model, for reference; it is never chosen as
    best) with ``lr``, ``logit_scale``, ``train_<term>``, ``val_<term>``, ``val_p{k}_i2t``,
    ``val_p{k}_t2i``, ``val_p{k}`` and ``seconds``. A non-finite loss stops training with an error
    naming the epoch, step and the batch's first study ids.
    """
    cfg = cfg or TrainConfig()
    cfg.validate()
    labelled = [t for t in losses.active(cfg.weights) if losses.REGISTRY[t].needs_labels]
    check_split(train, "train", need_labels=bool(labelled))
    check_split(val, "val", need_labels=True)
    if train.img.shape[1:] != val.img.shape[1:] or train.txt.shape[1:] != val.txt.shape[1:]:
        raise ValueError(f"train and val embedding dims differ: {train.img.shape[1:]}/{train.txt.shape[1:]} vs "
                         f"{val.img.shape[1:]}/{val.txt.shape[1:]}")
    if cfg.eval_k > len(val):
        raise ValueError(f"eval_k={cfg.eval_k} exceeds the validation split size ({len(val)})")
    n_pos = int(np.sum(train.labels == 1))
    if labelled and n_pos in (0, len(train)):
        names = " and ".join(losses.REGISTRY[t].label for t in labelled)
        warnings.warn(f"train split holds a single class ({n_pos} abnormal of {len(train)}): the {names} "
                      f"term{'s' if len(labelled) > 1 else ''} cannot separate classes", stacklevel=2)
    pos_weight = resolve_pos_weight(cfg.pos_weight, train.labels)

    rank, world = _world()
    device = torch.device(accel.require_device(cfg.device))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_projector(cfg.kind, train.img.shape[1], train.txt.shape[1], out_dim=cfg.out_dim,
                            width=cfg.width, depth=cfg.depth, dropout=cfg.dropout, activation=cfg.activation,
                            classifier_hidden=cfg.classifier_hidden,
                            init_temperature=cfg.clip_temperature).to(device)
    model.logit_scale.requires_grad_(cfg.learn_temperature)
    loss_fn = MultiTaskLoss.from_config(cfg, pos_weight=pos_weight)
    eval_loss = MultiTaskLoss.from_config(cfg, pos_weight=pos_weight, rank=0, world_size=1)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)
    groups = param_groups(model, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError(f"projector kind {cfg.kind!r} with a fixed temperature has no trainable parameters")
    # CUDA: the fused AdamW (one kernel per step); elsewhere the foreach one the CPU numbers were made with
    opt = torch.optim.AdamW(groups, lr=cfg.lr, **({"fused": True} if device.type == "cuda" else {"foreach": True}))

    n = len(train) - len(train) % world  # equal shards for all_gather: N mod world random items wait an epoch
    steps = max(1, math.ceil(n / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(round(cfg.warmup_epochs * steps), cfg.epochs * steps))
    # the whole training set stays on the device (no DataLoader, no copies per step) when it fits;
    # else in pinned host memory, each batch copied non-blocking
    nbytes = 4 * (train.img.size + train.txt.size + val.img.size + val.txt.size)
    data_device = device if accel.fits_on_device(nbytes, device) else torch.device("cpu")
    pin = data_device != device and device.type == "cuda"
    img_t, txt_t, y_t = (torch.as_tensor(a, dtype=d, device=data_device) for a, d in
                         ((train.img, torch.float32), (train.txt, torch.float32), (train.labels, torch.long)))
    if pin:
        img_t, txt_t, y_t = img_t.pin_memory(), txt_t.pin_memory(), y_t.pin_memory()
    vimg = torch.as_tensor(val.img, dtype=torch.float32, device=device)
    vtxt = torch.as_tensor(val.txt, dtype=torch.float32, device=device)
    vy = torch.as_tensor(val.labels, dtype=torch.long, device=device)
    k = cfg.eval_k

    def evaluate(epoch: int, train_terms: dict[str, float], seconds: float) -> dict[str, Any]:
        model.eval()
        p = label_precision(val, model, k, str(device))
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "logit_scale": float(model.scale().detach()),
               **{f"train_{t}": v for t, v in train_terms.items()},
               **{f"val_{t}": v for t, v in _val_losses(model, eval_loss, vimg, vtxt, vy, cfg.batch_size).items()},
               f"val_p{k}_i2t": p["i2t"], f"val_p{k}_t2i": p["t2i"], f"val_p{k}": p["mean"], "seconds": seconds}
        model.train()
        return row

    def step_terms_of(bi: torch.Tensor, bt: torch.Tensor, by: torch.Tensor) -> dict[str, torch.Tensor]:
        return loss_fn(net(bi, bt, classify=loss_fn.needs_logits), by)

    step_loss = accel.maybe_compile(step_terms_of, compile)
    history = [evaluate(0, {}, 0.0)]
    best_metric, best_epoch, best_state, stale = -math.inf, 0, None, 0
    bar = tqdm(range(1, cfg.epochs + 1), desc="train projector", disable=not progress or rank > 0)
    global_step = 0
    for epoch in bar:
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train), generator=gen)[:n].to(data_device)
        chunks = perm.reshape(-1, world).tensor_split(steps)
        # each step's terms stay on the device and are read once per epoch: no host sync per step
        # (on a GPU the next step's kernels are queued while this one runs)
        step_terms: list[dict[str, torch.Tensor]] = []
        for chunk in chunks:
            idx = chunk[:, rank]
            bi, bt, by = (t[idx].to(device, non_blocking=True) for t in (img_t, txt_t, y_t))
            terms = step_loss(bi, bt, by)
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            model.clamp_logit_scale_()
            sched.step()
            step_terms.append({t: v.detach() for t, v in terms.items()})
        stacked = {t: torch.stack([s[t] for s in step_terms]).double().cpu() for t in step_terms[0]}
        bad = (~torch.isfinite(stacked["total"])).nonzero()
        if len(bad):
            step = int(bad[0])
            idx = chunks[step][:, rank]
            vals = {t: float(v[step]) for t, v in stacked.items()}
            raise FloatingPointError(
                f"non-finite loss at epoch {epoch}, step {step} (global step {global_step + step}): {vals}; batch of "
                f"{len(idx)} rows, study_ids {train.study_ids[idx.cpu().numpy()][:5].tolist()}; "
                f"lower lr ({cfg.lr}) or check the embeddings")
        global_step += len(chunks)
        sizes = torch.tensor([len(c) for c in chunks], dtype=torch.float64)
        means = {t: float((v * sizes).sum()) / (n // world) for t, v in stacked.items()}
        if world > 1:  # log the mean over ranks, not rank 0's shard
            packed = torch.tensor(list(means.values()), dtype=torch.float64)
            torch.distributed.all_reduce(packed)
            means = dict(zip(means, (packed / world).tolist()))
        row = evaluate(epoch, means, time.perf_counter() - t0)
        history.append(row)
        metric = row[f"val_p{k}"]
        bar.set_postfix(loss=f"{row.get('train_total', float('nan')):.3f}", **{f"val_p{k}": f"{metric:.3f}"})
        if metric > best_metric + cfg.min_delta:
            best_metric, best_epoch, stale = metric, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    model.load_state_dict(best_state)
    model.eval()
    return TrainResult(model=model, history=pd.DataFrame(history), best_epoch=best_epoch,
                       best_metric=float(best_metric), config=cfg.to_dict())


def save_run(run_dir: str | os.PathLike, result: TrainResult, extra_config: dict[str, Any] | None = None,
             metrics: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write ``projector.pt``, ``history.csv``, ``config.json``, ``metrics.json`` into ``run_dir`` (atomic)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {**result.config, **(extra_config or {})}
    out = {"projector": save_projector(run_dir / "projector.pt", result.model, config)}
    with atomic_path(run_dir / "history.csv") as tmp:
        result.history.to_csv(tmp, index=False)
    out["history"] = run_dir / "history.csv"
    out["config"] = write_json(run_dir / "config.json", config)
    out["metrics"] = write_json(run_dir / "metrics.json", {"best_epoch": result.best_epoch,
                                                           "best_metric": result.best_metric, **(metrics or {})})
    return out


def synthetic_splits(n_train: int, n_val: int, dim: int = 512, seed: int = 0, p_abnormal: float = 0.65,
                     signal: float = 0.2, nuisance: float = 3.0, nuisance_rank: int = 16) -> dict[str, PairedSplit]:
    """Structured stand-in embeddings for tests, benchmarks and examples (never for results).

    Each study has a shared latent; both modalities add a weak label direction, then a strong
    modality-specific nuisance in a ``nuisance_rank``-dim subspace, then L2 normalisation. The label is
    recoverable but buried, so a trained projector can beat the "frozen" space, as on real data.
    """
    if not 0 < nuisance_rank <= dim:
        raise ValueError(f"nuisance_rank must be in 1..dim ({dim}), got {nuisance_rank}")
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    y = (rng.random(n) < p_abnormal).astype(np.int64)
    label_dir = rng.standard_normal((2, dim))
    label_dir /= np.linalg.norm(label_dir, axis=1, keepdims=True)
    latent = rng.standard_normal((n, dim)) / np.sqrt(dim)

    def modality() -> np.ndarray:
        basis = np.linalg.qr(rng.standard_normal((dim, nuisance_rank)))[0]
        nuis = rng.standard_normal((n, nuisance_rank)) @ basis.T * nuisance / np.sqrt(nuisance_rank)
        x = latent + signal * label_dir[y] + nuis + 0.3 * rng.standard_normal((n, dim)) / np.sqrt(dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    img, txt = modality(), modality()
    split = np.array(["train"] * n_train + ["val"] * n_val)
    table = pd.DataFrame({"study_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i // 2}" for i in range(n)],
                          "image_id": [f"i{i}" for i in range(n)], "label_abnormal": y, "split": split,
                          "report_group": np.arange(n)})
    out = {}
    for name in ("train", "val"):
        m = split == name
        rows = table[m].reset_index(drop=True)
        out[name] = PairedSplit(img=img[m], txt=txt[m], labels=y[m], study_ids=rows["study_id"].to_numpy(),
                                patient_ids=rows["patient_id"].to_numpy(), image_ids=rows["image_id"].to_numpy(),
                                report_groups=rows["report_group"].to_numpy(), findings=None, table=rows)
    return out
