"""The paper's lightweight projector: one head per modality on frozen embeddings + a normal/abnormal classifier.

Kinds (``build_projector(kind, ...)``), the one factory of heads:

================  =========================================================================================
``identity``      no parameters besides the classifier: the frozen backbone's own (re-normalised) space
``linear``        one ``Linear(in, out)`` per modality (identity-initialised when ``in == out``)
``mlp``           ``depth`` x [Linear -> activation -> dropout], then ``Linear(width, out)``
``residual_mlp``  ``x + MLP(x)`` with the MLP's last layer zero-initialised, so training starts exactly in
                  the backbone's space (when ``in != out`` the skip is a learned linear map instead)
================  =========================================================================================

Every ``encode_*`` returns L2-normalised embeddings. The classifier is one ``Linear(out_dim, 1)`` (or an MLP
when ``classifier_hidden > 0``) shared by both modalities and applied to the normalised projected embedding,
so the BCE term shapes the retrieval space of whichever modalities feed it (``TrainConfig.bce_on``).
``logit_scale`` (log of the inverse CLIP temperature, as in open_clip) lives on the model so a checkpoint
holds it; retrieval by cosine similarity never uses it. As in open_clip it is kept in ``[0, log(100)]`` by
clamping the *parameter* in place after each optimiser step (:func:`clamp_logit_scale_`), not its value in
the forward pass (whose gradient is 0 past the bound, so a scale that passed it could never come back).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrlib.io import atomic_path

KINDS = ("identity", "linear", "mlp", "residual_mlp")
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
#: the largest logit scale (inverse temperature) allowed, as in open_clip
MAX_LOGIT_SCALE = 100.0


def clamp_logit_scale_(logit_scale: torch.Tensor) -> torch.Tensor:
    """Clamp a log logit scale in place to ``[0, log(MAX_LOGIT_SCALE)]`` without recording a gradient (open_clip's
    ``logit_scale.clamp_(0, math.log(100))`` after ``optimizer.step()``); returns it."""
    with torch.no_grad():
        return logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))


def _mlp(in_dim: int, width: int, out_dim: int, depth: int, dropout: float, activation: str) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` then a linear output layer."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1 for an MLP head, got {depth}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        d = width
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class ResidualHead(nn.Module):
    """``skip(x) + mlp(x)``; the MLP's last layer starts at zero so the head starts as ``skip``."""

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, dropout: float, activation: str):
        super().__init__()
        self.skip = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim, bias=False)
        self.mlp = _mlp(in_dim, width, out_dim, depth, dropout, activation)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.mlp(x)


def _head(kind: str, in_dim: int, out_dim: int, width: int, depth: int, dropout: float, activation: str) -> nn.Module:
    if kind == "identity":
        if in_dim != out_dim:
            raise ValueError(f"kind 'identity' needs out_dim == in_dim, got {in_dim} -> {out_dim}")
        return nn.Identity()
    if kind == "linear":
        lin = nn.Linear(in_dim, out_dim)
        if in_dim == out_dim:
            with torch.no_grad():
                lin.weight.copy_(torch.eye(in_dim))
                lin.bias.zero_()
        return lin
    if kind == "mlp":
        return _mlp(in_dim, width, out_dim, depth, dropout, activation)
    if kind == "residual_mlp":
        return ResidualHead(in_dim, out_dim, width, depth, dropout, activation)
    raise ValueError(f"unknown projector kind {kind!r}; choose one of {KINDS}")


class ProjectorModel(nn.Module):
    """Image head, text head, shared classifier head and the CLIP logit scale.

    ``forward(img, txt)`` returns ``{"image", "text", "logit_scale"}`` (+ ``"image_logits"``,
    ``"text_logits"`` when ``classify=True``): the input ``MultiTaskLoss`` expects.
    """

    def __init__(self, kind: str, in_dim_image: int, in_dim_text: int, out_dim: int | None = None,
                 width: int = 512, depth: int = 1, dropout: float = 0.1, activation: str = "gelu",
                 classifier_hidden: int = 0, init_temperature: float = 0.07):
        super().__init__()
        if out_dim is None:
            if in_dim_image != in_dim_text:
                raise ValueError(f"image ({in_dim_image}) and text ({in_dim_text}) dims differ: set out_dim")
            out_dim = in_dim_image
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not 1.0 / MAX_LOGIT_SCALE <= init_temperature <= 1.0:
            raise ValueError(f"init_temperature must be in [{1.0 / MAX_LOGIT_SCALE}, 1], got {init_temperature}")
        self.build_args: dict[str, Any] = dict(
            kind=kind, in_dim_image=in_dim_image, in_dim_text=in_dim_text, out_dim=out_dim, width=width,
            depth=depth, dropout=dropout, activation=activation, classifier_hidden=classifier_hidden,
            init_temperature=init_temperature)
        self.kind, self.out_dim = kind, out_dim
        self.image_head = _head(kind, in_dim_image, out_dim, width, depth, dropout, activation)
        self.text_head = _head(kind, in_dim_text, out_dim, width, depth, dropout, activation)
        self.classifier = (nn.Linear(out_dim, 1) if classifier_hidden <= 0 else
                           _mlp(out_dim, classifier_hidden, 1, 1, dropout, activation))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.clamp_logit_scale_()

    def clamp_logit_scale_(self) -> None:
        """Keep ``logit_scale`` in ``[0, log(MAX_LOGIT_SCALE)]``; call after every optimiser step."""
        clamp_logit_scale_(self.logit_scale)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised image embeddings [N, out_dim]."""
        return F.normalize(self.image_head(x), dim=-1)

    def encode_text(self, x: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised report embeddings [N, out_dim]."""
        return F.normalize(self.text_head(x), dim=-1)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Abnormal-vs-normal logits [N] of projected embeddings ``z`` (either modality)."""
        return self.classifier(z).squeeze(-1)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)``: the parameter itself is kept at most ``log(MAX_LOGIT_SCALE)`` (see
        :meth:`clamp_logit_scale_`), so the gradient always reaches it."""
        return self.logit_scale.exp()

    def forward(self, img: torch.Tensor, txt: torch.Tensor, classify: bool = True) -> dict[str, torch.Tensor]:
        out = {"image": self.encode_image(img), "text": self.encode_text(txt), "logit_scale": self.scale()}
        if classify:
            out["image_logits"] = self.classify(out["image"])
            out["text_logits"] = self.classify(out["text"])
        return out


def build_projector(kind: str, in_dim_image: int, in_dim_text: int, **cfg: Any) -> ProjectorModel:
    """A ``ProjectorModel`` of ``kind`` (see the module table); ``cfg``: out_dim, width, depth, dropout,
    activation, classifier_hidden, init_temperature."""
    if kind not in KINDS:
        raise ValueError(f"unknown projector kind {kind!r}; choose one of {KINDS}")
    return ProjectorModel(kind, in_dim_image, in_dim_text, **cfg)


def save_projector(path: str | os.PathLike, model: ProjectorModel, config: dict[str, Any]) -> Path:
    """Write weights + build arguments + the full training ``config`` in one file, atomically."""
    payload = {"format": "cxrlib.projector/1", "build_args": model.build_args,
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "config": config}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_projector(path: str | os.PathLike, map_location: str = "cpu") -> tuple[ProjectorModel, dict[str, Any]]:
    """Rebuild a projector written by :func:`save_projector`; returns ``(model in eval mode, config)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no projector checkpoint at {path}; run notebook 02 (make paper) first")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != "cxrlib.projector/1":
        raise ValueError(f"{path} is not a cxrlib projector checkpoint")
    args = dict(payload["build_args"])
    model = build_projector(args.pop("kind"), args.pop("in_dim_image"), args.pop("in_dim_text"), **args)
    model.load_state_dict(payload["state_dict"])
    model.clamp_logit_scale_()  # a checkpoint written before the in-place clamp may hold a larger value
    return model.eval(), payload["config"]
