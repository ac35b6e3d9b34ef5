"""The GPU path: device checks, loader sizing, out-of-memory back-off, GPU JPEG decoding.

What runs where, and why:

- ``require_device(device)`` turns ``cuda`` on a machine without CUDA, or a torch/torchvision pair
  built for different CUDA versions, into one clear line before any work (:class:`DeviceError`).
- ``loader_settings`` sizes DataLoader workers and prefetch from the cores this process may use
  and pins memory for CUDA (so host-to-device copies can be ``non_blocking``).
- ``configure_backends`` turns on ``cudnn.benchmark`` for convolutional towers on CUDA (fixed
  input sizes: the autotuned kernels are reused for every batch); ``maybe_compile`` wraps a
  forward in ``torch.compile`` when asked.
- ``BatchLimiter`` / ``run_in_batches`` / ``find_batch_size``: the largest batch that fits, found by
  probing, and a back-off that splits a batch that runs out of memory into ordered halves, so no
  item is lost or duplicated and later batches use the smaller size.
- ``DevicePreprocess`` / ``EncodedImages`` / ``decode_on_device``: JPEGs are read as bytes in the
  workers and decoded in batches by ``torchvision.io.decode_jpeg(..., device=...)``, then resized,
  centre-cropped and normalised on the device exactly as the backbone's own transform does on
  CPU; PNG, 16-bit and any file that is not a complete JPEG are decoded by the CPU reader in the
  workers (16-bit windowed to 8 bits) and resized on the device with the JPEGs. A JPEG that fails
  to decode on the device is retried alone, then through the CPU reader; only a file that fails
  there too is a counted skip naming it. The same code runs with ``device="cpu"``,
  which is how the tests check it against the CPU path.

Precision (``auto`` -> bf16 / fp16 / fp32) and device resolution are :mod:`cxrlib.runtime`'s; this
module holds what only the GPU path needs.
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
#: DataLoader batches each worker prepares ahead (workers x this x batch items are held in memory:
#: at 15 workers and 256 full-resolution JPEGs of ~1.5 MB a batch, about 11 GB)
PREFETCH_FACTOR = 2
#: upper bound on DataLoader workers (beyond it workers only add memory)
MAX_WORKERS = 16
#: same-size decoded images resized in one call (a full-resolution float copy is ~30 MB each)
RESIZE_GROUP = 32


class DeviceError(RuntimeError):
    """A device that cannot be used as asked; the message is one line saying what to do."""


# ---- device checks -----------------------------------------------------------------------------

def _cuda_version_str(v: Any) -> str | None:
    """torch gives ``"12.4"``, torchvision an int ``12040`` (or a string): both -> ``"12.4"``."""
    if v in (None, "", 0):
        return None
    if isinstance(v, int) or (isinstance(v, str) and v.isdigit()):
        v = int(v)
        return f"{v // 1000}.{(v % 1000) // 10}"
    return str(v)


def cuda_build_problem() -> str | None:
    """Why this torch/torchvision pair cannot run CUDA together, or None when it can (or torch is CPU-only)."""
    torch_cuda = _cuda_version_str(torch.version.cuda)
    if torch_cuda is None:
        return None
    try:
        import torchvision
    except (ImportError, RuntimeError) as exc:  # torchvision refuses to import on a CUDA major mismatch
        return f"torchvision does not load beside torch {torch.__version__} (CUDA {torch_cuda}): {str(exc).splitlines()[0]}"
    tv_cuda = _cuda_version_str(getattr(torchvision.version, "cuda", None))
    if tv_cuda is None:
        return (f"torch {torch.__version__} is built for CUDA {torch_cuda} but torchvision "
                f"{torchvision.__version__} is a CPU build; install the torchvision wheel built for CUDA {torch_cuda}")
    if tv_cuda.split(".")[0] != torch_cuda.split(".")[0]:
        return (f"torch {torch.__version__} is built for CUDA {torch_cuda} but torchvision "
                f"{torchvision.__version__} for CUDA {tv_cuda}; install a matching pair")
    return None


def require_device(device: str) -> str:
    """``device`` when it can be used (``auto`` -> ``cuda`` if available), else :class:`DeviceError`.

    Checked once at the start of a node or command, so a wrong ``DEVICE`` fails in one line
    before any data is read.
    """
    device = str(device or "auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cpu":
        return device
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"DEVICE={device} but this torch or machine has no MPS (Apple GPU); use DEVICE=cpu")
        return device
    if kind != "cuda":
        raise DeviceError(f"DEVICE={device}: unknown device; use auto, cpu, cuda, cuda:<index> or mps")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else f"torch is built for CUDA {torch.version.cuda} but no GPU or driver is visible")
        raise DeviceError(f"DEVICE={device} but CUDA is not available ({why}); use DEVICE=cpu or DEVICE=auto")
    problem = cuda_build_problem()
    if problem:
        raise DeviceError(f"DEVICE={device}: {problem}")
    index = device.split(":", 1)[1] if ":" in device else None
    if index is not None and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise DeviceError(f"DEVICE={device}: this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    return device


def is_cuda(device: str | torch.device) -> bool:
    return str(device).startswith("cuda")


# ---- loaders and backends ----------------------------------------------------------------------

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_num_workers(cores: int | None = None) -> int:
    """One worker per core but one (the main process feeds the device), at most :data:`MAX_WORKERS`."""
    cores = available_cores() if cores is None else cores
    return max(0, min(cores - 1, MAX_WORKERS))


def loader_settings(device: str, num_workers: int | str | None = None, cores: int | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments: workers (``None``/``"auto"`` -> from the cores), prefetch, pinning."""
    if num_workers in (None, "auto"):
        num_workers = default_num_workers(cores)
    num_workers = int(num_workers)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 or 'auto', got {num_workers}")
    return {"num_workers": num_workers, "prefetch_factor": PREFETCH_FACTOR if num_workers else None,
            "pin_memory": is_cuda(device), "persistent_workers": False}


def has_convolutions(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in model.modules())


def configure_backends(model: torch.nn.Module, device: str) -> dict[str, bool]:
    """``cudnn.benchmark`` on for a convolutional model on CUDA (fixed input size); returns what was set."""
    bench = is_cuda(device) and has_convolutions(model)
    if bench:
        torch.backends.cudnn.benchmark = True
    return {"cudnn_benchmark": bench}


def maybe_compile(fn: Callable, enabled: bool, **kwargs: Any) -> Callable:
    """``torch.compile(fn, **kwargs)`` when ``enabled`` (compiles lazily, at the first call), else ``fn``."""
    return torch.compile(fn, **kwargs) if enabled else fn


def fits_on_device(nbytes: int, device: str | torch.device, fraction: float = 0.5) -> bool:
    """True when ``nbytes`` is at most ``fraction`` of the device's free memory (always on CPU)."""
    if not is_cuda(device):
        return True
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return nbytes <= fraction * free


def grad_scaler(precision: str, device: str | torch.device) -> torch.amp.GradScaler:
    """A loss scaler for fp16 training (fp16 gradients underflow without one); a pass-through otherwise.

    Use ``scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()``: with bf16 or fp32
    that is exactly ``loss.backward(); optimizer.step()``; with fp16 a step whose gradients overflowed
    is skipped and the scale lowered.
    """
    return torch.amp.GradScaler(str(device).split(":")[0], enabled=precision == "fp16")


# ---- out-of-memory back-off ----------------------------------------------------------------------

def is_oom(exc: BaseException) -> bool:
    """An allocation failure on the device (torch's OOM error, or cuBLAS/cuDNN saying the same)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def _release_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class BatchLimiter:
    """The largest batch known to fit; halved on each out-of-memory error. ``backoffs`` counts them."""

    size: int
    backoffs: int = 0

    def shrink(self, failed: int) -> None:
        if failed <= 1:
            raise DeviceError("out of device memory with a batch of 1; free the GPU or use a smaller model")
        self.size = max(1, min(self.size, failed) // 2)
        self.backoffs += 1
        print(f"out of device memory with a batch of {failed}: continuing with batches of {self.size}",
              file=sys.stderr)
        _release_memory()


def _take(x: Any, lo: int, hi: int) -> Any:
    return x[lo:hi]


def _join(parts: list[Any]) -> Any:
    if len(parts) == 1:
        return parts[0]
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [y for p in parts for y in p]


def run_in_batches(fn: Callable[[Any], Any], x: Any, limiter: BatchLimiter) -> Any:
    """``fn`` over ``x`` (tensor, array or list) in slices of at most ``limiter.size``, outputs joined in order.

    A slice that runs out of memory shrinks the limiter and is redone in smaller slices, so every
    item is computed exactly once in the result and later calls start at the size that fitted.
    """
    n = len(x)
    parts, lo = [], 0
    while lo < n:
        hi = min(n, lo + limiter.size)
        try:
            parts.append(fn(x if (lo, hi) == (0, n) else _take(x, lo, hi)))
        except Exception as exc:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_oom(exc):
                raise
            del exc
            limiter.shrink(hi - lo)
            continue
        lo = hi
    return _join(parts) if parts else x[:0]


def find_batch_size(fn: Callable[[int], Any], start: int = 32, limit: int = 1024) -> int:
    """The largest power-of-two multiple of ``start`` (<= ``limit``) for which ``fn(size)`` runs without OOM.

    ``fn(size)`` runs a forward on a made-up batch of ``size`` items (real items are never used, so
    none can be lost). Doubles from ``start``; on the first OOM returns the last size that fitted,
    or halves below ``start`` until one fits.
    """
    if start < 1 or limit < 1:
        raise ValueError(f"start and limit must be >= 1, got {start}, {limit}")
    size, best = min(start, limit), 0
    while True:
        try:
            fn(size)
        except Exception as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            del exc
            _release_memory()
            if best:
                return best
            if size == 1:
                raise DeviceError("out of device memory with a batch of 1; free the GPU or use a smaller model") from None
            size //= 2
            continue
        best = size
        if size >= limit or best < start:
            return best
        size = min(limit, size * 2)


# ---- decoding on the device ----------------------------------------------------------------------

def is_complete_jpeg(data: bytes) -> bool:
    """A JPEG start marker and an end marker (allowing trailing zero padding): safe for the batched decoder."""
    return data[:3] == JPEG_SOI and data.rstrip(b"\x00")[-2:] == JPEG_EOI


@dataclass(frozen=True)
class DevicePreprocess:
    """The backbone's eval transform on uint8 tensors: shortest-side (or squash) resize, centre crop, normalise.

    Matches open_clip's ``image_transform_v2`` for ``resize_mode`` ``shortest`` and ``squash`` with
    bicubic or bilinear interpolation (antialiased, rounded to 8 bits as PIL does); ``from_backbone``
    returns None for other transforms, which then stay on the CPU.
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    @classmethod
    def from_backbone(cls, backbone: Any) -> DevicePreprocess | None:
        cfg = dict(getattr(backbone.model.visual, "preprocess_cfg", None) or {})
        size = cfg.get("size")
        if size is None or cfg.get("interpolation", "bicubic") not in ("bicubic", "bilinear") or \
                cfg.get("resize_mode", "shortest") not in ("shortest", "squash") or cfg.get("mode", "RGB") != "RGB":
            return None
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        return cls(size=size, mean=tuple(cfg.get("mean", (0.0,) * 3)), std=tuple(cfg.get("std", (1.0,) * 3)),
                   interpolation=cfg.get("interpolation", "bicubic"), resize_mode=cfg.get("resize_mode", "shortest"))

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        """torchvision ``Resize(int)``'s output size: the short side to the crop size, the long side truncated."""
        if self.resize_mode == "squash":
            return self.size
        short = min(self.size)
        if h <= w:
            return short, int(short * w / h)
        return int(short * h / w), short

    def levels(self, imgs: torch.Tensor) -> torch.Tensor:
        """[n, C, H, W] uint8 (C = 1 or 3, one size) -> [n, 1, *size] float grey levels 0..255, resized and cropped."""
        x = imgs.float()
        if x.shape[1] == 3:  # colour JPEG -> the grey the CPU reader makes (ITU-R 601-2 luma)
            w = _constant((0.299, 0.587, 0.114), x.device)
            x = (x * w).sum(1, keepdim=True).round_()
        oh, ow = self.resized_shape(x.shape[-2], x.shape[-1])
        if (oh, ow) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(oh, ow), mode=self.interpolation, align_corners=False, antialias=True)
            x = x.clamp_(0, 255).round_()
        ch, cw = self.size
        top, left = int(round((oh - ch) / 2.0)), int(round((ow - cw) / 2.0))
        return x[..., top:top + ch, left:left + cw]

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """[n, 1, H, W] grey levels -> [n, 3, H, W] normalised with the backbone's mean and std."""
        return (x.expand(-1, 3, -1, -1) / 255.0 - _constant(tuple(self.mean), x.device)) / _constant(tuple(self.std), x.device)

    def batch(self, imgs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decoded images of any sizes -> [n, 3, *size] in input order; same-size images are resized together
        (in groups of :data:`RESIZE_GROUP`, bounding the full-resolution float copies held at once)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, img in enumerate(imgs):
            by_shape.setdefault(tuple(img.shape), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(imgs)
        for members in by_shape.values():
            for s in range(0, len(members), RESIZE_GROUP):
                group = members[s:s + RESIZE_GROUP]
                for i, y in zip(group, self.levels(torch.stack([imgs[i] for i in group]))):
                    out[i] = y
        # stacked in order (no index tensor to copy to the device, so no host sync)
        return self.normalise(torch.stack(out))

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """[C, H, W] uint8 (C = 1 or 3) -> [3, *size] float32 normalised, on ``img``'s device."""
        return self.normalise(self.levels(img[None]))[0]


@functools.lru_cache(maxsize=32)
def _constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """A [1, C, 1, 1] constant on ``device``, made once (a fresh host-to-device copy per batch would sync)."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class EncodedImages(Dataset):
    """Item ``i``: ``(i, bytes tensor, "jpeg")`` for a complete JPEG; else the file read on CPU by
    ``load_image`` (8-bit grey; 16-bit windowed): ``(i, uint8 [1, H, W], "pixels")`` to be resized on the
    device, or with ``resize_on_device=False`` ``(i, preprocessed tensor, None)``; ``(i, None, reason)``
    when it cannot be read."""

    def __init__(self, paths: Sequence[str], preprocess: Callable, load_image: Callable,
                 resize_on_device: bool = True):
        self.paths, self.preprocess, self.load_image = list(paths), preprocess, load_image
        self.resize_on_device = resize_on_device

    def __len__(self) -> int:
        return len(self.paths)

    def cpu_item(self, i: int) -> tuple[torch.Tensor | None, str | None]:
        from cxrlib.images import ImageReadError

        try:
            return self.preprocess(self.load_image(self.paths[i])), None
        except ImageReadError as exc:
            return None, exc.reason
        except Exception as exc:  # noqa: BLE001 - a transform failing on one odd file is that file's skip
            return None, f"preprocess failed: {type(exc).__name__}: {exc}"

    def __getitem__(self, i: int):
        try:
            with open(self.paths[i], "rb") as fh:
                data = fh.read()
        except OSError:
            data = b""
        if is_complete_jpeg(data):
            return i, torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpeg"
        if self.resize_on_device:  # decode only: the resize and normalisation run on the device
            from cxrlib.images import ImageReadError

            try:
                img = self.load_image(self.paths[i], mode="L")
            except ImageReadError as exc:
                return i, None, exc.reason
            except Exception as exc:  # noqa: BLE001 - one odd file is that file's skip
                return i, None, f"read failed: {type(exc).__name__}: {exc}"
            return i, torch.from_numpy(np.array(img, dtype=np.uint8))[None], "pixels"
        x, reason = self.cpu_item(i)
        return (i, None, reason) if x is None else (i, x, None)


class EncodedBatch:
    """A batch as JPEG bytes (for the device decoder), decoded grey pixels (to resize on the device) and
    CPU-preprocessed tensors; each with its positions in the batch."""

    def __init__(self, jpeg_pos: list[int], jpegs: list[torch.Tensor], ready_pos: list[int],
                 ready: torch.Tensor | None, n: int, pixel_pos: Sequence[int] = (),
                 pixels: Sequence[torch.Tensor] = ()):
        self.jpeg_pos, self.jpegs, self.ready_pos, self.ready, self.n = jpeg_pos, jpegs, ready_pos, ready, n
        self.pixel_pos, self.pixels = list(pixel_pos), list(pixels)

    def pin_memory(self) -> EncodedBatch:
        """Called by the DataLoader's pinning thread: pixels and ready tensors then travel non-blocking."""
        if self.ready is not None:
            self.ready = self.ready.pin_memory()
        self.pixels = [p.pin_memory() for p in self.pixels]
        return self

    def __len__(self) -> int:
        return self.n


def collate_encoded(batch):
    """-> (indices of the items, :class:`EncodedBatch` (None if empty), [(index, reason)] of CPU failures)."""
    bad = [(i, r) for i, x, r in batch if x is None]
    good = [(i, x, r) for i, x, r in batch if x is not None]
    idx = torch.tensor([i for i, _, _ in good], dtype=torch.long)
    if not good:
        return idx, None, bad
    pos = {kind: [p for p, (_, _, r) in enumerate(good) if r == kind] for kind in ("jpeg", "pixels", None)}
    ready = torch.stack([good[p][1] for p in pos[None]]) if pos[None] else None
    return idx, EncodedBatch(pos["jpeg"], [good[p][1] for p in pos["jpeg"]], pos[None], ready, len(good),
                             pos["pixels"], [good[p][1] for p in pos["pixels"]]), bad


def _decode(data: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    out = decode_jpeg(data, mode=ImageReadMode.GRAY, device=device)
    return out if isinstance(out, list) else [out]


def decode_on_device(batch: EncodedBatch, indices: Sequence[int], pre: DevicePreprocess, device: str,
                     cpu_fallback: Callable[[int], tuple[torch.Tensor | None, str | None]]
                     ) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Decode and preprocess a batch on ``device``: ``(images [n_ok, 3, H, W], kept positions, [(index, reason)])``.

    ``indices[p]`` is the dataset index of position ``p``; ``cpu_fallback(index)`` is the CPU path
    for a JPEG the device decoder rejects. Kept positions are in batch order. ``decoded`` falls back
    one file at a time when the batched call fails (a failed batched call has returned nothing).
    """
    images: dict[int, torch.Tensor] = {}
    failed: list[tuple[int, str]] = []
    decoded: list[torch.Tensor | None] = []
    if batch.jpegs:
        if is_cuda(device):
            # nvjpeg writes on its own stream into memory from this stream's cache, which may still be read
            # by the previous batch's queued kernels: let them finish first (the one host sync per batch)
            torch.cuda.current_stream(torch.device(device)).synchronize()
        try:
            decoded = _decode(batch.jpegs, device)
        except RuntimeError:  # one bad file fails the whole batched call: redo one by one
            for data in batch.jpegs:
                try:
                    decoded.append(_decode([data], device)[0])
                except RuntimeError:
                    decoded.append(None)
    ok = [(pos, img) for pos, img in zip(batch.jpeg_pos, decoded) if img is not None]
    ok += [(pos, px.to(device, non_blocking=True)) for pos, px in zip(batch.pixel_pos, batch.pixels)]
    if ok:  # JPEGs decoded here and pixels decoded by the workers: resized together, by size
        images.update(zip([p for p, _ in ok], pre.batch([img for _, img in ok])))
    for pos in (p for p, img in zip(batch.jpeg_pos, decoded) if img is None):
        x, reason = cpu_fallback(int(indices[pos]))
        if x is None:
            failed.append((int(indices[pos]), reason))
        else:
            images[pos] = x.to(device)
    if batch.ready is not None:
        ready = batch.ready.to(device, non_blocking=True)
        for j, pos in enumerate(batch.ready_pos):
            images[pos] = ready[j]
    kept = sorted(images)
    if not kept:
        return torch.empty((0, 3, *pre.size), device=device), [], failed
    return torch.stack([images[p] for p in kept]), kept, failed


def decoder_problem(device: str) -> str | None:
    """None when ``decode_jpeg`` works on ``device`` (a tiny JPEG round trip), else why not."""
    try:
        from torchvision.io import encode_jpeg
    except (ImportError, RuntimeError) as exc:
        return f"torchvision.io unavailable: {exc}"
    try:
        data = encode_jpeg(torch.full((1, 16, 16), 128, dtype=torch.uint8))
        img = _decode([data], device)[0]
    except Exception as exc:  # noqa: BLE001 - any failure means: decode on CPU
        return f"decode_jpeg on {device} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if tuple(img.shape) != (1, 16, 16) or not math.isclose(float(img.float().mean()), 128, abs_tol=3):
        return f"decode_jpeg on {device} returned a wrong image"
    return None
