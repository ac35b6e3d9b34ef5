"""The multi-task loss: a weighted sum of registered loss terms (BCE, supervised contrastive, CLIP).

Each term is a small ``nn.Module`` (settings in ``__init__``, maths in ``forward``) registered with
:func:`register_term`, which gives its name, its default weight, its display label and the help line of its
``w_<term>`` setting. The registry is the one list of terms: every ``w_<term>`` / ``adapt_w_<term>`` /
``lora_w_<term>`` setting, ``W_<TERM>`` make variable, run name (``bce1-supcon1-clip1-<hash>``) and ablation
weighting is derived from it (:mod:`cxrlib.settings` reads the ``register_term`` calls from this file's
source, without importing torch). A new term: its class here with a ``@register_term(...)`` line, its test,
and its weight in the parameters cells of notebooks 00, 02 and 06 (``tests/test_settings.py`` names any missing).

:class:`MultiTaskLoss` takes a mapping term -> weight and returns a dict of named, unweighted terms plus
``total = sum(weight[t] * term[t])``. A term whose weight is 0 is not computed and not in the dict. Every
term reads the output dict of ``ProjectorModel.forward`` (or ``AdaptModel``/``ProjectedTower``) through its
uniform :meth:`Term.compute` ``(out, labels)``; its class attributes say what it needs (``needs_labels``: the
normal/abnormal labels; ``needs_logits``: the classifier head; ``needs_logit_scale``: the CLIP temperature),
so trainers freeze or skip what no active term uses without naming terms. A term's own options are recipe
settings named in its ``options`` (setting name -> ``__init__`` keyword).

- BCE: on the shared classifier's logits of the projected image and/or report embeddings (``bce_on``),
  optionally class-weighted (``pos_weight``).
- SupCon: supervised contrastive loss across modalities (:func:`supcon`: pytorch-metric-learning's
  ``SupConLoss`` with its ``MeanReducer``, computed on dense label masks), multi-positive (every item with the
  anchor's label is a positive, the paired item included), image anchors vs report references and the
  reverse, averaged. Every anchor has its own pair as a positive, and the term is the mean over *all*
  anchors (PML's default ``AvgNonZeroReducer`` would leave out an anchor whose float32 loss is exactly 0,
  e.g. the one member of its class at a low temperature). A batch of one class gives 0.
- CLIP: open_clip's ``ClipLoss`` on the exact image-report pairs (the diagonal); identical reports of
  two studies in one batch therefore count as negatives of each other here (SupCon treats them as
  positives, since they share the label).

Every term is computed in float32 (fp16/bf16 inputs are upcast). Under ``torchrun`` (``world_size > 1``)
both contrastive terms use each rank's anchors against the references of all ranks, gathered with
gradients (open_clip's ``local_loss=True, gather_with_grad=True``), so the averaged gradient equals that of
one process holding the whole batch.

The library behind the CLIP term is imported when the term is built, not with this module (nodes that
evaluate but never train import it through :mod:`cxrlib.train`): ``open_clip.loss`` is loaded by itself
(:func:`_clip_loss_class`), since ``import open_clip.loss`` first runs ``open_clip/__init__``, which imports
its models, ``timm`` and ``transformers``.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cxrlib import settings

BCE_ON = ("image", "text", "both")

#: the registered loss terms, by name, in registration order (the order of run names and ablation weightings)
REGISTRY: dict[str, type[Term]] = {}
#: term -> default weight, filled by :func:`register_term` (the ``w_<term>`` settings' defaults)
TERMS: dict[str, float] = {}
#: the projector recipe's defaults (:mod:`cxrlib.settings`): the terms' option defaults
_RECIPE = settings.defaults("recipe")


def register_term(name: str, default: float, label: str, help: str):
    """Class decorator: register a :class:`Term` as ``name`` with its default weight, its display label
    (tables, plots) and the help line of its weight settings. Arguments are literals: :mod:`cxrlib.settings`
    reads them from this file's source."""

    def deco(cls: type[Term]) -> type[Term]:
        if name in REGISTRY:
            raise ValueError(f"loss term {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__})")
        cls.name, cls.label, cls.help = name, label, help
        REGISTRY[name] = cls
        TERMS[name] = float(default)
        return cls

    return deco


def resolve_weights(given: Mapping[str, float] | None = None, prefix: str = "w_") -> dict[str, float]:
    """Every registered term's weight: ``given`` (term -> weight) over the defaults, checked by the schema's
    one weight validator (:func:`cxrlib.settings.check_weights`, whose errors name ``<prefix><term>``); a name
    that is no term is an error naming the terms."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(REGISTRY))
    if unknown:
        raise ValueError(f"unknown loss terms {unknown}; the terms are {', '.join(REGISTRY)}")
    return settings.check_weights({**TERMS, **given}, prefix)


def _clip_loss_class() -> type[nn.Module]:
    """open_clip's ``ClipLoss``. When open_clip is not imported yet its ``loss.py`` (torch-only: no import of
    open_clip's own modules) is loaded as a module of its own, without the package's ``__init__`` and the
    model code, ``timm`` and ``transformers`` that brings; the normal import otherwise (or if that load fails)."""
    if "open_clip" not in sys.modules:
        name = "cxrlib._open_clip_loss"
        if name in sys.modules:
            return sys.modules[name].ClipLoss
        pkg = importlib.util.find_spec("open_clip")
        if pkg is not None and pkg.submodule_search_locations:
            path = os.path.join(list(pkg.submodule_search_locations)[0], "loss.py")
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is not None and spec.loader is not None:
                module = importlib.util.module_from_spec(spec)
                try:
                    spec.loader.exec_module(module)
                except ImportError:  # a release whose loss.py imports open_clip's own modules
                    pass
                else:
                    sys.modules[name] = module
                    return module.ClipLoss
    from open_clip.loss import ClipLoss

    return ClipLoss


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


class Term(nn.Module):
    """A registered loss term: :meth:`compute` reads the model's output dict (``image``, ``text``,
    ``logit_scale``, ``image_logits``/``text_logits``) and the labels, and returns a float32 scalar.

    Class attributes: ``name``/``label``/``help`` (set by :func:`register_term`); what the term needs
    (``needs_labels``, ``needs_logits``, ``needs_logit_scale``); ``options``, the recipe settings it takes
    (setting name -> ``__init__`` keyword). An ``__init__`` with ``rank``/``world_size`` keywords is given the
    process group's (the contrastive terms gather across ranks).
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    help: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    needs_logits: ClassVar[bool] = False
    needs_logit_scale: ClassVar[bool] = False
    options: ClassVar[dict[str, str]] = {}

    def compute(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@register_term("bce", default=1.0, label="BCE", help="the normal/abnormal BCE term")
class BCETerm(Term):
    """Binary cross-entropy (abnormal = 1) on classifier logits; ``pos_weight`` weights the abnormal class.
    ``bce_on``: which projected embeddings feed the classifier (``image``, ``text`` or ``both``, averaged)."""

    needs_labels = needs_logits = True
    options = {"pos_weight": "pos_weight", "bce_on": "bce_on"}

    def __init__(self, pos_weight: float | None = _RECIPE["pos_weight"], bce_on: str = _RECIPE["bce_on"]):
        super().__init__()
        if pos_weight is not None and not pos_weight > 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        if bce_on not in BCE_ON:
            raise ValueError(f"bce_on must be one of {BCE_ON}, got {bce_on!r}")
        self.pos_weight, self.bce_on = pos_weight, bce_on
        self._pos_weight_on: dict[torch.device, torch.Tensor] = {}  # made once per device, not copied each step

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        pw = None
        if self.pos_weight is not None:
            pw = self._pos_weight_on.get(logits.device)
            if pw is None:
                pw = self._pos_weight_on[logits.device] = torch.tensor(self.pos_weight, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pw)

    def compute(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        if "image_logits" not in out:
            raise ValueError(f"w_{self.name} > 0 but the model output has no classifier logits "
                             "(forward(classify=True))")
        keys = {"image": ["image_logits"], "text": ["text_logits"], "both": ["image_logits", "text_logits"]}
        return sum(self(out[k], labels) for k in keys[self.bce_on]) / len(keys[self.bce_on])


def supcon(anchor: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, ref_labels: torch.Tensor,
           temperature: float) -> torch.Tensor:
    """Supervised contrastive loss of ``anchor`` rows against ``ref`` rows, the mean over every anchor.

    Each anchor's positives are the references of its label; the loss of an anchor is minus the mean log
    softmax (over all references, cosine similarity / ``temperature``) of its positives. With no negative
    in the batch, or at most one positive and one negative pair, the loss is 0. This is
    pytorch-metric-learning's ``SupConLoss(temperature, reducer=MeanReducer())(anchor, labels, ref_emb=ref,
    ref_labels=ref_labels)`` (``ref_labels`` a distinct tensor, so no pair is dropped), op for op on the same
    values, but on dense label masks: PML builds them from index lists (``torch.where``) and tests them with
    ``.any()``, which holds the host until the device catches up about ten times a step; here nothing waits,
    so a GPU trainer queues its steps ahead (``tests/test_losses.py`` checks equal values and gradients).
    """
    mat = torch.matmul(F.normalize(anchor, p=2, dim=1), F.normalize(ref, p=2, dim=1).t())
    pos = (labels[:, None] == ref_labels[None, :]).to(mat.dtype)
    mat = mat / temperature
    mat = mat - mat.max(dim=1, keepdim=True)[0].detach()  # for numerical stability
    log_prob = mat - torch.logsumexp(mat, dim=1, keepdim=True)
    mean_log_prob_pos = (pos * log_prob).sum(dim=1) / (pos.sum(dim=1) + torch.finfo(mat.dtype).tiny)
    # PML's cases of 0 (tensors, so no host sync): no negative pair, or at most one pair of each kind
    n_pos, n_neg = pos.sum(), (1 - pos).sum()
    counted = ((n_neg > 0) & ((n_pos > 1) | (n_neg > 1))).to(mat.dtype)
    return torch.mean(-mean_log_prob_pos) * counted


@register_term("supcon", default=1.0, label="SupCon", help="the supervised contrastive term")
class CrossModalSupCon(Term):
    """Supervised contrastive loss (:func:`supcon`, cosine similarity, ``temperature``) with image anchors vs
    text references and the reverse, averaged; under torchrun the references are every rank's."""

    needs_labels = True
    options = {"supcon_temperature": "temperature"}

    def __init__(self, temperature: float = _RECIPE["supcon_temperature"], rank: int = 0, world_size: int = 1):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"supcon temperature must be > 0, got {temperature}")
        self.temperature, self.rank, self.world_size = temperature, rank, world_size

    def forward(self, image: torch.Tensor, text: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image, text, labels = image.float(), text.float(), labels.long()
        all_image = gather_with_grad(image, self.world_size)
        all_text = gather_with_grad(text, self.world_size)
        all_labels = gather_labels(labels, self.world_size)
        i2t = supcon(image, labels, all_text, all_labels, self.temperature)
        t2i = supcon(text, labels, all_image, all_labels, self.temperature)
        return (i2t + t2i) / 2

    def compute(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self(out["image"], out["text"], labels)


@register_term("clip", default=1.0, label="CLIP", help="the CLIP (image-report InfoNCE) term")
class ClipTerm(Term):
    """Symmetric InfoNCE on exact pairs via ``open_clip.loss.ClipLoss``."""

    needs_logit_scale = True

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.loss = _clip_loss_class()(local_loss=world_size > 1, gather_with_grad=world_size > 1,
                             rank=rank, world_size=world_size)

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        return self.loss(image.float(), text.float(), logit_scale.float())

    def compute(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return self(out["image"], out["text"], out["logit_scale"])


def active(weights: Mapping[str, float]) -> list[str]:
    """The terms of ``weights`` with a weight > 0, in registration order (what :class:`MultiTaskLoss` computes)."""
    return [t for t in REGISTRY if weights.get(t, 0) > 0]


def needs(weights: Mapping[str, float], flag: str) -> bool:
    """Whether an active term of ``weights`` has the class flag ``flag`` (``needs_labels``, ``needs_logits``,
    ``needs_logit_scale``): what a trainer reads to freeze a head no active term uses."""
    return any(getattr(REGISTRY[t], flag) for t in active(weights))


def term_options() -> set[str]:
    """The recipe settings some registered term takes (e.g. ``supcon_temperature``, ``pos_weight``)."""
    return {k for cls in REGISTRY.values() for k in cls.options}


class MultiTaskLoss(nn.Module):
    """``sum(weights[t] * term_t)`` over the registered terms on the output of ``ProjectorModel.forward``.

    ``weights``: term -> weight (a term left out keeps its default weight, :data:`TERMS`). ``options``: the
    terms' recipe settings by name (``supcon_temperature``, ``pos_weight``, ``bce_on``; left out: the
    recipe's defaults). ``forward(out, labels)`` -> ``{<term>: unweighted value, ..., "total"}`` with only the
    terms of weight > 0. ``terms`` holds every term module by name; ``needs_labels`` / ``needs_logits`` /
    ``needs_logit_scale`` say whether an active term reads the labels, the classifier or the temperature.
    """

    def __init__(self, weights: Mapping[str, float] | None = None, *, rank: int | None = None,
                 world_size: int | None = None, **options: Any):
        super().__init__()
        self.weights = resolve_weights(weights)
        unknown = sorted(set(options) - term_options())
        if unknown:
            raise ValueError(f"unknown loss options {unknown}; the terms take {sorted(term_options())}")
        r, ws = _world()
        rank, world_size = (r if rank is None else rank), (ws if world_size is None else world_size)
        self.terms = nn.ModuleDict()
        for name, cls in REGISTRY.items():
            kw = {arg: options.get(opt, _RECIPE.get(opt)) for opt, arg in cls.options.items()
                  if opt in options or opt in _RECIPE}
            params = inspect.signature(cls.__init__).parameters
            kw.update({k: v for k, v in (("rank", rank), ("world_size", world_size)) if k in params})
            self.terms[name] = cls(**kw)
        self.active = active(self.weights)

    @classmethod
    def from_config(cls, cfg: Any, **overrides: Any) -> MultiTaskLoss:
        """The loss of a config object with a ``weights`` mapping and (any of) the terms' option fields."""
        options = {k: getattr(cfg, k) for k in term_options() if hasattr(cfg, k)}
        return cls(cfg.weights, **{**options, **overrides})

    def _needs(self, flag: str) -> bool:
        return needs(self.weights, flag)

    @property
    def needs_labels(self) -> bool:
        return self._needs("needs_labels")

    @property
    def needs_logits(self) -> bool:
        return self._needs("needs_logits")

    @property
    def needs_logit_scale(self) -> bool:
        return self._needs("needs_logit_scale")

    def forward(self, out: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        total = out["image"].new_zeros((), dtype=torch.float32)
        for t in self.active:
            terms[t] = self.terms[t].compute(out, labels)
            total = total + self.weights[t] * terms[t]
        terms["total"] = total
        return terms
