"""Shared fixtures: CPU only, offline hubs, an isolated work folder, the ../shared data, and one smoke DAG
per test session (``smoke_dag``) that the notebook tests assert on instead of re-executing each notebook."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CXR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """Redirect every generated folder (data/, build/, results/, figures/) into a temp folder."""
    monkeypatch.setenv("CXR_WORKDIR", str(tmp_path))
    for var in ("CXR_DATA_DIR", "CXR_RAW_DIR", "CXR_EMBEDDINGS_DIR", "CXR_BUILD_DIR",
                "CXR_RESULTS_DIR", "CXR_FIGURES_DIR", "OPENI_ROOT", "MIMIC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def _shared(sub: str) -> Path:
    path = SHARED / sub
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (it sits beside the checkout on dev and CI machines)")
    return path


@pytest.fixture(scope="session")
def openi_shared() -> Path:
    """../shared/data/openi: the real Open-I Kaggle tables (no images)."""
    return _shared("openi")


@pytest.fixture(scope="session")
def covid_shared() -> Path:
    """../shared/data/covid-cxr-sample: 130 real radiographs for image-reading tests."""
    return _shared("covid-cxr-sample")


def run_make(args: list[str], workdir: Path, check: bool = True) -> subprocess.CompletedProcess:
    """``make <args>`` in the checkout with every generated folder under ``workdir``."""
    env = {**os.environ, "CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    for var in ("CXR_DATA_DIR", "CXR_BUILD_DIR", "CXR_RESULTS_DIR", "CXR_FIGURES_DIR", "OPENI_ROOT", "MIMIC_ROOT"):
        env.pop(var, None)
    out = subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"make {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


@pytest.fixture(scope="session")
def smoke_dag(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``make smoke`` once per session (every notebook node in one DAG); tests read what each node wrote.

    Under pytest-xdist (``make test``) the workers share one build: the first to ask runs it under a file lock
    in the session's common temp folder, the others wait for it and read make's recorded output.
    Tests must not change its folder (one that runs make with other settings there works on a copy)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    work, record = shared / "smoke-dag", shared / "smoke-dag.json"
    with open(shared / "smoke-dag.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            shutil.rmtree(work, ignore_errors=True)  # an earlier worker's build that failed
            work.mkdir()
            out = run_make(["smoke"], work)
            record.write_text(json.dumps({"args": out.args, "stdout": out.stdout, "stderr": out.stderr}))
        done = json.loads(record.read_text())
    return work, subprocess.CompletedProcess(done["args"], 0, done["stdout"], done["stderr"])


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch thread: two threads on a loaded 2-core machine are many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
