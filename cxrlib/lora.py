"""LoRA adaptation (``peft``) of a text tower, the projection onto the image space, and their checkpoint.

Ko et al.'s dual tower (``lukeingawesome/llm2clip4cxr``): the LLM text tower frozen with LoRA (r 16,
alpha 32, dropout 0.1 on q/k/v/o), a projection LayerNorm -> Linear to the image dimension; only the
adapters and the projection train. Here the image side is the frozen image tower's cached embeddings,
and the loss is the package's :class:`cxrlib.losses.MultiTaskLoss` (``weights``: term -> weight, defaults
the ``lora_w_<term>`` settings; e.g. the contrastive image-report term alone with the others at 0).

Checkpoint (:func:`save_lora`): only what trains (the adapters, the pooling's own weights where it has
any, the projection, the logit scale and the classifier) plus the full config (text tower spec, LoRA
settings, the base weights' fingerprint). :func:`load_lora` rebuilds the base from the spec, refuses
adapters saved from another base (fingerprints differ: an error naming both), and gives the same
embeddings as before saving.

Training (:func:`fit_lora`, the one loop): in one process, or under ``torchrun`` with DDP, each rank
taking its contiguous share of every batch (:func:`shard_rows`) and the contrastive terms gathering
all ranks' features, so a step equals one process's on the whole batch (``python -m cxrlib.lora_dist``;
:func:`cxrlib.lora_dist.launch` starts it). LoRA in the image tower too, trained from images:
:mod:`cxrlib.lora_image`.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from cxrlib import settings
from cxrlib import text_towers as tt
from cxrlib.io import atomic_path
from cxrlib.projector import clamp_logit_scale_

FORMAT = "cxrlib.lora/1"
#: the attention projections LoRA targets by default, per model type (Ko et al.: q/k/v/o)
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "bert": ("query", "key", "value", "attention.output.dense"),
}


@dataclass(frozen=True)
class LoraSettings:
    """LoRA rank, scale, dropout and the module names it wraps (None: :data:`DEFAULT_TARGETS`)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d


def _layer_names(module: nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding, Conv1D))]


def resolve_targets(module: nn.Module, settings: LoraSettings, model_type: str | None = None) -> tuple[str, ...]:
    """The target module names, each checked to exist (peft's suffix rule); an error names the absent ones."""
    targets = settings.target_modules or DEFAULT_TARGETS.get(model_type or "")
    if not targets:
        raise ValueError(f"no default LoRA targets for model type {model_type!r}: set target_modules "
                         f"(its layers: {sorted({n.rsplit('.', 1)[-1] for n in _layer_names(module)})})")
    names = _layer_names(module)
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target modules {missing} do not exist in {type(module).__name__}; its layers are "
                         f"named {sorted({n.rsplit('.', 1)[-1] for n in names})}")
    return tuple(targets)


def add_lora(tower: tt.TextTower, settings: LoraSettings) -> tt.TextTower:
    """Wrap ``tower.encoder`` with LoRA adapters (peft) in place; base weights frozen, adapters and the
    pooling's weights trainable. Records the base fingerprint for :func:`load_lora`'s check."""
    from peft import LoraConfig, get_peft_model

    from cxrlib.backbones import fingerprint

    if getattr(tower, "lora_settings", None) is not None:
        raise ValueError("this text tower already has LoRA adapters")
    base_fp = fingerprint(tower.encoder)
    model_type = getattr(tower.encoder.config, "model_type", None)
    targets = resolve_targets(tower.encoder, settings, model_type)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tt.RANDOM_INIT_SEED)
        tower.encoder = get_peft_model(tower.encoder, config)
    for p in tower.pooling.parameters():
        p.requires_grad_(True)
    tower.lora_settings = LoraSettings(settings.r, settings.alpha, settings.dropout, targets)
    tower.base_fingerprint = base_fp
    return tower


class ProjectedTower(nn.Module):
    """A text tower + projection (LayerNorm -> Linear to ``out_dim``), a logit scale and a classifier:
    ``encode_text`` gives reports in the image tower's space; ``forward`` what ``MultiTaskLoss`` reads."""

    def __init__(self, tower: tt.TextTower, out_dim: int | None = None, init_temperature: float = 0.07):
        super().__init__()
        self.tower = tower
        self.out_dim = int(out_dim or tower.hidden_size)
        self.head = nn.Sequential(nn.LayerNorm(tower.hidden_size), nn.Linear(tower.hidden_size, self.out_dim)) \
            if out_dim else nn.Identity()
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / init_temperature))))
        clamp_logit_scale_(self.logit_scale)
        self.classifier = nn.Linear(self.out_dim, 1)

    @property
    def spec(self) -> tt.TextTowerSpec:
        return self.tower.spec

    def encode_text(self, batch, normalize: bool = False) -> torch.Tensor:
        out = self.head(self.tower.encode_text(batch))
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, image: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        img = F.normalize(image, dim=-1)
        txt = self.encode_text(batch, normalize=True)
        return {"image": img, "text": txt, "logit_scale": self.logit_scale.exp(),  # parameter clamped in place after each step
                "image_logits": self.classifier(img).squeeze(-1), "text_logits": self.classifier(txt).squeeze(-1)}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only what LoRA training changes: adapters (peft's state dict) + every other trainable tensor."""
    from peft import get_peft_model_state_dict

    tower = model.tower if isinstance(model, ProjectedTower) else model
    state = {f"adapters.{k}": v.detach().cpu() for k, v in get_peft_model_state_dict(tower.encoder).items()}
    for name, p in model.named_parameters():
        if p.requires_grad and "lora_" not in name:
            state[f"params.{name}"] = p.detach().cpu()
    return state


def save_lora(path: str | os.PathLike, model: ProjectedTower | tt.TextTower, config: dict[str, Any] | None = None,
              extra_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapters, the other trained tensors and the full config, atomically (``extra_state``:
    more tensors under their own prefix, e.g. :mod:`cxrlib.lora_image`'s image adapters ``image.*``)."""
    tower = model.tower if isinstance(model, ProjectedTower) else model
    if getattr(tower, "lora_settings", None) is None:
        raise ValueError("this text tower has no LoRA adapters to save (add_lora first)")
    payload = {
        "format": FORMAT, "state": {**trainable_state(model), **(extra_state or {})},
        "config": {"text_tower": tower.spec.to_dict(), "lora": tower.lora_settings.to_dict(),
                   "base_fingerprint": tower.base_fingerprint,
                   "projected": isinstance(model, ProjectedTower),
                   "out_dim": model.out_dim if isinstance(model, ProjectedTower) else None,
                   **(config or {})},
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(path)


def read_lora(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA checkpoint {path} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"{path} is not a LoRA checkpoint of this package (format {FORMAT})")
    return obj


def load_lora(path: str | os.PathLike, device: str = "cpu", base: tt.TextTowerSpec | str | None = None,
              allow_image: bool = False):
    """Rebuild base + adapters (+ projection) from a checkpoint -> (model, tokenizer, config).

    ``base`` replaces the saved text tower spec (e.g. a local folder for the same weights); its weights
    must be the ones the adapters were trained on. A checkpoint with image-tower adapters too is
    :func:`cxrlib.lora_image.load_image_lora`'s (its text side belongs to the adapted image tower).
    """
    from peft import set_peft_model_state_dict

    obj = read_lora(path)
    cfg = obj["config"]
    if cfg.get("image_lora") and not allow_image:
        raise ValueError(f"LoRA checkpoint {path} holds image-tower adapters too: load it with "
                         f"cxrlib.lora_image.load_image_lora")
    spec = tt.TextTowerSpec.from_dict(cfg["text_tower"]) if base is None else (
        tt.text_tower_spec(base) if isinstance(base, str) else base)
    tower, tokenizer = tt.build_text_tower(spec, "cpu")
    from cxrlib.backbones import fingerprint

    got = fingerprint(tower.encoder)
    if got != cfg["base_fingerprint"]:
        raise ValueError(f"LoRA checkpoint {path}: its adapters were trained on base {cfg['text_tower']['name']!r} "
                         f"(fingerprint {cfg['base_fingerprint']}), not on {spec.name!r} (fingerprint {got})")
    lora = cfg["lora"]
    add_lora(tower, LoraSettings(lora["r"], lora["alpha"], lora["dropout"], tuple(lora["target_modules"])))
    model: nn.Module = ProjectedTower(tower, cfg["out_dim"]) if cfg.get("projected") else tower
    state = obj["state"]
    adapters = {k[len("adapters."):]: v for k, v in state.items() if k.startswith("adapters.")}
    result = set_peft_model_state_dict(tower.encoder, adapters)
    bad = [k for k in result.unexpected_keys if "lora_" in k]
    if bad:
        raise ValueError(f"LoRA checkpoint {path}: adapter tensors {bad[:5]} do not fit the base model")
    params = dict(model.named_parameters())
    for k, v in state.items():
        if k.startswith("params."):
            name = k[len("params."):]
            if name not in params or params[name].shape != v.shape:
                raise ValueError(f"LoRA checkpoint {path}: tensor {name!r} {tuple(v.shape)} does not fit the model")
            with torch.no_grad():
                params[name].copy_(v)
    return model.to(device).eval(), tokenizer, cfg


def lora_backbone(model: ProjectedTower | tt.TextTower, tokenizer: tt.TowerTokenizer, name: str):
    """The adapted tower as a text-only backbone for :func:`cxrlib.embed.extract_embeddings`."""
    from cxrlib.backbones import Backbone

    tower = model.tower if isinstance(model, ProjectedTower) else model
    dim = model.out_dim if isinstance(model, ProjectedTower) else tower.hidden_size
    return Backbone(name=name, model=model, preprocess=None, tokenizer=tokenizer, embed_dim=dim,
                    context_length=tokenizer.max_length,
                    fingerprint=tt._tower_fingerprint(model, tower.spec, tokenizer,
                                                      {"lora": tower.lora_settings.to_dict()}),
                    config={"text_tower": tower.spec.to_dict(), "lora": tower.lora_settings.to_dict()})


# ---- training on image embeddings --------------------------------------------------------------

@dataclass
class LoraTrainConfig:
    """LoRA image-report training: the settings of :func:`train_lora` (Ko et al.: lr 2e-4, 2 epochs)."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 32
    #: loss term -> weight (cxrlib.losses.MultiTaskLoss); defaults: the ``lora_w_<term>`` settings
    weights: dict[str, float] = field(default_factory=lambda: _weights_default())
    supcon_temperature: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        self.weights = {**_weights_default(), **self.weights}
        settings.check_weights(self.weights, settings.WEIGHT_PREFIX[settings.TEXT])

    def to_dict(self) -> dict[str, Any]:
        """Every setting, the weights flat as ``w_<term>`` (the recipe a checkpoint records)."""
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        return {**{k: v for k, v in d.items() if k != "weights"}, **settings.flat_weights(self.weights)}


def _weights_default() -> dict[str, float]:
    prefix = settings.WEIGHT_PREFIX[settings.TEXT]
    return {k.removeprefix(prefix): v for k, v in settings.defaults("lora").items() if k.startswith(prefix)}


def shard_rows(rows: list[int], rank: int, world: int) -> list[int] | None:
    """This rank's contiguous share of a global batch: of its first ``len - len % world`` rows (the rest
    sit this step out), rows ``[rank * k, (rank + 1) * k)``; None when the batch is too small for a
    contrastive step (fewer than 2 rows, or than one per rank). Alone (``world == 1``) the whole batch."""
    keep = len(rows) - len(rows) % world
    if keep < max(2, world):
        return None
    k = keep // world
    return list(rows[rank * k:(rank + 1) * k])


def stats_over_ranks(tokenizer: tt.TowerTokenizer) -> dict[str, int]:
    """The tokenizer's truncation counts summed over ranks (each rank tokenizes only its shards)."""
    from cxrlib.runtime import world

    stats = dict(tokenizer.stats)
    if world()[1] > 1:
        packed = torch.tensor([stats[k] for k in stats], dtype=torch.float64)
        torch.distributed.all_reduce(packed)
        stats = {k: int(v) for k, v in zip(stats, packed.tolist())}
    return stats


def fit_lora(model: nn.Module, tokenizer: tt.TowerTokenizer, texts: list[str], labels: np.ndarray,
             image_rows, cfg: LoraTrainConfig, progress: bool = True) -> dict[str, Any]:
    """The LoRA training loop shared by cached image embeddings (:func:`train_lora`) and image-tower LoRA
    (:mod:`cxrlib.lora_image`): ``model(image_rows(rows), tokenizer(texts of rows))`` gives what
    :class:`cxrlib.losses.MultiTaskLoss` reads; the model has ``logit_scale`` and ``classifier``.

    Under ``torchrun`` the model is wrapped in DDP, each rank runs its :func:`shard_rows` of every batch
    and the contrastive terms gather all ranks' features, so a step equals one process's on the whole
    batch. Parameters no active loss term reads stay frozen (DDP needs a gradient for each trainable one).
    Returns the per-epoch history (terms averaged over every rank's rows), truncation counts, adjustments.
    """
    from cxrlib.losses import MultiTaskLoss
    from cxrlib.runtime import world as _world

    rank, world = _world()
    loss_fn = MultiTaskLoss.from_config(cfg, world_size=world, rank=rank)
    if not loss_fn.needs_logit_scale:
        model.logit_scale.requires_grad_(False)
    if not loss_fn.needs_logits:
        model.classifier.requires_grad_(False)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    rng = np.random.default_rng(cfg.seed)
    lengths = [len(t) for t in texts]
    history: list[dict[str, float]] = []
    for epoch in range(cfg.epochs):
        model.train()
        t0, sums, n = time.perf_counter(), {}, 0
        batches = tt.bucketed_batches(lengths, cfg.batch_size, rng)
        for rows in tqdm(batches, desc=f"LoRA epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank > 0,
                         leave=False):
            rows = shard_rows(rows, rank, world)
            if rows is None:
                continue
            batch = tokenizer([texts[i] for i in rows]).to(cfg.device)
            out = net(image_rows(rows), batch)
            terms = loss_fn(out, y[rows].to(cfg.device))
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            clamp_logit_scale_(model.logit_scale)  # open_clip's rule: the parameter, so its gradient survives
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(rows)
            n += len(rows)
        if world > 1:  # every rank's rows, not rank 0's shard
            packed = torch.tensor([*sums.values(), float(n)], dtype=torch.float64)
            torch.distributed.all_reduce(packed)
            sums, n = dict(zip(sums, packed[:-1].tolist())), int(packed[-1])
        history.append({"epoch": epoch + 1, **{k: v / max(n, 1) for k, v in sums.items()},
                        "seconds": round(time.perf_counter() - t0, 2)})
    model.eval()
    return {"history": history, "truncation": stats_over_ranks(tokenizer),
            "adjustments": dict(tokenizer.adjustments), "world_size": world}


def train_lora(spec: tt.TextTowerSpec | str, texts: list[str], image_emb: np.ndarray, labels: np.ndarray,
               cfg: LoraTrainConfig, progress: bool = True) -> tuple[ProjectedTower, tt.TowerTokenizer, dict]:
    """Train LoRA adapters + projection so reports land on their (frozen) images' embeddings.

    ``texts[i]`` is the report of image embedding ``image_emb[i]`` with abnormal label ``labels[i]``.
    Returns the model, its tokenizer and a history with per-epoch mean loss terms and seconds. Under
    ``torchrun`` (``python -m cxrlib.lora_dist``) the ranks share each batch (:func:`fit_lora`).
    """
    if len(texts) != len(image_emb) or len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts, {len(image_emb)} image embeddings, {len(labels)} labels")
    torch.manual_seed(cfg.seed)
    tower, tokenizer = tt.build_text_tower(spec, "cpu")
    add_lora(tower, cfg.lora)
    model = ProjectedTower(tower, int(image_emb.shape[1])).to(cfg.device)
    img = torch.as_tensor(image_emb, dtype=torch.float32)
    info = fit_lora(model, tokenizer, texts, labels, lambda rows: img[rows].to(cfg.device), cfg, progress)
    return model, tokenizer, info
