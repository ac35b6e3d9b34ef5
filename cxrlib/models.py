"""The models of a comparison: which cached embeddings, passed through which trained projector.

A :class:`ModelSpec` names a backbone's cached embeddings and, optionally, the projector run that
maps them (``results_dir(profile)/models/<run>/projector.pt``, :func:`projector_path`).
:func:`encode` / :func:`project` are the one place embeddings go through a projector (evaluation,
embedding maps, the trainer's validation and the search explorer all call them);
:func:`load_checked_projector` refuses a checkpoint trained on another backbone, data set or embedding
width, naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrlib import paths
from cxrlib.pairs import PairedSplit, load_paired


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate: frozen ``backbone`` embeddings, optionally through projector ``run``.

    In a spec given as a dict, ``"{backbone}"`` and ``"{run}"`` in any value are replaced by the
    notebook's trained backbone and run name (so ``make paper W_SUPCON=0.5`` evaluates that run).
    """

    name: str
    backbone: str
    run: str | None = None

    @classmethod
    def parse(cls, spec: dict | ModelSpec, **placeholders: str) -> ModelSpec:
        if isinstance(spec, ModelSpec):
            return spec
        if not isinstance(spec, dict) or not {"name", "backbone"} <= set(spec) or set(spec) - {"name", "backbone", "run"}:
            raise ValueError(f"a model spec is a dict with 'name', 'backbone' and optionally 'run', got {spec!r}")
        fill = {k: (v.format(**placeholders) if isinstance(v, str) else v) for k, v in spec.items()}
        return cls(name=str(fill["name"]), backbone=str(fill["backbone"]), run=fill.get("run") or None)


def projector_path(profile: str, run: str) -> Path:
    """``results_dir(profile)/models/<run>/projector.pt`` (written by notebook 02_train); ``profile`` is the
    results folder key, ``cxrlib.dag.out_key(profile, dataset)`` (the profile itself for its own dataset). In
    an interactive run, that run's own checkpoint when it trained one, else make's (:func:`cxrlib.paths.readable`)."""
    return paths.readable(paths.results_dir(profile) / "models" / run / "projector.pt")


def load_eval_split(dataset: str, backbone: str, split: str = "test",
                    finding_columns: list[str] | None = None) -> PairedSplit:
    """The study table's ``split`` with the cached embeddings of ``backbone`` and its finding labels
    (see :func:`cxrlib.pairs.load_paired`)."""
    return load_paired(dataset, backbone, (split,), finding_columns)[split]


def encode(model: Any, x: np.ndarray, modality: str, batch_size: int = 8192, device: str = "cpu") -> np.ndarray:
    """``model.encode_image(x)`` or ``encode_text(x)`` as float32 numpy, in batches of ``batch_size`` on
    ``device``, without gradients, in the model's current train/eval mode."""
    import torch

    if modality not in ("image", "text"):
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn = model.encode_image if modality == "image" else model.encode_text
    x = np.ascontiguousarray(x, dtype=np.float32)
    with torch.no_grad():  # an empty input still gives [0, D]
        parts = [fn(torch.from_numpy(x[s:s + batch_size]).to(device)).float().cpu().numpy()
                 for s in range(0, max(len(x), 1), batch_size)]
    return np.concatenate(parts)


def project(model: Any, img: np.ndarray, txt: np.ndarray, batch_size: int = 8192,
            device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Both modalities through ``model`` (:func:`encode`) in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        return encode(model, img, "image", batch_size, device), encode(model, txt, "text", batch_size, device)
    finally:
        model.train(was_training)


def load_checked_projector(checkpoint: str | os.PathLike, backbone: str | None = None, dataset: str | None = None,
                           dims: tuple[int, int] | None = None, map_location: str = "cpu") -> tuple[Any, dict]:
    """``load_projector(checkpoint)`` after checking it was trained on ``backbone`` / ``dataset`` (when
    its config records them) and takes image/text widths ``dims``; a mismatch is an error naming the path."""
    from cxrlib.projector import load_projector

    model, cfg = load_projector(checkpoint, map_location=map_location)
    for key, want in (("backbone", backbone), ("dataset", dataset)):
        if want is not None and cfg.get(key) not in (None, want):
            raise ValueError(f"projector {checkpoint} was trained on {key} {cfg[key]!r}, not {want!r}: pass "
                             f"{key}={cfg[key]!r} or retrain it (notebook 02)")
    have = (model.build_args["in_dim_image"], model.build_args["in_dim_text"])
    if dims is not None and tuple(dims) != have:
        raise ValueError(f"projector {checkpoint} takes image/text dims {have}, the embeddings have {tuple(dims)}")
    return model, cfg


def apply_projector(split: PairedSplit, checkpoint: str | os.PathLike, backbone: str | None = None,
                    batch_size: int = 8192, dataset: str | None = None) -> tuple[PairedSplit, dict]:
    """``split`` with embeddings passed through a trained projector: ``(split, its config)``.

    A checkpoint trained on another backbone (or data set) than given, or for other widths, is an error.
    """
    model, cfg = load_checked_projector(checkpoint, backbone, dataset, (split.img.shape[1], split.txt.shape[1]))
    img, txt = project(model, split.img, split.txt, batch_size)
    return replace(split, img=img, txt=txt), cfg


def load_model_split(spec: ModelSpec, dataset: str, profile: str, split: str = "test",
                     finding_columns: list[str] | None = None) -> PairedSplit:
    """The evaluation split of one model spec (``profile``: the results key, see :func:`projector_path`);
    a missing checkpoint names its path and how to build it."""
    data = load_eval_split(dataset, spec.backbone, split, finding_columns)
    if spec.run is None:
        return data
    ckpt = projector_path(profile, spec.run)
    if not ckpt.is_file():
        profile_name, _, other = profile.partition("-")
        hint = f"`make paper PROFILE={profile_name}" + (f" DATASET={other}`" if other else "`")
        raise FileNotFoundError(f"model {spec.name!r}: no projector checkpoint at {ckpt}; build it with "
                                f"{hint} (notebook 02_train, run {spec.run!r})")
    return apply_projector(data, ckpt, spec.backbone)[0]
