"""Where and how a training or extraction process runs: one definition each, shared by train, adapt and embed.

- :func:`world` / :func:`barrier`: this process's rank and the world size under ``torchrun`` ((0, 1) alone);
  :func:`process_group`: a torchrun entry point's group (backend from the device, barrier, teardown).
- :func:`resolve_device`: ``auto`` -> the process's GPU (``cuda:<LOCAL_RANK>`` under torchrun) or ``cpu``;
  any device is checked by :func:`cxrlib.accel.require_device` (one clear line for a bad ``DEVICE``).
- :func:`resolve_precision` / :func:`autocast`: ``auto`` -> bf16 on GPUs that support it (else fp16) and
  on CPUs that compute bf16 in hardware (else fp32); the autocast context of a precision.
- :func:`warmup_cosine` / :func:`warmup_cosine_scheduler`: linear warm-up then cosine decay to 0.
- :func:`param_groups`: AdamW groups with weight decay on weight matrices only (open_clip's rule).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---- processes ---------------------------------------------------------------------------------

def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world()[1] > 1:
        torch.distributed.barrier()


@contextlib.contextmanager
def process_group(device: str | None = "auto", timeout_hours: float = 12.0):
    """A ``torchrun`` rank's process group for the ``with`` block; yields this rank's device.

    With ``WORLD_SIZE > 1``: NCCL on ``cuda:<LOCAL_RANK>`` when ``device`` resolves to a GPU, else gloo.
    On a normal exit every rank waits at a barrier before the group is torn down (a rank that destroyed
    it while rank 0 still wrote its outputs aborted under gloo); the group is destroyed in every case.
    Alone: yields ``device`` unchanged and does nothing else.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield device
        return
    from datetime import timedelta

    use_cuda = resolve_device(device).startswith("cuda")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo",
                                         timeout=timedelta(hours=timeout_hours))
    try:
        yield device
        barrier()
    finally:
        torch.distributed.destroy_process_group()


# ---- device and precision ----------------------------------------------------------------------

def resolve_device(device: str | None = "auto", check: bool = True) -> str:
    """``auto`` (or empty) -> ``cuda:<LOCAL_RANK>`` under torchrun, ``cuda`` alone, when CUDA is available,
    else ``cpu``; with ``check`` the result must be usable here (:func:`cxrlib.accel.require_device`)."""
    device = str(device or "auto")
    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        local = os.environ.get("LOCAL_RANK")
        device = f"cuda:{int(local)}" if local is not None else "cuda"
    if check:
        from cxrlib.accel import require_device

        return require_device(device)
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AMX or AVX512-BF16), from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 / fp16 / fp32 for ``device`` (see the module docstring); others pass through."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision != "auto":
        if precision == "fp16" and not device.startswith("cuda"):
            raise ValueError("fp16 autocast is for GPUs; on CPU use bf16 or fp32")
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(device: str, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=str(device).split(":")[0], dtype=dtype)


# ---- optimisation ------------------------------------------------------------------------------

def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier of step ``s``: linear ``(s + 1) / warmup_steps`` while ``s < warmup_steps`` (the first
    step already learns), then ``(1 + cos(pi * p)) / 2`` with ``p`` = the fraction of the remaining steps done."""
    if warmup_steps < 0 or total_steps < 0:
        raise ValueError(f"steps must be >= 0, got warmup {warmup_steps}, total {total_steps}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int,
                            total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`warmup_cosine` as a torch scheduler (call ``step()`` after each optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total_steps))


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """open_clip's rule: biases, norms, embeddings, the logit scale and every tensor below 2-D are not decayed."""
    return p.ndim < 2 or any(s in name for s in ("bn", "ln", "bias", "embedding", "logit_scale"))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups ``[decayed, not decayed]`` of ``module``'s trainable parameters (see :func:`no_weight_decay`)."""
    decay, rest = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (rest if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
