"""cxrlib.runtime: the one rank/device/precision/schedule/parameter-group definitions train, adapt and embed share."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cxrlib import runtime


def test_warmup_cosine_hand_computed():
    f = runtime.warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # the first step already learns
    assert f(4) == 1.0 and f(9) == pytest.approx(0.5) and f(14) == pytest.approx(0.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert f(20) == pytest.approx(0.0)  # past the end: stays at 0
    assert runtime.warmup_cosine(0, 10)(0) == 1.0 and runtime.warmup_cosine(0, 10)(5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        runtime.warmup_cosine(-1, 10)


def test_scheduler_drives_the_optimiser_by_the_same_factors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = runtime.warmup_cosine_scheduler(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # by hand: 2 * [1/2, 1, cos-phase 0/4, 1/4, 2/4, 3/4, 4/4]
    cos = [0.5 * (1 + math.cos(math.pi * p)) for p in (0, 0.25, 0.5, 0.75, 1.0)]
    assert lrs == pytest.approx([1.0, 2.0] + [2 * c for c in cos])


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(4, 3))
        self.proj = nn.Linear(3, 3)
        self.ln_post = nn.LayerNorm(3)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_param_groups_decay_weight_matrices_only():
    m = _Tower()
    decay, rest = runtime.param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(m.proj.weight)]
    assert {id(p) for p in rest["params"]} == {id(m.positional_embedding), id(m.proj.bias), id(m.ln_post.weight),
                                               id(m.ln_post.bias), id(m.logit_scale)}
    # a projector: exactly its weight matrices decay (the trainer's former rule)
    from cxrlib.projector import build_projector

    proj = build_projector("residual_mlp", 8, 8)
    decay, rest = runtime.param_groups(proj, 0.1)
    assert [id(p) for p in decay["params"]] == [id(p) for p in proj.parameters() if p.ndim >= 2]
    assert [id(p) for p in rest["params"]] == [id(p) for p in proj.parameters() if p.ndim < 2]


def test_world_device_and_precision_without_a_process_group(monkeypatch):
    assert runtime.world() == (0, 1)
    runtime.barrier()  # a no-op alone
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == runtime.resolve_device(None) == "cpu"
    assert runtime.resolve_device("cpu") == "cpu"
    from cxrlib.accel import DeviceError

    with pytest.raises(DeviceError, match="tpu"):
        runtime.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.resolve_device("auto", check=False) == "cuda:1"  # the rank's own GPU under torchrun
    monkeypatch.delenv("LOCAL_RANK")
    assert runtime.resolve_device("auto", check=False) == "cuda"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16"):
        runtime.resolve_precision("fp16", "cpu")
    with runtime.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with runtime.autocast("cpu", "fp32"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_train_adapt_and_embed_use_the_one_definition():
    from cxrlib import adapt, embed, losses, train

    assert train.warmup_cosine is runtime.warmup_cosine and train.param_groups is runtime.param_groups
    assert embed.resolve_precision is runtime.resolve_precision and embed.autocast is runtime.autocast
    assert embed.resolve_device is runtime.resolve_device and embed._dist is runtime.world
    assert losses._world() == runtime.world()
    assert adapt.resolve_device is runtime.resolve_device and adapt.param_groups is runtime.param_groups


def test_process_group_alone_yields_the_device_and_starts_no_group(monkeypatch):
    import torch

    from cxrlib import runtime

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with runtime.process_group("cpu") as device:
        assert device == "cpu" and not torch.distributed.is_initialized()
