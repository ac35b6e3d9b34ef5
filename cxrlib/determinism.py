"""Results that do not depend on which CPU ran them: fp32, a fixed thread count, a pinned instruction set.

Why each piece (a profile with ``deterministic: true``, the offline demo: make exports :func:`env` to
every node of its DAG, and the profile pins ``precision: fp32`` for extraction):

- **precision fp32**: ``precision: auto`` picks bf16 autocast on CPUs with native bf16 (AVX512-BF16,
  AMX) and fp32 elsewhere, so the same commit gave different tables on two machines.
- **threads** (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``; torch reads them at start): a parallel
  reduction splits its sum by thread, so 1 and 2 threads round differently and ten epochs of training
  amplify that. A fixed count makes a 16-core machine compute what the 2-core reference computed.
- **instruction set**: ATen's vectorised kernels (``ATEN_CPU_CAPABILITY``), oneDNN's convolutions
  (``ONEDNN_MAX_CPU_ISA``) and MKL's BLAS (``MKL_CBWR``, conditional numerical reproducibility) each
  pick AVX2 or AVX-512 code by CPU; pinned to AVX2, every x86-64 CPU from 2013 on runs the same code.
- ``torch.use_deterministic_algorithms(True)`` (:func:`apply`), which on CUDA also needs
  ``CUBLAS_WORKSPACE_CONFIG``.

Where it cannot hold: oneDNN may still choose its blocking from the cache sizes, and an ARM or
non-AVX2 CPU runs other kernels; a GPU run is not bit-identical to a CPU run. ``make check-demo``
therefore compares the headline numbers against the reference run's confidence intervals, and
:func:`describe` records what a run used in its manifest.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: thread count of the reference runs (the 2-core machine the README numbers come from)
THREADS = 2
#: environment read by torch / MKL / oneDNN when they start (so it must be set before ``import torch``)
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}


#: not numerics but speed: OpenMP threads that sleep instead of spinning at each barrier. Same results;
#: on a CPU shared with other work, spinning threads fight for the cores (benchmarks/cpu_pins.py).
SPEED_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def env(threads: int = THREADS) -> dict[str, str]:
    """Every variable a deterministic run sets before torch starts."""
    return {**PINNED_ENV, **SPEED_ENV, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def apply(threads: int | None = THREADS, seed: int | None = None) -> None:
    """In-process part: thread count, deterministic algorithms, no cuDNN autotuning, optional seed.

    Call it before any torch work; the ISA pins only take effect through :func:`env` at start-up.
    """
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def describe() -> dict[str, Any]:
    """What this process computes with (for the run manifest): ISA, threads, the pinned variables."""
    out: dict[str, Any] = {k: os.environ.get(k) for k in env()}
    if "torch" in sys.modules:
        import torch

        out.update(torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                   torch=torch.__version__)
    out["pinned"] = all(os.environ.get(k) == v for k, v in env(int(os.environ.get("OMP_NUM_THREADS") or THREADS)).items())
    return out


def profile_env(profile: str) -> dict[str, str]:
    """:func:`env` when the profile sets ``deterministic: true`` (the offline demo), else nothing."""
    from cxrlib import config

    cfg = config.load_profile(profile)
    return env(int(cfg.get("threads", THREADS))) if cfg.get("deterministic") else {}


def main(argv: list[str] | None = None) -> int:
    """``python -m cxrlib.determinism env --profile P`` prints ``NAME=value`` pairs on one line (make exports them)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m cxrlib.determinism")
    ap.add_argument("what", choices=["env"])
    ap.add_argument("--profile", required=True)
    args = ap.parse_args(argv)
    print(" ".join(f"{k}={v}" for k, v in profile_env(args.profile).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
