"""LoRA training on several devices: ``python -m cxrlib.lora_dist`` under ``torchrun``, and its launcher.

:func:`cxrlib.lora.fit_lora` is the one trainer; under ``torchrun`` (an initialised process group) it
wraps the model in DDP, gives each rank its contiguous share of every global batch
(:func:`cxrlib.lora.shard_rows`), and the contrastive terms gather the other ranks' features with
gradients (:mod:`cxrlib.losses`), so the averaged gradient is that of one process holding the whole
batch. This module moves the inputs to the ranks (one ``torch.save`` file: reports, labels, image
embeddings or image paths), runs the trainer on each, and rank 0 writes the checkpoint
(:func:`cxrlib.lora.save_lora`, or :func:`cxrlib.lora_image.save_image_lora` with image-tower LoRA).

``launch(...)`` trains in this process on one device and under ``torchrun`` with ``nproc > 1``
(one rank per GPU; on CPUs the gloo backend, as the tests run it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxrlib import lora, runtime
from cxrlib import text_towers as tt


def config_from_dict(d: dict[str, Any]) -> lora.LoraTrainConfig:
    """A :class:`cxrlib.lora.LoraTrainConfig` from its ``to_dict()`` (weights flat as ``w_<term>``)."""
    d = dict(d)
    settings = lora.LoraSettings(**d.pop("lora")) if "lora" in d else lora.LoraSettings()
    fields = {f.name for f in dataclasses.fields(lora.LoraTrainConfig)}
    weights = {k[2:]: d.pop(k) for k in [k for k in d if k.startswith("w_") and k not in fields]}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"LoRA training config has unknown fields {unknown}")
    if weights:
        d["weights"] = {**d.get("weights", {}), **weights}
    return lora.LoraTrainConfig(lora=settings, **d)


def write_inputs(path: str | os.PathLike, texts: list[str], labels: np.ndarray, image_emb: np.ndarray | None = None,
                 image_paths: list[str] | None = None) -> Path:
    """The training inputs every rank reads (reports, labels, and image embeddings or image paths)."""
    if (image_emb is None) == (image_paths is None):
        raise ValueError("give image embeddings (frozen image tower) or image paths (image-tower LoRA), one of them")
    payload: dict[str, Any] = {"texts": list(texts), "labels": torch.as_tensor(np.asarray(labels), dtype=torch.long)}
    if image_emb is not None:
        payload["image_emb"] = torch.as_tensor(np.asarray(image_emb, dtype=np.float32))
    else:
        payload["image_paths"] = [str(p) for p in image_paths]
    torch.save(payload, path)
    return Path(path)


def torchrun_command(inputs: str | os.PathLike, out: str | os.PathLike, spec: tt.TextTowerSpec | str,
                     cfg: lora.LoraTrainConfig, nproc: int, image_backbone: str | None = None,
                     image_lora: lora.LoraSettings | None = None) -> list[str]:
    """The ``torchrun`` command that runs :func:`main` on ``nproc`` ranks."""
    spec = tt.text_tower_spec(spec) if isinstance(spec, str) else spec
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cxrlib.lora_dist", "--inputs", str(inputs), "--out", str(out),
           "--spec", json.dumps(spec.to_dict()), "--config", json.dumps(cfg.to_dict())]
    if image_backbone:
        cmd += ["--image-backbone", image_backbone]
        if image_lora is not None:
            cmd += ["--image-lora", json.dumps(image_lora.to_dict())]
    return cmd


def _image_settings(d: dict[str, Any] | None) -> lora.LoraSettings | None:
    if d is None:
        return None
    t = d.get("target_modules")
    return lora.LoraSettings(d["r"], d["alpha"], d["dropout"], tuple(t) if t else None)


def _train_and_save(inputs: dict[str, Any], out: str | os.PathLike, spec: tt.TextTowerSpec,
                    cfg: lora.LoraTrainConfig, image_backbone: str | None, image_lora: lora.LoraSettings | None,
                    progress: bool, extra: dict[str, Any] | None = None) -> Path | None:
    from cxrlib.runtime import world

    rank, _ = world()
    texts, labels = inputs["texts"], np.asarray(inputs["labels"])
    if image_backbone:
        from cxrlib import lora_image

        model, _, _, info = lora_image.train_image_lora(spec, image_backbone, inputs["image_paths"], texts, labels,
                                                        cfg, image_lora, progress=progress and rank == 0)
        if rank == 0:
            return lora_image.save_image_lora(out, model, {"train": cfg.to_dict(), "info": info, **(extra or {})})
        return None
    model, _, info = lora.train_lora(spec, texts, np.asarray(inputs["image_emb"]), labels, cfg,
                                     progress=progress and rank == 0)
    if rank == 0:
        return lora.save_lora(out, model, {"train": cfg.to_dict(), "info": info, **(extra or {})})
    return None


def launch(spec: tt.TextTowerSpec | str, texts: list[str], labels: np.ndarray, cfg: lora.LoraTrainConfig,
           out: str | os.PathLike, nproc: int | None = None, image_emb: np.ndarray | None = None,
           image_paths: list[str] | None = None, image_backbone: str | None = None,
           image_lora: lora.LoraSettings | None = None, progress: bool = True,
           extra: dict[str, Any] | None = None) -> Path:
    """Train and write the checkpoint ``out``: in this process (``nproc == 1``) or on ``nproc`` torchrun ranks.
    Its config holds ``train`` (the settings), ``info`` (history, truncation counts, world size) and ``extra``.
    ``nproc`` None: every visible GPU when ``cfg.device`` is a GPU (as :func:`cxrlib.adapt.launch`), else 1."""
    spec = tt.text_tower_spec(spec) if isinstance(spec, str) else spec
    if nproc is None:
        nproc = torch.cuda.device_count() if cfg.device.startswith("cuda") and torch.cuda.is_available() else 1
    if image_backbone and image_paths is None:
        raise ValueError("image-tower LoRA trains from images: give image_paths")
    if nproc <= 1:
        inputs = {"texts": list(texts), "labels": np.asarray(labels), "image_emb": image_emb,
                  "image_paths": image_paths}
        return _train_and_save(inputs, out, spec, cfg, image_backbone, image_lora, progress, extra)
    with tempfile.TemporaryDirectory(prefix="cxr-lora-") as tmp:
        inputs = write_inputs(Path(tmp) / "inputs.pt", texts, labels, None if image_backbone else image_emb,
                              image_paths if image_backbone else None)
        cmd = torchrun_command(inputs, out, spec, cfg, nproc, image_backbone, image_lora)
        subprocess.run(cmd + (["--extra", json.dumps(extra)] if extra else []), check=True)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrlib.lora_dist --inputs I --out CKPT --spec JSON --config JSON [--image-backbone B]``."""
    ap = argparse.ArgumentParser(prog="python -m cxrlib.lora_dist")
    ap.add_argument("--inputs", required=True, help="file written by cxrlib.lora_dist.write_inputs")
    ap.add_argument("--out", required=True)
    ap.add_argument("--spec", required=True, help="the text tower spec as JSON (TextTowerSpec.to_dict)")
    ap.add_argument("--config", required=True, help="LoraTrainConfig.to_dict as JSON")
    ap.add_argument("--image-backbone", default=None, help="also put LoRA adapters in this backbone's image tower")
    ap.add_argument("--image-lora", default=None, help="the image tower's LoraSettings as JSON")
    ap.add_argument("--extra", default=None, help="more config entries for the checkpoint, as a JSON object")
    args = ap.parse_args(argv)
    spec = tt.TextTowerSpec.from_dict(json.loads(args.spec))
    cfg = config_from_dict(json.loads(args.config))
    image_lora = _image_settings(json.loads(args.image_lora)) if args.image_lora else None
    with runtime.process_group(cfg.device) as device:
        cfg.device = device
        inputs = torch.load(args.inputs, map_location="cpu", weights_only=True)
        _train_and_save(inputs, args.out, spec, cfg, args.image_backbone, image_lora, progress=True,
                        extra=json.loads(args.extra) if args.extra else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
