"""The multi-task loss: CLIP (cross-modal alignment) + supervised contrastive (label consistency) + BCE.

Each term is a small ``nn.Module`` (settings in ``__init__``, maths in ``forward``); ``MultiTaskLoss``
returns a dict of named, unweighted terms plus ``total = w_clip*clip + w_supcon*supcon + w_bce*bce``.
A term whose weight is 0 is not computed and not in the dict.

- CLIP: open_clip's ``ClipLoss`` on the exact image-report pairs (the diagonal); identical reports of
  two studies in one batch therefore count as negatives of each other here (SupCon treats them as
  positives, since they share the label).
- SupCon: pytorch-metric-learning's ``SupConLoss`` across modalities, multi-positive (every item with the
  anchor's label is a positive, the paired item included), image anchors vs report references and the
  reverse, averaged. Every anchor has its own pair as a positive, and the term is the mean over *all*
  anchors (``MeanReducer``; PML's default ``AvgNonZeroReducer`` would leave out an anchor whose float32
  loss is exactly 0, e.g. the one member of its class at a low temperature). A batch of one class gives 0.
- BCE: on the shared classifier's logits of the projected image and/or report embeddings (``bce_on``),
  optionally class-weighted (``pos_weight``).

Every term is computed in float32 (fp16/bf16 inputs are upcast). Under ``torchrun`` (``world_size > 1``)
both contrastive terms use each rank's anchors against the references of all ranks, gathered with
gradients (open_clip's ``local_loss=True, gather_with_grad=True``), so the averaged gradient equals that of
one process holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from pytorch_metric_learning.losses import SupConLoss
from pytorch_metric_learning.reducers import MeanReducer
from torch import nn

from cxrlib import settings

BCE_ON = ("image", "text", "both")
#: the loss terms and their default weights (term -> weight): the one list every ``w_<term>`` setting,
#: ``W_<TERM>`` make variable and ablation weighting is derived from (:mod:`cxrlib.settings` reads this
#: literal without importing torch). A new term: its module here, an entry here, its test.
TERMS = {"bce": 1.0, "supcon": 1.0, "clip": 1.0}


def _world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, else (0, 1): :func:`cxrlib.runtime.world`."""
    from cxrlib.runtime import world

    return world()


def gather_with_grad(x: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate ``x`` from every rank (rank order); gradients flow back to each rank's part."""
    if world_size <= 1:
        return x
    import torch.distributed.nn

    return torch.cat(torch.distributed.nn.all_gather(x), dim=0)


def gather_labels(y: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate integer labels from every rank (no gradient)."""
    if world_size <= 1:
        return y
    parts = [torch.empty_like(y) for _ in range(world_size)]
    torch.distributed.all_gather(parts, y)
    return torch.cat(parts, dim=0)


class ClipTerm(nn.Module):
    """Symmetric InfoNCE on exact pairs via ``open_clip.loss.ClipLoss``."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.loss = ClipLoss(local_loss=world_size > 1, gather_with_grad=world_size > 1,
                             rank=rank, world_size=world_size)

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return self.loss(image.float(), text.float(), logit_scale.float())


class CrossModalSupCon(nn.Module):
    """Supervised contrastive loss with image anchors vs text references and the reverse, averaged.

    Uses ``pytorch_metric_learning.losses.SupConLoss`` (cosine similarity, ``temperature``). The
    reference labels are a *different tensor object* from the anchor labels: passing the same object
    makes PML drop the diagonal (the image's own report) from the positives (PML issue #488).
    """

    def __init__(self, temperature: float = 0.1, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"supcon temperature must be > 0, got {temperature}")
        self.temperature, self.rank, self.world_size = temperature, rank, world_size
        self.loss = SupConLoss(temperature=temperature, reducer=MeanReducer())  # mean over every anchor

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image, text, labels = image.float(), text.float(), labels.long()
        all_image = gather_with_grad(image, self.world_size)
        all_text = gather_with_grad(text, self.world_size)
        all_labels = gather_labels(labels, self.world_size).clone()  # a new object even when world_size == 1
        i2t = self.loss(image, labels, ref_emb=all_text, ref_labels=all_labels)
        t2i = self.loss(text, labels, ref_emb=all_image, ref_labels=all_labels)
        return (i2t + t2i) / 2


class BCETerm(nn.Module):
    """Binary cross-entropy (abnormal = 1) on classifier logits; ``pos_weight`` weights the abnormal class."""

    def __init__(self, pos_weight: float | None = None):
        super().__init__()
        if pos_weight is not None and not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        self.pos_weight = pos_weight

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)


class MultiTaskLoss(nn.Module):
    """``w_clip * clip + w_supcon * supcon + w_bce * bce`` on the output of ``ProjectorModel.forward``.

    ``forward(out, labels)`` -> ``{"clip", "supcon", "bce", "total"}`` (only the terms with weight > 0).
    ``bce_on``: which projected embeddings feed the classifier ("image", "text" or "both", averaged).
    """

    def __init__(self, w_bce: float = 1.0, w_supcon: float = 1.0, w_clip: float = 1.0,
                 supcon_temperature: float = 0.1, pos_weight: float | None = None, bce_on: str = "both",
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        settings.validate(settings.TRAIN, {"w_bce": w_bce, "w_supcon": w_supcon, "w_clip": w_clip})  # the one validator
        if bce_on not in BCE_ON:
            raise ValueError(f"bce_on must be one of {BCE_ON}, got {bce_on!r}")
        r, ws = _world()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        self.w_bce, self.w_supcon, self.w_clip = float(w_bce), float(w_supcon), float(w_clip)
        self.bce_on = bce_on
        self.clip = ClipTerm(rank, world_size)
        self.supcon = CrossModalSupCon(supcon_temperature, rank, world_size)
        self.bce = BCETerm(pos_weight)

    @property
    def needs_logits(self) -> bool:
        return self.w_bce > 0

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = out["image"].new_zeros((), dtype=torch.float32)
        if self.w_clip > 0:
            terms["clip"] = self.clip(out["image"], out["text"], out["logit_scale"])
            total = total + self.w_clip * terms["clip"]
        if self.w_supcon > 0:
            terms["supcon"] = self.supcon(out["image"], out["text"], labels)
            total = total + self.w_supcon * terms["supcon"]
        if self.w_bce > 0:
            if "image_logits" not in out:
                raise ValueError("w_bce > 0 but the model output has no classifier logits (forward(classify=True))")
            keys = {"image": ["image_logits"], "text": ["text_logits"], "both": ["image_logits", "text_logits"]}
            terms["bce"] = sum(self.bce(out[k], labels) for k in keys[self.bce_on]) / len(keys[self.bce_on])
            total = total + self.w_bce * terms["bce"]
        terms["total"] = total
        return terms
