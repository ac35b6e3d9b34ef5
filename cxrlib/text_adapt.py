"""Ko et al.'s text-encoder recipe: supervised contrastive training of a text tower on report variants.

Every training report and its clinically equivalent rewrites (:mod:`cxrlib.variants` styles) share one
class (its ``report_group``: identical reports are one class); a batch draws reports, two views of
each (the original or a rewrite), and pytorch-metric-learning's ``SupConLoss`` pulls views of one
class together. Only LoRA adapters (and the pooling's own weights, e.g. the latents) train.

Optionally MNTP first (LLM2Vec's masked next-token prediction; Ko et al. mask 20%): content tokens are
replaced by a mask token (the tokenizer's, else its padding token) and token ``t`` is predicted from
position ``t - 1`` for decoders (``t`` for encoders) through the input embedding matrix (a tied head,
so no new weights are needed).

Under ``torchrun`` (an initialised process group) each rank encodes its contiguous share of every batch
(:func:`cxrlib.lora.shard_rows`; views are drawn for the whole batch first, identically on every rank),
the SupCon loss is computed on the embeddings of all ranks gathered with gradients, and gradients are
averaged over ranks, so the SupCon stage trains as one process on the whole batch would. MNTP masks are
drawn per rank (seed + rank) and each rank's masked-token mean is averaged: the same recipe, not the
same numbers as one process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from cxrlib import lora as lora_mod
from cxrlib import text_towers as tt
from cxrlib import variants


@dataclass
class TextAdaptConfig:
    """Settings of :func:`adapt_text_tower` (Ko et al.: LoRA 16, lr 2e-4, 2 epochs, MNTP mask 0.2)."""

    lora: lora_mod.LoraSettings = field(default_factory=lora_mod.LoraSettings)
    styles: tuple[str, ...] = tuple(variants.STYLES)
    epochs: int = 2
    lr: float = 2e-4
    batch_size: int = 32
    temperature: float = 0.05
    mntp_epochs: int = 0
    mntp_mask_rate: float = 0.2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        unknown = [s for s in self.styles if s not in variants.STYLES]
        if unknown:
            raise ValueError(f"unknown styles {unknown}; choose from {sorted(variants.STYLES)}")
        if not 0.0 < self.mntp_mask_rate < 1.0:
            raise ValueError(f"mntp_mask_rate must be in (0, 1), got {self.mntp_mask_rate}")
        self.styles = tuple(self.styles)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lora"] = self.lora.to_dict()
        d["styles"] = list(self.styles)
        return d


def variant_views(reports: list[variants.Report], styles: tuple[str, ...], seed: int,
                  keys: list[str] | None = None) -> list[list[str]]:
    """Per report: the original text then each distinct rewrite (seeded per report by ``keys[i]``)."""
    from cxrlib.datasets.synthetic import stable_seed

    out = []
    for i, rep in enumerate(reports):
        s = stable_seed(seed, keys[i] if keys else i)
        texts = [rep.text()]
        for style in styles:
            t = variants.rewrite(rep, style, s).text
            if t and t not in texts:
                texts.append(t)
        out.append(texts)
    return out


def _mntp_step(tower: tt.TextTower, tokenizer: tt.TowerTokenizer, texts: list[str], rate: float,
               gen: torch.Generator, device: str) -> torch.Tensor:
    batch = tokenizer(texts).to(device)
    ids, att, pool = batch["input_ids"], batch["attention_mask"], batch["pool_mask"]
    hf = tokenizer.tokenizer
    mask_id = hf.mask_token_id if hf.mask_token_id is not None else tokenizer.pad_id
    content = pool.bool() & att.bool()
    if tower.is_decoder:
        content[:, 0] = False  # token 0 has no previous position to predict it from
    chosen = content & (torch.rand(ids.shape, generator=gen).to(device) < rate)
    if not chosen.any():
        return ids.new_zeros((), dtype=torch.float32)
    h = tower.hidden_states(ids.masked_fill(chosen, mask_id), att)
    if tower.is_decoder:  # predict token t from position t-1
        h, targets, where = h[:, :-1], ids[:, 1:], chosen[:, 1:]
    else:
        targets, where = ids, chosen
    emb = tower.encoder.get_input_embeddings().weight
    logits = h[where] @ emb.T
    return F.cross_entropy(logits.float(), targets[where])


def average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average the gradients of ``params`` over ``world`` ranks in place (what DDP does; a no-op alone)."""
    if world <= 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def adapt_text_tower(spec: tt.TextTowerSpec | str, reports: list[variants.Report], groups: np.ndarray,
                     cfg: TextAdaptConfig, keys: list[str] | None = None, progress: bool = True):
    """LoRA-train a text tower (optional MNTP, then SupCon on variants) -> (tower, tokenizer, info)."""
    from pytorch_metric_learning.losses import SupConLoss

    from cxrlib.losses import gather_with_grad
    from cxrlib.runtime import world as _world

    groups = np.asarray(groups)
    if len(groups) != len(reports):
        raise ValueError(f"{len(reports)} reports but {len(groups)} group ids")
    rank, world = _world()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + rank)
    rng = np.random.default_rng(cfg.seed)
    tower, tokenizer = tt.build_text_tower(spec, "cpu")
    lora_mod.add_lora(tower, cfg.lora)
    tower.to(cfg.device)
    views = variant_views(reports, cfg.styles, cfg.seed, keys)
    n_views = np.array([len(v) for v in views])
    params = [p for p in tower.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    show = progress and rank == 0
    history: list[dict[str, Any]] = []

    lengths = [len(v[0]) for v in views]

    def batches():  # similar report lengths share a batch (less padding)
        return tt.bucketed_batches(lengths, cfg.batch_size, rng)

    for epoch in range(cfg.mntp_epochs):
        tower.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for rows in tqdm(batches(), desc=f"MNTP {epoch + 1}/{cfg.mntp_epochs}", disable=not show, leave=False):
            mine = lora_mod.shard_rows(rows, rank, world)
            if mine is None:
                continue
            loss = _mntp_step(tower, tokenizer, [views[i][0] for i in mine], cfg.mntp_mask_rate, gen, cfg.device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, world)
            opt.step()
            total, n = total + float(loss.detach()) * len(mine), n + len(mine)
        if world > 1:  # the mean over ranks, not rank 0's shard
            packed = torch.tensor([total, float(n)], dtype=torch.float64)
            torch.distributed.all_reduce(packed)
            total, n = float(packed[0]), int(packed[1])
        history.append({"stage": "mntp", "epoch": epoch + 1, "loss": total / max(n, 1),
                        "seconds": round(time.perf_counter() - t0, 2)})

    loss_fn = SupConLoss(temperature=cfg.temperature)
    for epoch in range(cfg.epochs):
        tower.train()
        t0, total, n, skipped = time.perf_counter(), 0.0, 0, 0
        for rows in tqdm(batches(), desc=f"SupCon {epoch + 1}/{cfg.epochs}", disable=not show, leave=False):
            pairs = []  # the whole batch's two views per report, drawn alike on every rank
            for i in rows:
                pick = rng.choice(n_views[i], size=2, replace=n_views[i] < 2)
                pairs.append([views[i][j] for j in pick])
            mine = lora_mod.shard_rows(list(range(len(rows))), rank, world)
            kept = [] if mine is None else range(len(mine) * world)
            labels = [int(groups[rows[j]]) for j in kept for _ in range(2)]
            if len(set(labels)) < 2:
                skipped += 1
                continue
            texts = [t for j in mine for t in pairs[j]]
            emb = F.normalize(tower.encode_text(tokenizer(texts).to(cfg.device)), dim=-1)
            loss = loss_fn(gather_with_grad(emb, world), torch.tensor(labels, device=cfg.device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(params, world)
            opt.step()
            total, n = total + float(loss.detach()) * len(kept), n + len(kept)
        history.append({"stage": "supcon", "epoch": epoch + 1, "loss": total / max(n, 1),
                        "batches_skipped": skipped, "seconds": round(time.perf_counter() - t0, 2)})
    tower.eval()
    info = {"history": history, "n_reports": len(reports), "views_per_report": float(n_views.mean()),
            "reports_without_rewrite": int((n_views < 2).sum()), "truncation": lora_mod.stats_over_ranks(tokenizer),
            "world_size": world,
            "adjustments": dict(tokenizer.adjustments)}
    return tower, tokenizer, info
