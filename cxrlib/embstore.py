"""The on-disk embedding format shared by every node: ids + L2-normalised float32 + metadata.

One ``.npz`` per modality (``image.npz`` keyed by ``image_id``, ``text.npz`` keyed by
``study_id``), written atomically so a crash never leaves a file that looks complete.
``meta`` records at least the backbone name and fingerprint, the modality and the dimension;
consumers check it (an embedding from another backbone than the one named is an error).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrlib.io import atomic_path


@dataclass
class Embeddings:
    """``emb[i]`` is the embedding of ``ids[i]``; ``meta`` describes where it came from."""

    ids: np.ndarray
    emb: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.ids = np.asarray(self.ids).astype(str)
        self.emb = np.asarray(self.emb, dtype=np.float32)
        if self.emb.ndim != 2 or len(self.ids) != len(self.emb):
            raise ValueError(f"ids ({len(self.ids)}) and emb {self.emb.shape} do not match")
        if len(np.unique(self.ids)) != len(self.ids):
            raise ValueError("duplicate ids in embeddings")
        if not np.isfinite(self.emb).all():
            bad = self.ids[~np.isfinite(self.emb).all(1)][:5].tolist()
            raise ValueError(f"non-finite embeddings for ids {bad}")

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def take(self, ids) -> np.ndarray:
        """Rows for ``ids`` in that order; a missing id is an error that names it."""
        index = {k: i for i, k in enumerate(self.ids)}
        ids = [str(i) for i in ids]
        missing = [i for i in ids if i not in index]
        if missing:
            raise KeyError(f"{len(missing)} ids have no embedding "
                           f"({self.meta.get('backbone', '?')}/{self.meta.get('modality', '?')}), e.g. {missing[:5]}")
        return self.emb[[index[i] for i in ids]]


def save_embeddings(path: str | os.PathLike, emb: Embeddings) -> Path:
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=emb.ids.astype(str), emb=emb.emb.astype(np.float32),
                     meta=np.array(json.dumps(emb.meta, default=str)))
    return Path(path)


def load_embeddings(path: str | os.PathLike, expect_backbone: str | None = None) -> Embeddings:
    """Read an embedding file; ``expect_backbone`` guards against a cache of another backbone."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no embedding file at {path}; build the embedding sets first: "
                                f"`make embed PROFILE=<profile>` (`make demo` runs the whole offline profile)")
    with np.load(path, allow_pickle=False) as z:
        emb = Embeddings(ids=z["ids"], emb=z["emb"], meta=json.loads(str(z["meta"])))
    if expect_backbone is not None and emb.meta.get("backbone") != expect_backbone:
        raise ValueError(f"{path} holds embeddings of backbone {emb.meta.get('backbone')!r}, "
                         f"not {expect_backbone!r}")
    return emb
