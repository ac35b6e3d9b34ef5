"""Heavier report-similarity metrics as graded relevance: BERTScore, F1-CheXbert, RadGraph F1.

:mod:`cxrlib.graded` grades a retrieved item by the overlap of the data set's finding labels. The
metrics here grade it by comparing *report texts* with a model: the query study's own report (the
reference) against the report of each retrieved study (the hypothesis), in both directions
(image-to-report: the query image's true report vs the retrieved reports; report-to-image: the query
report vs the reports of the retrieved images). A metric ``m`` at ``k`` is the mean pair score over the
top ``k`` of the ranking of :func:`cxrlib.retrieval.topk_similarity` (score, then gallery index).

Each metric needs model weights this package does not ship. Its registry entry (:data:`REPORT_METRICS`)
says which files and where it looks for them; :meth:`ReportMetric.locate` returns their location or a
:class:`Skipped` whose reason names the missing file, and the evaluation records that reason
(``retrieval.csv``: one NaN row per metric with ``note = "metric skipped: ..."``). A file that exists
but is not a valid checkpoint is an :class:`InvalidWeights` error naming it.

=================  ======================================  ================================================
metric             weights and where they are looked for   score of one (reference, hypothesis) pair
=================  ======================================  ================================================
``bertscore``      ``BERTSCORE_MODEL``: a local             BERTScore F1 (Zhang et al. 2020): greedy cosine
                   transformers folder, or a hub id          matching of the token embeddings of layer
                   present in the Hugging Face cache         ``BERTSCORE_LAYER`` (default: the ``bert_score``
                   (never downloaded)                        package's table for the model's name), idf off,
                                                             no baseline rescaling
``chexbert_f1``    ``CHEXBERT_PATH``: ``chexbert.pth``       F1 of the CheXbert-positive observation sets of
``chexbert_f1_5``  (stanfordmlgroup/CheXbert); its          the two reports: all 14 (``No Finding``
                   bert-base-uncased tokenizer and config    included), or the 5 of Miura et al. 2021
                   from ``CHEXBERT_BERT`` (folder or hub     (Atelectasis, Cardiomegaly, Consolidation,
                   id in the cache; default                  Edema, Pleural Effusion); positive = CheXbert
                   ``bert-base-uncased``)                    class 1, blank/negative/uncertain = 0
``radgraph_f1``    the ``radgraph`` package and its model   the ``radgraph`` package's F1RadGraph reward at
                   folder ``RADGRAPH_DIR/<RADGRAPH_MODEL>``  level ``partial`` (entities, with "has a
                   (``config.json``, ``weights.th``,         relation"; Delbrouck et al. 2022's RG_ER);
                   ``vocabulary/``; default: the package's   Yu et al. 2023's RadGraph F1 (mean of entity
                   own cache), plus the transformer its      and relation F1) is not reproduced
                   ``config.json`` names, in the HF cache
=================  ======================================  ================================================

Two reports with no positive observation have F1-CheXbert 1 (as :mod:`cxrlib.graded`'s label-F1, and
``sklearn.metrics.f1_score(..., zero_division=1.0)``). The field reports F1-CheXbert as one micro F1
pooled over all (reference, hypothesis) pairs (the ``f1chexbert`` package's ``micro avg``):
:func:`micro_f1` computes that number; the retrieval tables average per query instead, so that each
query's value can be resampled by patient for CIs like every other metric.

Chance (a uniformly random ranking) is the mean pair score over the whole gallery: computed for the
CheXbert metrics (label vectors make every pair cheap), NaN for BERTScore and RadGraph (every pair would
need the model).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

#: CheXbert's 14 observations in the order of its heads (stanfordmlgroup/CheXbert src/constants.py)
CHEXBERT_CONDITIONS = ("Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                       "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                       "Pleural Other", "Fracture", "Support Devices", "No Finding")
#: the five observations of the 5-label F1-CheXbert (Miura et al. 2021)
CHEXBERT_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
#: CheXbert's class codes (``CLASS_MAPPING``): 0 blank, 1 positive, 2 negative, 3 uncertain
CHEXBERT_POSITIVE = 1
#: reports longer than this many tokens are cut (CheXbert's src/bert_tokenizer.py)
CHEXBERT_MAX_TOKENS = 512
#: the F1RadGraph reward level used (radgraph package: simple | partial | complete)
RADGRAPH_REWARD = "partial"
RADGRAPH_DEFAULT_MODEL = "radgraph"


@dataclass(frozen=True)
class Skipped:
    """A metric that cannot run here, and precisely why (which file is missing where); the reason holds no
    ``"; "`` (the results' notes join several with it)."""

    reason: str


class InvalidWeights(ValueError):
    """A weights file exists but is not a valid checkpoint of the expected layout (the message names it)."""


# --- locating weights: local folders and the Hugging Face cache (never a download) ----------------

def _env(var: str) -> str:
    return os.environ.get(var, "").strip()


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value)


def hf_local(name: str, files: Sequence[str], what: str) -> Path | Skipped:
    """The local folder of a transformers model ``name`` holding every one of ``files``.

    ``name`` is a folder, or a hub id looked up in the Hugging Face cache only (``HF_HUB_CACHE``; nothing
    is downloaded). The first file missing is named in the :class:`Skipped` reason. A weights file is
    one of ``model.safetensors``, ``pytorch_model.bin`` or their sharded indexes (``"<weights>"``).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
               "pytorch_model.bin.index.json")
    path = Path(name).expanduser()
    if path.is_dir():
        for f in files:
            options = weights if f == "<weights>" else (f,)
            if not any((path / o).is_file() for o in options):
                return Skipped(f"{what}: {path / options[0]} not found (folder {path})")
        return path.resolve()
    if _looks_like_path(name):
        return Skipped(f"{what}: folder {path} does not exist")
    folder = None
    for f in files:
        options = weights if f == "<weights>" else (f,)
        hits = [try_to_load_from_cache(name, o) for o in options]
        hit = next((h for h in hits if isinstance(h, str)), None)
        if hit is None:
            return Skipped(f"{what}: {options[0]} of {name!r} is not in the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE}), and nothing is downloaded")
        folder = Path(hit).parent
    return folder


# --- the registry -------------------------------------------------------------------------------

class PairScorer:
    """A loaded metric: ``encode`` each distinct report once, then score (reference, hypothesis) pairs.

    ``pairs(codes, ref, hyp)`` returns ``{metric: [P] scores}`` for pairs of indices into the encoded
    reports; ``chance(codes, ref)`` the mean score of each reference against every encoded report
    (weighted by ``counts``), or ``None`` where that is not computed.
    """

    metrics: tuple[str, ...] = ()

    def encode(self, texts: list[str]):
        raise NotImplementedError

    def pairs(self, encoded, ref: np.ndarray, hyp: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def chance(self, encoded, ref: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray] | None:
        return None


@dataclass(frozen=True)
class ReportMetric:
    """A registered report metric: its result columns, what weights it needs and where it looks, the
    environment variables it reads, the paper or code it follows, ``locate() -> location | Skipped`` and
    ``load(location) -> PairScorer``."""

    name: str
    metrics: tuple[str, ...]
    needs: str
    env: tuple[str, ...]
    follows: str
    locate: Callable[[], object]
    load: Callable[[object], PairScorer]


REPORT_METRICS: dict[str, ReportMetric] = {}


def register_report_metric(name: str, metrics: tuple[str, ...], needs: str, env: tuple[str, ...], follows: str,
                           locate: Callable[[], object]):
    """Decorator: register ``load`` (location -> :class:`PairScorer`) under ``name``."""
    def wrap(load):
        REPORT_METRICS[name] = ReportMetric(name, metrics, needs, env, follows, locate, load)
        return load
    return wrap


def get_report_metric(name: str) -> ReportMetric:
    """The registered metric ``name``; an unknown name is an error listing the valid ones."""
    if name not in REPORT_METRICS:
        raise ValueError(f"unknown report metric {name!r}; choose from {sorted(REPORT_METRICS)}")
    return REPORT_METRICS[name]


def availability() -> dict[str, object]:
    """``{metric name: location or Skipped}`` for every registered metric (file checks only, no loading)."""
    return {name: m.locate() for name, m in REPORT_METRICS.items()}


@functools.lru_cache(maxsize=8)
def _scorer(name: str, location: str, env: tuple[tuple[str, str], ...]) -> PairScorer:
    return get_report_metric(name).load(location)


def scorer(name: str) -> PairScorer:
    """The loaded scorer of metric ``name`` (cached per location and the values of its variables);
    a :class:`Skipped` metric is a FileNotFoundError giving the reason."""
    metric = get_report_metric(name)
    loc = metric.locate()
    if isinstance(loc, Skipped):
        raise FileNotFoundError(f"report metric {name!r} cannot run: {loc.reason}")
    location = str(loc) if not isinstance(loc, tuple) else json.dumps([str(x) for x in loc])
    return _scorer(name, location, tuple((v, _env(v)) for v in metric.env))


# --- scoring a ranking --------------------------------------------------------------------------

def _report_texts(reports) -> list[str]:
    return ["" if (r is None or (isinstance(r, float) and np.isnan(r))) else str(r) for r in reports]


class _Encoded:
    """Encoded distinct reports of one scorer, with a memo of pair scores."""

    def __init__(self, sc: PairScorer, texts: list[str]):
        self.sc, self.texts = sc, texts
        self.value = sc.encode(texts)
        self.memo: dict[tuple[int, int], tuple[float, ...]] = {}

    def pairs(self, ref: np.ndarray, hyp: np.ndarray) -> dict[str, np.ndarray]:
        keys = list(zip(ref.tolist(), hyp.tolist()))
        todo = sorted({k for k in keys if k not in self.memo})
        if todo:
            r, h = np.array([k[0] for k in todo]), np.array([k[1] for k in todo])
            got = self.sc.pairs(self.value, r, h)
            for i, key in enumerate(todo):
                self.memo[key] = tuple(float(got[m][i]) for m in self.sc.metrics)
        vals = np.array([self.memo[k] for k in keys], np.float64).reshape(len(keys), len(self.sc.metrics))
        return {m: vals[:, j] for j, m in enumerate(self.sc.metrics)}


#: per loaded scorer, the last report set it encoded (a notebook scores one split with several models and
#: both directions: each report is encoded once per scorer, each pair scored once)
_ENCODED: dict[int, _Encoded] = {}


def _encoded(sc: PairScorer, texts: list[str]) -> _Encoded:
    enc = _ENCODED.get(id(sc))
    if enc is None or enc.sc is not sc or enc.texts != texts:
        enc = _ENCODED[id(sc)] = _Encoded(sc, texts)
    return enc


def ranking_scores(name: str, queries, gallery, reports, ks, chunk_size: int = 4096
                   ) -> tuple[dict[tuple[str, int], np.ndarray], dict[tuple[str, int], np.ndarray]]:
    """Per-query ``(values, chance)`` of metric ``name`` at each k: row i of ``queries`` and of
    ``gallery`` are study i, whose report is ``reports[i]`` (the reference of query i and the hypothesis
    when study i is retrieved); values ``{(column, k): [n]}``, chance the same keys (NaN where not computed).
    """
    from cxrlib import retrieval

    q, g = retrieval.as_tensor(queries, "queries"), retrieval.as_tensor(gallery, "gallery")
    retrieval.check_normalised(q, "queries")
    retrieval.check_normalised(g, "gallery")
    texts = _report_texts(reports)
    if not (len(q) == len(g) == len(texts)):
        raise ValueError(f"report metrics need one report per study: {len(q)} queries, {len(g)} gallery items, "
                         f"{len(texts)} reports")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ks[-1] > len(g):
        raise ValueError(f"every k must be between 1 and the gallery size ({len(g)}), got {ks}")
    codes, uniq = pd.factorize(pd.Series(texts, dtype=object))
    sc = scorer(name)
    enc = _encoded(sc, list(uniq))
    kmax = ks[-1]
    step = retrieval.rows_per_block(len(g), chunk_size, retrieval.SCAN_BLOCK_ELEMENTS)
    top = torch.cat([retrieval._block_topk(q[s:s + step] @ g.T, kmax)[1] for s in range(0, len(q), step)])
    top = top.numpy()
    ref = np.repeat(codes, kmax)
    hyp = codes[top.reshape(-1)]
    pair = enc.pairs(ref, hyp)
    values = {}
    for m in sc.metrics:
        per_rank = pair[m].reshape(len(q), kmax)
        for k in ks:
            values[(m, k)] = per_rank[:, :k].mean(1)
    counts = np.bincount(codes, minlength=len(uniq)).astype(np.float64)
    ch = sc.chance(enc.value, np.arange(len(uniq)), counts)
    chance = {(m, k): (ch[m][codes] if ch is not None else np.full(len(q), np.nan)) for m in sc.metrics for k in ks}
    return values, chance


# --- F1 between label sets (F1-CheXbert) ---------------------------------------------------------

def pair_f1(ref: np.ndarray, hyp: np.ndarray) -> np.ndarray:
    """Row-wise F1 of two boolean [P, L] label matrices (``2|A & B| / (|A| + |B|)``); two empty rows = 1."""
    a, b = np.asarray(ref, bool), np.asarray(hyp, bool)
    inter, total = (a & b).sum(1), a.sum(1) + b.sum(1)
    return np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)


def micro_f1(ref: np.ndarray, hyp: np.ndarray) -> float:
    """The field's F1-CheXbert: micro F1 pooled over every (reference, hypothesis) pair and label of two
    boolean [P, L] matrices (``2 TP / (2 TP + FP + FN)``; 1 when neither has a positive)."""
    a, b = np.asarray(ref, bool), np.asarray(hyp, bool)
    tp, fp, fn = int((a & b).sum()), int((~a & b).sum()), int((a & ~b).sum())
    return 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0


# --- BERTScore -----------------------------------------------------------------------------------

def _bertscore_locate():
    name = _env("BERTSCORE_MODEL")
    if not name:
        return Skipped("BERTSCORE_MODEL is not set: BERTScore needs a transformers model present locally "
                       "(a folder with config.json, the tokenizer and the weights, or a hub id in the Hugging "
                       "Face cache), e.g. BERTSCORE_MODEL=distilroberta-base")
    return hf_local(name, ("config.json", "<weights>"), f"BERTScore (BERTSCORE_MODEL={name})")


def bertscore_layer(model_name: str) -> int:
    """``BERTSCORE_LAYER`` if set, else the ``bert_score`` package's layer for the model's name."""
    value = _env("BERTSCORE_LAYER")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"BERTSCORE_LAYER must be a positive integer, got {value!r}")
        return int(value)
    try:
        from bert_score.utils import model2layers
    except ImportError:
        model2layers = {}
    key = model_name.rstrip("/").split("/")[-1] if Path(model_name).expanduser().exists() else model_name
    if key in model2layers:
        return int(model2layers[key])
    raise ValueError(f"BERTScore: no default layer for model {model_name!r} (the bert_score package "
                     f"{'knows no such name' if model2layers else 'is not installed'}): set BERTSCORE_LAYER")


class BertScorer(PairScorer):
    """BERTScore F1 with idf off, as the ``bert_score`` package computes it (``greedy_cos_idf``):
    the hidden states after encoder layer ``layer`` (``hidden_states[layer]``), L2-normalised per token;
    each hypothesis token takes its best cosine over the reference's tokens (``[CLS]``/``[SEP]``
    included) and the mean over the hypothesis tokens other than ``[CLS]``/``[SEP]`` is the precision;
    recall the other way round; F1 = 2PR/(P+R), 0 where undefined."""

    metrics = ("bertscore",)

    def __init__(self, folder: str | Path, layer: int, batch_size: int = 32, device: str = "cpu"):
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        folder = Path(folder)
        try:
            cfg = AutoConfig.from_pretrained(folder)
            prefix = {"add_prefix_space": True} if cfg.model_type in ("roberta", "gpt2", "bart", "longformer") else {}
            self.tokenizer = AutoTokenizer.from_pretrained(folder, **prefix)
            self.model = AutoModel.from_pretrained(folder).eval().to(device)
        except Exception as err:  # transformers and safetensors raise many types for a broken folder
            weights = next((folder / f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).exists()),
                           folder)
            raise InvalidWeights(f"BERTScore: {weights} is not a loadable transformers model "
                                 f"({type(err).__name__}: {err})") from err
        n_layers = getattr(cfg, "num_hidden_layers", None)
        if n_layers is not None and not 1 <= layer <= n_layers:
            raise ValueError(f"BERTScore layer {layer} outside 1..{n_layers} of {folder}")
        self.layer, self.batch_size, self.device = layer, batch_size, device
        limits = [v for v in (getattr(self.tokenizer, "model_max_length", None),
                              getattr(cfg, "max_position_embeddings", None)) if v is not None and v < 1e6]
        self.max_length = int(min(limits)) if limits else 512
        self.special = {i for i in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id) if i is not None}

    def encode(self, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: normalised token embeddings [T, D] and token weights [T] (0 for [CLS]/[SEP])."""
        ids = [self.tokenizer(t.strip(), add_special_tokens=True, truncation=True,
                              max_length=self.max_length)["input_ids"] for t in texts]
        out: list = [None] * len(ids)
        pad = self.tokenizer.pad_token_id or 0
        order = np.argsort([-len(x) for x in ids], kind="stable")
        with torch.inference_mode():
            for s in range(0, len(order), self.batch_size):
                rows = order[s:s + self.batch_size]
                width = max(len(ids[i]) for i in rows)
                x = torch.full((len(rows), width), pad, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for j, i in enumerate(rows):
                    x[j, :len(ids[i])] = torch.tensor(ids[i])
                    mask[j, :len(ids[i])] = 1
                hidden = self.model(x.to(self.device), attention_mask=mask.to(self.device),
                                    output_hidden_states=True).hidden_states[self.layer].float().cpu()
                for j, i in enumerate(rows):
                    e = hidden[j, :len(ids[i])]
                    w = torch.tensor([0.0 if t in self.special else 1.0 for t in ids[i]], dtype=torch.float64)
                    out[i] = (e / e.norm(dim=-1, keepdim=True), w)
        return out

    def pairs(self, encoded, ref: np.ndarray, hyp: np.ndarray) -> dict[str, np.ndarray]:
        f = np.zeros(len(ref))
        for n, (r, h) in enumerate(zip(ref, hyp)):
            (er, wr), (eh, wh) = encoded[r], encoded[h]
            sim = (eh @ er.T).double()
            p = (sim.max(1).values * wh).sum() / wh.sum() if wh.sum() > 0 else torch.tensor(float("nan"))
            rc = (sim.max(0).values * wr).sum() / wr.sum() if wr.sum() > 0 else torch.tensor(float("nan"))
            val = float(2 * p * rc / (p + rc))
            f[n] = 0.0 if np.isnan(val) else val
        return {"bertscore": f}


@register_report_metric("bertscore", ("bertscore",),
                        "BERTSCORE_MODEL (a transformers folder or a hub id in the Hugging Face cache), "
                        "BERTSCORE_LAYER (default: bert_score's table)", ("BERTSCORE_MODEL", "BERTSCORE_LAYER"),
                        "BERTScore (Zhang et al., ICLR 2020; the bert_score package's greedy_cos_idf, idf off)",
                        _bertscore_locate)
def _load_bertscore(location) -> PairScorer:
    return BertScorer(location, bertscore_layer(_env("BERTSCORE_MODEL")))


# --- F1-CheXbert ---------------------------------------------------------------------------------

class CheXbertLabeler(torch.nn.Module):
    """CheXbert (Smit et al., EMNLP 2020): BERT, dropout, 14 linear heads on the [CLS] state; 13 heads of
    4 classes (blank, positive, negative, uncertain) and ``No Finding``'s of 2 (blank, positive).

    Attribute names follow ``stanfordmlgroup/CheXbert`` ``src/models/bert_labeler.py`` (``bert``,
    ``dropout``, ``linear_heads``), so its ``chexbert.pth`` loads key for key (:func:`load_chexbert`);
    the code here is this package's own.
    """

    def __init__(self, config, p: float = 0.1):
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(config)
        self.dropout = torch.nn.Dropout(p)
        h = config.hidden_size
        self.linear_heads = torch.nn.ModuleList([torch.nn.Linear(h, 4) for _ in range(13)] + [torch.nn.Linear(h, 2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        cls = self.dropout(self.bert(input_ids, attention_mask=attention_mask)[0][:, 0])
        return [head(cls) for head in self.linear_heads]


#: checkpoint keys written by older transformers that current BertModel keeps as non-persistent buffers
_IGNORED_KEYS = ("bert.embeddings.position_ids",)


def load_chexbert(path: str | Path, config) -> CheXbertLabeler:
    """A :class:`CheXbertLabeler` with ``config`` (bert-base-uncased's) and the weights of ``path``.

    ``path`` is CheXbert's checkpoint: a dict whose ``model_state_dict`` has the labeler's keys prefixed
    ``module.`` (it was saved from ``nn.DataParallel``; unprefixed keys are accepted too). A file torch
    cannot read, a missing ``model_state_dict``, a missing or unexpected key or a wrong shape is an
    :class:`InvalidWeights` error naming the file and the key.
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a file that is not a checkpoint
        raise InvalidWeights(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InvalidWeights(f"{path}: no 'model_state_dict' in the checkpoint (has {keys}); expected "
                             f"CheXbert's chexbert.pth")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt["model_state_dict"].items()}
    state = {k: v for k, v in state.items() if k not in _IGNORED_KEYS}
    model = CheXbertLabeler(config)
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing:
        raise InvalidWeights(f"{path}: key 'module.{missing[0]}' missing from model_state_dict "
                             f"({len(missing)} missing in all)")
    if unexpected:
        raise InvalidWeights(f"{path}: unexpected key 'module.{unexpected[0]}' in model_state_dict "
                             f"({len(unexpected)} in all); not a CheXbert labeler of this config")
    for k, v in want.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InvalidWeights(f"{path}: key 'module.{k}' has shape {tuple(state[k].shape)}, the labeler "
                                 f"expects {tuple(v.shape)}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def chexbert_clean(text: str) -> str:
    """CheXbert's report cleaning (src/bert_tokenizer.py): newlines to spaces, whitespace collapsed, stripped."""
    return " ".join(str(text).split())


class CheXbertScorer(PairScorer):
    """F1-CheXbert between two reports: both labelled by CheXbert, positive = class 1."""

    metrics = ("chexbert_f1", "chexbert_f1_5")

    def __init__(self, checkpoint: str | Path, bert_folder: str | Path, batch_size: int = 16, device: str = "cpu"):
        from transformers import BertConfig, BertTokenizer

        try:
            config = BertConfig.from_pretrained(bert_folder)
            self.tokenizer = BertTokenizer.from_pretrained(bert_folder)
        except (OSError, ValueError) as err:
            raise InvalidWeights(f"F1-CheXbert: {bert_folder} holds no usable BERT config/tokenizer ({err})") from err
        self.model = load_chexbert(checkpoint, config).to(device)
        self.batch_size, self.device = batch_size, device
        self.max_tokens = min(CHEXBERT_MAX_TOKENS, config.max_position_embeddings)

    def token_ids(self, text: str) -> list[int]:
        """Token ids as CheXbert's ``tokenize``: [CLS] ... [SEP], cut at 512 with [SEP] kept last."""
        tok = self.tokenizer
        pieces = tok.tokenize(chexbert_clean(text))
        if not pieces:
            return [tok.cls_token_id, tok.sep_token_id]
        ids = [tok.cls_token_id, *tok.convert_tokens_to_ids(pieces), tok.sep_token_id]
        if len(ids) > self.max_tokens:
            ids = ids[:self.max_tokens - 1] + [tok.sep_token_id]
        return ids

    def label(self, texts: Sequence[str]) -> np.ndarray:
        """[N, 14] CheXbert class codes (0 blank, 1 positive, 2 negative, 3 uncertain) in
        :data:`CHEXBERT_CONDITIONS` order."""
        ids = [self.token_ids(t) for t in texts]
        out = np.zeros((len(ids), len(CHEXBERT_CONDITIONS)), np.int64)
        pad = self.tokenizer.pad_token_id or 0
        with torch.inference_mode():
            for s in range(0, len(ids), self.batch_size):
                chunk = ids[s:s + self.batch_size]
                width = max(len(x) for x in chunk)
                x = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros_like(x)
                for j, row in enumerate(chunk):
                    x[j, :len(row)] = torch.tensor(row)
                    mask[j, :len(row)] = 1
                logits = self.model(x.to(self.device), mask.to(self.device))
                out[s:s + len(chunk)] = torch.stack([lg.argmax(1) for lg in logits], 1).cpu().numpy()
        return out

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.label(texts) == CHEXBERT_POSITIVE

    @staticmethod
    def _columns(positive: np.ndarray) -> dict[str, np.ndarray]:
        five = [CHEXBERT_CONDITIONS.index(c) for c in CHEXBERT_FIVE]
        return {"chexbert_f1": positive, "chexbert_f1_5": positive[:, five]}

    def pairs(self, encoded, ref: np.ndarray, hyp: np.ndarray) -> dict[str, np.ndarray]:
        return {m: pair_f1(v[ref], v[hyp]) for m, v in self._columns(encoded).items()}

    def chance(self, encoded, ref: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        from cxrlib import graded

        out = {}
        for m, v in self._columns(encoded).items():  # same convention as graded: two empty sets = 1
            out[m] = np.concatenate([graded.f1_gains(v[ref[s:s + 1024]], v).numpy() @ counts / counts.sum()
                                     for s in range(0, len(ref), 1024)])
        return out


def _chexbert_locate():
    path = _env("CHEXBERT_PATH")
    if not path:
        return Skipped("CHEXBERT_PATH is not set: F1-CheXbert needs CheXbert's checkpoint chexbert.pth "
                       "(stanfordmlgroup/CheXbert) as a local file")
    p = Path(path).expanduser()
    if p.is_dir():
        raise InvalidWeights(f"F1-CheXbert: CHEXBERT_PATH={path} is a folder; expected the checkpoint file "
                             f"chexbert.pth")
    if not p.is_file():
        return Skipped(f"F1-CheXbert: CHEXBERT_PATH={path}: file {p} not found")
    bert = _env("CHEXBERT_BERT") or "bert-base-uncased"
    folder = hf_local(bert, ("config.json", "vocab.txt"), f"F1-CheXbert tokenizer (CHEXBERT_BERT={bert})")
    return folder if isinstance(folder, Skipped) else (p.resolve(), folder)


@register_report_metric("chexbert_f1", CheXbertScorer.metrics,
                        "CHEXBERT_PATH (chexbert.pth) and CHEXBERT_BERT (bert-base-uncased tokenizer and "
                        "config: a folder or the Hugging Face cache)", ("CHEXBERT_PATH", "CHEXBERT_BERT"),
                        "F1-CheXbert (Smit et al. 2020 labeler; 14-label and Miura et al. 2021's 5-label F1)",
                        _chexbert_locate)
def _load_chexbert(location) -> PairScorer:
    ckpt, folder = json.loads(location) if isinstance(location, str) else location
    return CheXbertScorer(ckpt, folder)


# --- RadGraph F1 ---------------------------------------------------------------------------------

def _radgraph_locate():
    if importlib.util.find_spec("radgraph") is None:
        return Skipped("RadGraph F1: the radgraph package is not installed (pip install 'cxrlib[report-metrics]')")
    model_type = _env("RADGRAPH_MODEL") or RADGRAPH_DEFAULT_MODEL
    root = _env("RADGRAPH_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        from importlib.metadata import version

        from appdirs import user_cache_dir
        base = Path(user_cache_dir("radgraph")) / version("radgraph")
    folder = base / model_type
    for f in ("config.json", "weights.th", "vocabulary/non_padded_namespaces.txt"):
        if not (folder / f).exists():
            return Skipped(f"RadGraph F1: {folder / f} not found (the extracted {model_type} model of "
                           f"StanfordAIMI/RRG_scorers: set RADGRAPH_DIR to the folder holding {model_type}/)")
    try:
        cfg = json.loads((folder / "config.json").read_text())
        bert = cfg["model"]["embedder"]["token_embedders"]["bert"]["model_name"]
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidWeights(f"RadGraph F1: {folder / 'config.json'} is not a RadGraph model config ({err!r})") from err
    found = hf_local(bert, ("config.json", "<weights>"), f"RadGraph F1's transformer {bert}")
    return found if isinstance(found, Skipped) else folder.resolve()


class RadGraphScorer(PairScorer):
    """RadGraph F1 between two reports: each report annotated once by the ``radgraph`` package's model,
    the pair scored by its ``compute_reward`` at :data:`RADGRAPH_REWARD`; an empty report scores 0
    (as ``F1RadGraph``)."""

    metrics = ("radgraph_f1",)

    def __init__(self, folder: str | Path):
        from radgraph import RadGraph

        folder = Path(folder)
        weights = folder / "weights.th"
        with open(weights, "rb") as fh:
            magic = fh.read(2)
        if not (magic == b"PK" or magic[:1] == b"\x80"):  # torch.save writes a zip archive or a pickle
            raise InvalidWeights(f"RadGraph F1: {weights} is not a torch checkpoint (neither a zip archive nor "
                                 f"a pickle)")
        try:
            self.model = RadGraph(model_type=folder.name, model_cache_dir=str(folder.parent), cuda=-1)
        except Exception as err:  # allennlp-style loading raises many types
            raise InvalidWeights(f"RadGraph F1: the model folder {folder} does not load "
                                 f"({type(err).__name__}: {err})") from err

    def encode(self, texts: list[str]) -> list:
        keep = [t for t in texts if t.strip()]
        got = self.model(keep) if keep else {}
        it = iter(range(len(keep)))
        return [got[str(next(it))] if t.strip() else None for t in texts]

    def pairs(self, encoded, ref: np.ndarray, hyp: np.ndarray) -> dict[str, np.ndarray]:
        from radgraph.rewards import compute_reward

        out = [0.0 if encoded[h] is None or encoded[r] is None
               else float(compute_reward(encoded[h], encoded[r], RADGRAPH_REWARD)) for r, h in zip(ref, hyp)]
        return {"radgraph_f1": np.asarray(out)}


@register_report_metric("radgraph_f1", RadGraphScorer.metrics,
                        "the radgraph package; RADGRAPH_DIR/<RADGRAPH_MODEL>/ (config.json, weights.th, "
                        "vocabulary/; default the package's cache, model 'radgraph') and its transformer in "
                        "the Hugging Face cache", ("RADGRAPH_DIR", "RADGRAPH_MODEL"),
                        "RadGraph F1 (Jain et al. 2021 RadGraph; the radgraph package's F1RadGraph, "
                        f"reward level {RADGRAPH_REWARD!r})",
                        _radgraph_locate)
def _load_radgraph(location) -> PairScorer:
    return RadGraphScorer(location)


def describe() -> pd.DataFrame:
    """One row per metric: its columns, what it needs, what it follows, and whether it runs here (or why not)."""
    rows = []
    for name, m in REPORT_METRICS.items():
        loc = m.locate()
        rows.append({"metric": name, "columns": ", ".join(m.metrics), "needs": m.needs,
                     "variables": ", ".join(m.env), "follows": m.follows,
                     "status": loc.reason if isinstance(loc, Skipped) else "runs"})
    return pd.DataFrame(rows)
