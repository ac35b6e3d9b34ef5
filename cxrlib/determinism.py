"""Results that do not depend on which CPU ran them: fp32, a fixed thread count, a pinned instruction set.

Why each piece (a profile with ``deterministic: true``, the offline demo: the DAG's make text exports
:func:`env` to every node (:func:`cxrlib.dag.make_text`), and the profile pins ``precision: fp32`` for extraction):

- **precision fp32**: ``precision: auto`` picks bf16 autocast on CPUs with native bf16 (AVX512-BF16,
  AMX) and fp32 elsewhere, so the same commit gave different tables on two machines.
- **threads** (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``; torch reads them at start): a parallel
  reduction splits its sum by thread, so 1 and 2 threads round differently and ten epochs of training
  amplify that. A fixed count makes a 16-core machine compute what the 2-core reference computed.
- **instruction set**: ATen's vectorised kernels (``ATEN_CPU_CAPABILITY``) and oneDNN's convolutions
  (``ONEDNN_MAX_CPU_ISA``) pick AVX2 or AVX-512 code by CPU; pinned to AVX2, every x86-64 CPU from 2013
  on runs the same code. numpy dispatches its ufuncs (``exp``, ``cos``: the synthetic radiographs) by CPU
  too; ``NPY_DISABLE_CPU_FEATURES`` (:data:`NUMPY_ABOVE_AVX2`) caps it at its AVX2 level, and
  ``OPENBLAS_CORETYPE`` pins numpy's and scipy's OpenBLAS to its Haswell (AVX2) kernels.
- **BLAS**: MKL (torch's ``Linear`` layers: the text towers, the projector) honours its AVX2 code
  branch (``MKL_CBWR=AVX2``) only on Intel CPUs; on an AMD CPU it falls back to its ``AUTO`` branch,
  which dispatches by CPU (measured: the branch in effect read back from MKL, :func:`mkl_branch`).
  ``COMPATIBLE`` (SSE2) is the branch MKL runs alike on every x86-64 CPU, Intel or not; it costs speed
  in MKL's matrix products (the text towers), nothing in oneDNN's convolutions (the image towers).
- ``torch.use_deterministic_algorithms(True)`` (:func:`apply`, :func:`use_deterministic_algorithms`), which on CUDA also needs
  ``CUBLAS_WORKSPACE_CONFIG`` (set before the first cuBLAS call). Every node of a deterministic
  profile switches it on: the notebooks through :func:`cxrlib.interactive.setup`
  (:func:`enable_for_profile`, applied when the node first imports torch, so a node without torch
  pays no torch import), the extractor through ``CXR_DETERMINISTIC`` in :func:`env`. An op without a
  deterministic implementation then raises, naming itself, unless :data:`WARN_ONLY`.

Where it cannot hold: oneDNN may still choose its blocking from the cache sizes (not pinnable; turning
oneDNN off makes a training step several times slower), and an ARM or non-AVX2 CPU runs other kernels;
a GPU run is not bit-identical to a CPU run. ``make check-demo`` therefore compares the headline numbers against the reference run's confidence intervals, and
:func:`describe` records what a run used in its manifest.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

#: thread count of the reference runs (the 2-core machine the README numbers come from)
THREADS = 2
#: numpy's dispatch targets above AVX2, in the names of numpy 2.4 (X86_V4, ...) and of numpy 1.x / 2.0-2.3
#: (AVX512F, ...); numpy ignores a name it does not know (one word: the names are comma-separated)
NUMPY_ABOVE_AVX2 = ("X86_V4,AVX512_ICL,AVX512_SPR,AVX512F,AVX512CD,AVX512_KNL,AVX512_KNM,AVX512_SKX,"
                    "AVX512_CLX,AVX512_CNL")
#: environment read by torch / MKL / oneDNN / numpy when they start (so it must be set before they are imported)
PINNED_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "NPY_DISABLE_CPU_FEATURES": NUMPY_ABOVE_AVX2,
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
#: OpenBLAS's AVX2 kernels, pinned only where the CPU has AVX2 and FMA (forced on another CPU they would
#: stop the process on an illegal instruction; such a CPU runs other kernels anyway)
OPENBLAS_ENV = {"OPENBLAS_CORETYPE": "Haswell"}
#: MKL's code branches by the number ``mkl_cbwr_get`` returns (mkl_cbwr.h)
MKL_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}


#: not numerics but speed: OpenMP threads that sleep instead of spinning at each barrier. Same results;
#: on a CPU shared with other work, spinning threads fight for the cores (benchmarks/cpu_pins.py).
SPEED_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
#: tells a process started by make for a deterministic profile (``python -m cxrlib.embed``) to :func:`apply`
FLAG_ENV = "CXR_DETERMINISTIC"
#: False: an op without a deterministic implementation is an error (the offline DAG on CPU runs none)
WARN_ONLY = False


def env(threads: int = THREADS) -> dict[str, str]:
    """Every variable a deterministic run sets before torch starts."""
    blas = OPENBLAS_ENV if cpu_has("avx2", "fma") else {}
    return {**PINNED_ENV, **blas, **SPEED_ENV, FLAG_ENV: "1", "OMP_NUM_THREADS": str(threads),
            "MKL_NUM_THREADS": str(threads)}


def cpu_has(*flags: str) -> bool:
    """Whether this (Linux, x86) CPU lists every one of ``flags`` in /proc/cpuinfo; False where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return all(flag in have for flag in flags)
    except OSError:
        pass
    return False


def _numpy_umath() -> ModuleType:
    """numpy's ufunc extension, which holds its CPU dispatch tables (``numpy._core`` in 2.x, ``numpy.core`` in 1.x)."""
    return importlib.import_module("numpy._core._multiarray_umath" if importlib.util.find_spec("numpy._core")
                                   else "numpy.core._multiarray_umath")


def numpy_dispatch_targets() -> list[str]:
    """Every CPU target this numpy has code for beyond its baseline (whether or not this CPU has it)."""
    return sorted(_numpy_umath().__cpu_dispatch__)


def numpy_simd() -> list[str]:
    """numpy's dispatch targets this process may use (those the CPU has, less NPY_DISABLE_CPU_FEATURES)."""
    features = _numpy_umath().__cpu_features__
    return [f for f in numpy_dispatch_targets() if features.get(f)]


def mkl_branch() -> str | None:
    """The MKL code branch in effect in this process (``MKL_CBWR`` as MKL applied it: ``AUTO`` where it
    declined the asked branch), read from torch's statically linked MKL; None where it cannot be read."""
    if "torch" not in sys.modules:
        return None
    import ctypes

    torch = sys.modules["torch"]
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get  # mkl_cbwr_get's implementation (the public name is not exported)
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    branch = get(1)  # 1: MKL_CBWR_BRANCH
    return MKL_BRANCHES.get(branch, str(branch))


def apply(threads: int | None = THREADS, seed: int | None = None) -> None:
    """In-process part: thread count, deterministic algorithms, no cuDNN autotuning, optional seed.

    Call it before any torch work; the ISA pins only take effect through :func:`env` at start-up.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", PINNED_ENV["CUBLAS_WORKSPACE_CONFIG"])  # read by cuBLAS
    import torch

    if threads is not None:
        torch.set_num_threads(int(threads))
    use_deterministic_algorithms(torch, warn_only=WARN_ONLY)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    if seed is not None:
        import random

        import numpy as np

        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


def use_deterministic_algorithms(torch: ModuleType, warn_only: bool = WARN_ONLY) -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=...)`` without importing ``torch._inductor``.

    torch's function does two things: it sets inductor's ``deterministic`` config, importing
    ``torch._inductor.config`` (and with it inductor and dynamo: 2-3 s per node on the 2-core reference
    machine, in a node that never compiles), and sets the ATen flag. Here the flag is set at once and the
    config when inductor is first imported (at once if it is). ``tests/test_determinism.py`` checks that
    torch's function still does exactly these two things."""
    setter = getattr(torch._C, "_set_deterministic_algorithms", None)
    if setter is None:  # another torch: its public function, whatever it costs
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        return
    setter(True, warn_only=warn_only)
    when_imported("torch._inductor.config", lambda cfg: setattr(cfg, "deterministic", True))


def when_imported(module: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` now if ``module`` is imported, else right after its first import."""
    if module in sys.modules:
        callback(sys.modules[module])
        return
    sys.meta_path.insert(0, _AfterImport(module, callback))


class _AfterImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: lets the normal finders load ``name``, then runs ``callback`` on the module."""

    def __init__(self, name: str, callback: Callable[[ModuleType], None]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, callback = spec.loader.exec_module, self.callback

        def exec_module(mod: ModuleType) -> None:
            run(mod)
            callback(mod)

        spec.loader.exec_module = exec_module
        return spec


def profile_threads(profile: str) -> int | None:
    """The thread count of a deterministic profile, None for any other."""
    from cxrlib import config

    cfg = config.load_profile(profile)
    return int(cfg.get("threads", THREADS)) if cfg.get("deterministic") else None


def enable_for_profile(profile: str) -> bool:
    """:func:`apply` (with the profile's threads) for a profile with ``deterministic: true``, when this process
    imports torch (now, if it has); False, and nothing changed, for any other profile."""
    threads = profile_threads(profile)
    if threads is None:
        return False
    when_imported("torch", lambda _torch: apply(threads))
    return True


def enable_from_env() -> bool:
    """:func:`apply` when make started this process for a deterministic profile (``CXR_DETERMINISTIC=1``)."""
    if os.environ.get(FLAG_ENV, "") in ("", "0"):
        return False
    apply(int(os.environ.get("OMP_NUM_THREADS") or THREADS))
    return True


def describe() -> dict[str, Any]:
    """What this process computes with (for the run manifest): ISA, threads, the pinned variables."""
    out: dict[str, Any] = {k: os.environ.get(k) for k in env()}
    if "torch" in sys.modules:
        import torch

        out.update(torch_threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                   deterministic_algorithms=torch.are_deterministic_algorithms_enabled(),
                   mkl_branch=mkl_branch(), torch=torch.__version__)
    if "numpy" in sys.modules:
        out["numpy_simd"] = numpy_simd()
    out["pinned"] = all(os.environ.get(k) == v for k, v in env(int(os.environ.get("OMP_NUM_THREADS") or THREADS)).items())
    return out


def profile_env(profile: str) -> dict[str, str]:
    """:func:`env` when the profile sets ``deterministic: true`` (the offline demo), else nothing."""
    threads = profile_threads(profile)
    return env(threads) if threads is not None else {}

