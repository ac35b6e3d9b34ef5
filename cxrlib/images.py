"""Reading chest radiographs: 8/16-bit grayscale, palette or RGB files -> an 8-bit PIL image.

Radiographs come as 8-bit PNG (Open-I), 8-bit JPEG (MIMIC-CXR-JPG) or 16-bit PNG (exports of
DICOM). 16-bit data are windowed to the image's own 0.5-99.5 percentile range before the cast to
8 bits, so the contrast of a 12-bit image is not crushed into a few grey levels. Backbones get
the result as RGB (the three channels equal) and apply their own resize/crop/normalise.
A file that cannot be read raises :class:`ImageReadError` naming the file and the reason.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class ImageReadError(OSError):
    """An image that is missing, truncated or not an image; ``path`` and ``reason`` say which."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image {self.path}: {reason}")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    arr = arr.astype(np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return (np.clip((arr - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(np.uint8)


def load_cxr_image(path: str | os.PathLike, mode: str = "RGB", invert: bool = False) -> Image.Image:
    """Open a radiograph as an 8-bit ``mode`` ("RGB" or "L") image, fully decoded.

    ``invert`` flips MONOCHROME1-style images (bright air) to the usual dark-air convention.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a worker
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                gray = Image.fromarray(_to_uint8(np.asarray(im)))
            elif im.mode in ("RGBA", "LA", "P", "PA"):
                gray = im.convert("RGB").convert("L")
            else:
                gray = im.convert("L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(path, f"{type(exc).__name__}: {exc}") from exc
    if invert:
        gray = Image.fromarray(255 - np.asarray(gray))
    return gray if mode == "L" else gray.convert(mode)


def verify_image(path: str | os.PathLike) -> str | None:
    """None when ``path`` decodes as an image, else the reason it does not (for counted skips)."""
    try:
        load_cxr_image(path, mode="L")
    except ImageReadError as exc:
        return exc.reason
    return None
