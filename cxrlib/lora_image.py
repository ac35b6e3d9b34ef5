"""LoRA on the image tower too (optional): adapters in an open_clip / timm image tower, trained from images
together with the text tower's adapters and the projection.

Ko et al. freeze the image tower (:mod:`cxrlib.lora` trains on its cached embeddings); this switch puts
``peft`` LoRA adapters into the image tower as well, so each step runs the images (slower). Target modules
are a parameter; by default (:data:`IMAGE_DEFAULT_TARGETS`, by the tower's kind):

==============================  ==============================================================
image tower                     default targets
==============================  ==============================================================
open_clip VisionTransformer     ``c_fc``, ``c_proj`` (the blocks' MLP; its attention is an
                                ``nn.MultiheadAttention``, whose forward never calls ``out_proj``)
timm VisionTransformer          ``attn.qkv``, ``attn.proj`` (BiomedCLIP's tower)
timm EfficientNet               ``conv_pw``, ``conv_pwl`` (pointwise convolutions; the offline tower)
==============================  ==============================================================

A target that does not exist, or ``out_proj`` of an ``nn.MultiheadAttention`` (LoRA there would change
nothing), is an error naming it. The checkpoint is a :mod:`cxrlib.lora` checkpoint (text adapters,
projection, logit scale, classifier) plus the image adapters (``image.*``) and, in its config, the image
backbone, its LoRA settings and its base weights' fingerprint; :func:`load_image_lora` rebuilds both
towers and gives the same embeddings (the image tower's other weights are never stored: it runs in eval
mode while its adapters train, so its batch-norm statistics never change).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cxrlib import lora
from cxrlib import text_towers as tt

IMAGE_DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "open_clip.VisionTransformer": ("c_fc", "c_proj"),
    "timm.VisionTransformer": ("attn.qkv", "attn.proj"),
    "timm.EfficientNet": ("conv_pw", "conv_pwl"),
}
PREFIX = "image."


def tower_kind(visual: nn.Module) -> str:
    """``<package>.<class>`` of the image tower's network (a timm trunk inside open_clip's ``TimmModel``)."""
    net = getattr(visual, "trunk", visual)
    return f"{type(net).__module__.split('.')[0]}.{type(net).__name__}"


def resolve_image_targets(visual: nn.Module, settings: lora.LoraSettings) -> tuple[str, ...]:
    """The image tower's target module names: the settings' or the kind's defaults, each checked."""
    kind = tower_kind(visual)
    if settings.target_modules is None and kind not in IMAGE_DEFAULT_TARGETS:
        raise ValueError(f"no default image LoRA targets for a {kind} image tower ({sorted(IMAGE_DEFAULT_TARGETS)} "
                         f"have them): set target_modules")
    targets = lora.resolve_targets(visual, lora.LoraSettings(
        settings.r, settings.alpha, settings.dropout, settings.target_modules or IMAGE_DEFAULT_TARGETS[kind]))
    for name, m in visual.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            key = f"{name}.out_proj"
            hit = [t for t in targets if key == t or key.endswith("." + t)]
            if hit:
                raise ValueError(f"image LoRA target {hit[0]!r} is the out_proj of nn.MultiheadAttention {name!r}, "
                                 f"whose forward reads its weight directly: adapters there change nothing; "
                                 f"target the MLP (c_fc, c_proj) instead")
    return targets


def add_image_lora(visual: nn.Module, settings: lora.LoraSettings) -> nn.Module:
    """Inject LoRA adapters into ``visual`` in place (seeded); every other image weight frozen.
    Records the settings (targets resolved) and the base weights' fingerprint on the module."""
    from peft import LoraConfig, inject_adapter_in_model

    from cxrlib.backbones import fingerprint

    if getattr(visual, "image_lora_settings", None) is not None:
        raise ValueError("this image tower already has LoRA adapters")
    base_fp = fingerprint(visual)
    targets = resolve_image_targets(visual, settings)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(targets), bias="none")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tt.RANDOM_INIT_SEED)
        inject_adapter_in_model(config, visual)
    for name, p in visual.named_parameters():
        p.requires_grad_("lora_" in name)
    visual.image_lora_settings = lora.LoraSettings(settings.r, settings.alpha, settings.dropout, targets)
    visual.image_base_fingerprint = base_fp
    return visual


def image_adapter_state(visual: nn.Module) -> dict[str, torch.Tensor]:
    """The image tower's LoRA tensors (nothing of its base)."""
    return {k: v.detach().cpu() for k, v in visual.state_dict().items() if "lora_" in k}


class ImageLoraModel(nn.Module):
    """An image tower with LoRA + a :class:`cxrlib.lora.ProjectedTower`: ``forward(pixels, batch)`` gives
    what ``MultiTaskLoss`` reads; ``encode_image`` / ``encode_text`` what :mod:`cxrlib.embed` calls."""

    def __init__(self, visual: nn.Module, text: lora.ProjectedTower):
        super().__init__()
        self.visual = visual
        self.text = text

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.text.logit_scale

    @property
    def classifier(self) -> nn.Module:
        return self.text.classifier

    @property
    def tower(self) -> tt.TextTower:
        return self.text.tower

    @property
    def out_dim(self) -> int:
        return self.text.out_dim

    def train(self, mode: bool = True) -> ImageLoraModel:
        """Training mode everywhere but in the frozen image tower's own modules, which run as at inference
        (batch-norm statistics stay the loaded ones, no drop paths); its adapters' dropout does train."""
        super().train(mode)
        if mode:
            for name, m in self.visual.named_modules():
                if "lora_" not in name:
                    m.training = False
        return self

    def encode_image(self, pixels: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.visual(pixels)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text(self, batch, normalize: bool = False) -> torch.Tensor:
        return self.text.encode_text(batch, normalize=normalize)

    def forward(self, pixels: torch.Tensor, batch) -> dict[str, torch.Tensor]:
        return self.text(self.encode_image(pixels), batch)


class ImageRows:
    """Rows -> a batch of preprocessed images (read with :func:`cxrlib.images.load_cxr_image`), on ``device``."""

    def __init__(self, paths: list[str | os.PathLike], preprocess, device: str = "cpu"):
        self.paths, self.preprocess, self.device = [str(p) for p in paths], preprocess, device

    def __call__(self, rows: list[int]) -> torch.Tensor:
        from cxrlib.images import load_cxr_image

        return torch.stack([self.preprocess(load_cxr_image(self.paths[i])) for i in rows]).to(self.device)


def train_image_lora(spec: tt.TextTowerSpec | str, image_backbone: str, image_paths: list[str | os.PathLike],
                     texts: list[str], labels: np.ndarray, cfg: lora.LoraTrainConfig,
                     image_lora: lora.LoraSettings | None = None, progress: bool = True):
    """Train LoRA adapters in both towers + the projection from images and reports.

    ``image_paths[i]`` is the radiograph of report ``texts[i]`` (abnormal label ``labels[i]``); the image
    tower is ``image_backbone``'s (a :func:`cxrlib.backbones.load_backbone` name). Under ``torchrun`` each
    rank takes its shard of every batch (:func:`cxrlib.lora.fit_lora`). Returns ``(model, tokenizer,
    preprocess, info)``.
    """
    from cxrlib.backbones import load_backbone

    if not len(image_paths) == len(texts) == len(labels):
        raise ValueError(f"{len(image_paths)} images, {len(texts)} texts, {len(labels)} labels")
    image_lora = image_lora or lora.LoraSettings()
    backbone = load_backbone(image_backbone, device="cpu")
    if backbone.preprocess is None or not hasattr(backbone.model, "visual"):
        raise ValueError(f"backbone {image_backbone!r} has no image tower to put LoRA adapters in")
    torch.manual_seed(cfg.seed)
    visual = add_image_lora(backbone.model.visual, image_lora)
    tower, tokenizer = tt.build_text_tower(spec, "cpu")
    lora.add_lora(tower, cfg.lora)
    model = ImageLoraModel(visual, lora.ProjectedTower(tower, int(backbone.embed_dim))).to(cfg.device)
    model.image_backbone = image_backbone
    info = lora.fit_lora(model, tokenizer, texts, labels, ImageRows(image_paths, backbone.preprocess, cfg.device),
                         cfg, progress)
    return model, tokenizer, backbone.preprocess, info


def image_lora_config(model: ImageLoraModel) -> dict[str, Any]:
    """What a checkpoint records of the image side."""
    return {"backbone": model.image_backbone, "lora": model.visual.image_lora_settings.to_dict(),
            "base_fingerprint": model.visual.image_base_fingerprint}


def save_image_lora(path: str | os.PathLike, model: ImageLoraModel, config: dict[str, Any] | None = None) -> Path:
    """Text adapters + projection (a :func:`cxrlib.lora.save_lora` checkpoint) + the image adapters."""
    return lora.save_lora(path, model.text, {**(config or {}), "image_lora": image_lora_config(model)},
                          extra_state={PREFIX + k: v for k, v in image_adapter_state(model.visual).items()})


def load_image_lora(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild both towers from a checkpoint -> ``(model, tokenizer, preprocess, config)``; refuses image
    adapters saved from another image tower's weights (fingerprints differ: an error naming both)."""
    from cxrlib.backbones import fingerprint, load_backbone

    obj = lora.read_lora(path)
    cfg = obj["config"]
    if "image_lora" not in cfg:
        raise ValueError(f"{path} holds no image-tower adapters: load it with cxrlib.lora.load_lora")
    icfg = cfg["image_lora"]
    text, tokenizer, _ = lora.load_lora(path, allow_image=True)
    backbone = load_backbone(icfg["backbone"], device="cpu")
    visual = backbone.model.visual
    got = fingerprint(visual)
    if got != icfg["base_fingerprint"]:
        raise ValueError(f"LoRA checkpoint {path}: its image adapters were trained on backbone {icfg['backbone']!r} "
                         f"with weights {icfg['base_fingerprint']}, this one's are {got}")
    s = icfg["lora"]
    add_image_lora(visual, lora.LoraSettings(s["r"], s["alpha"], s["dropout"], tuple(s["target_modules"])))
    state = {k[len(PREFIX):]: v for k, v in obj["state"].items() if k.startswith(PREFIX)}
    expected = set(image_adapter_state(visual))
    if set(state) != expected:
        raise ValueError(f"LoRA checkpoint {path}: image adapters do not fit the image tower (missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]})")
    visual.load_state_dict(state, strict=False)
    model = ImageLoraModel(visual, text)
    model.image_backbone = icfg["backbone"]
    return model.to(device).eval(), tokenizer, backbone.preprocess, cfg


def image_lora_backbone(model: ImageLoraModel, tokenizer: tt.TowerTokenizer, preprocess, name: str):
    """Both adapted towers as one :class:`cxrlib.backbones.Backbone` for :func:`cxrlib.embed.extract_embeddings`."""
    from cxrlib.backbones import Backbone, fingerprint

    tower = model.tower
    conf = {"text_tower": tower.spec.to_dict(), "lora": tower.lora_settings.to_dict(),
            "image_lora": image_lora_config(model)}
    return Backbone(name=name, model=model, preprocess=preprocess, tokenizer=tokenizer, embed_dim=model.out_dim,
                    context_length=tokenizer.max_length, fingerprint=fingerprint(model, conf), config=conf)
