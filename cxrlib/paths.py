"""Every path the package writes or reads, anchored on the repository root.

Each function reads its environment variable at call time, so a test or a smoke run can redirect
all outputs by setting ``CXR_WORKDIR`` (one folder for data/, build/, results/, figures/) or the
individual overrides below. Users who keep data sets elsewhere set ``OPENI_ROOT`` / ``MIMIC_ROOT``.

=======================  ===============================  ==========================================
function                 environment variable             default
=======================  ===============================  ==========================================
``repo_root()``          --                               the folder holding ``pyproject.toml``
``workdir()``            ``CXR_WORKDIR``                  ``repo_root()``
``data_dir()``           ``CXR_DATA_DIR``                 ``workdir()/data``
``raw_dir()``            ``CXR_RAW_DIR``                  ``data_dir()/raw`` (downloads, synthetic images)
``processed_dir()``      --                               ``data_dir()/processed`` (study tables)
``embeddings_dir()``     ``CXR_EMBEDDINGS_DIR``           ``data_dir()/embeddings`` (embedding cache)
``text_store_dir()``     --                               ``embeddings_dir()/.shared/text`` (text features by key)
``models_dir()``         --                               ``data_dir()/models`` (adapted backbones)
``build_dir()``          ``CXR_BUILD_DIR``                ``workdir()/build`` (executed notebooks)
``results_dir(p)``       ``CXR_RESULTS_DIR``              ``workdir()/results/<profile>``
``figures_dir(p)``       ``CXR_FIGURES_DIR``              ``workdir()/figures/<profile>``
``configs_dir()``        --                               ``repo_root()/configs``
``source_cache_dir()``   ``CXR_SOURCE_CACHE_DIR``         ``repo_root()/.cache`` (derived from the sources)
``openi_root()``         ``OPENI_ROOT``                   ``raw_dir()/openi``
``mimic_root()``         ``MIMIC_ROOT``                   None (credentialed data: never guessed)
=======================  ===============================  ==========================================

Outside make, :mod:`cxrlib.interactive` calls :func:`set_interactive`: a notebook opened by hand then
writes its results and figures under ``.../interactive/<run>/`` and never over make's outputs.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def _env_path(var: str) -> Path | None:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser().resolve() if value else None


def repo_root() -> Path:
    """The repository (source checkout) root."""
    return _REPO_ROOT


def workdir() -> Path:
    """Root of every generated folder; ``CXR_WORKDIR`` redirects all of them at once."""
    return _env_path("CXR_WORKDIR") or _REPO_ROOT


def data_dir() -> Path:
    return _env_path("CXR_DATA_DIR") or workdir() / "data"


def raw_dir() -> Path:
    return _env_path("CXR_RAW_DIR") or data_dir() / "raw"


def processed_dir() -> Path:
    return _interactive_data("processed") or data_dir() / "processed"


def embeddings_dir() -> Path:
    return _env_path("CXR_EMBEDDINGS_DIR") or data_dir() / "embeddings"


def text_store_dir() -> Path:
    """``embeddings_dir()/.shared/text``: text embeddings by content key, shared by every embedding set whose
    backbones have the same text tower (:mod:`cxrlib.embed`); removed with the embeddings."""
    return embeddings_dir() / ".shared" / "text"


def models_dir() -> Path:
    return _interactive_data("models") or data_dir() / "models"


def build_dir() -> Path:
    return _env_path("CXR_BUILD_DIR") or workdir() / "build"


def published_results_dir(profile: str = "paper") -> Path:
    """make's ``results/<profile>`` (what :func:`results_dir` is outside an interactive run)."""
    base = _env_path("CXR_RESULTS_DIR")
    return base / profile if base else workdir() / "results" / profile


def results_dir(profile: str = "paper") -> Path:
    """Where a node writes its results: make's folder, or ``<it>/interactive/<run>`` in an interactive run."""
    base = published_results_dir(profile)
    return base / "interactive" / _INTERACTIVE["run"] if _INTERACTIVE.get("run") else base


def figures_dir(profile: str = "paper") -> Path:
    base = _env_path("CXR_FIGURES_DIR")
    base = base / profile if base else workdir() / "figures" / profile
    return base / "interactive" / _INTERACTIVE["run"] if _INTERACTIVE.get("run") else base


# ---- interactive runs (set by cxrlib.interactive when a notebook runs outside make) ------------
_INTERACTIVE: dict[str, str | None] = {}


def set_interactive(run: str | None, data: str | None = None) -> None:
    """Send results/figures (and, for ``data`` = ``processed`` | ``models``, that data folder) of an
    interactive notebook run under ``.../interactive/<run>/``; ``run=None`` restores make's folders."""
    _INTERACTIVE.clear()
    if run:
        _INTERACTIVE.update(run=run, data=data)


def interactive_run() -> str | None:
    return _INTERACTIVE.get("run")


def readable(path: Path) -> Path:
    """An input path: in an interactive run, its own output when it wrote one, else make's (the same
    path outside ``.../interactive/<run>/``)."""
    path = Path(path)
    parts = path.parts
    if path.exists() or "interactive" not in parts:
        return path
    i = len(parts) - 1 - parts[::-1].index("interactive")
    return Path(*parts[:i], *parts[i + 2:])


def _interactive_data(kind: str) -> Path | None:
    if not _INTERACTIVE.get("run") or _INTERACTIVE.get("data") != kind:
        return None
    return data_dir() / "interactive" / _INTERACTIVE["run"] / kind


def source_cache_dir() -> Path:
    """What is derived from the repository's own sources alone (the DAG's import scan), shared by every workdir."""
    return _env_path("CXR_SOURCE_CACHE_DIR") or repo_root() / ".cache"


def configs_dir() -> Path:
    return _REPO_ROOT / "configs"


def openi_root() -> Path:
    return _env_path("OPENI_ROOT") or raw_dir() / "openi"


def mimic_root() -> Path | None:
    return _env_path("MIMIC_ROOT")


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout (development and CI only; never committed)."""
    return _env_path("CXR_SHARED_DATA") or _REPO_ROOT.parent / "shared" / "data"


def study_table_path(dataset: str) -> Path:
    """``data/processed/<dataset>.parquet``: the study table every later node reads."""
    return processed_dir() / f"{dataset}.parquet"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (a folder) if needed and return it."""
    path.mkdir(parents=True, exist_ok=True)
    return path
