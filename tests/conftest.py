"""Shared fixtures: CPU only, offline hubs, an isolated work folder, the ../shared data, and one smoke DAG
per test session (``smoke_dag``) that the notebook tests assert on instead of re-executing each notebook."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import smokebuild

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


def _smoke_shared(config: pytest.Config) -> Path:
    """The session's temp folder that every xdist worker shares (the one process's own without xdist)."""
    base = config._tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def smoke_dag(pytestconfig) -> tuple[Path, subprocess.CompletedProcess]:
    """``make smoke`` once per session (every notebook node in one DAG); tests read what each node wrote.

    Under pytest-xdist (``make test``) the workers share one build (tests/smokebuild.py): it starts in the
    background once the collection holds a test that needs it (``pytest_collection_finish``), and this
    fixture waits for it under its file lock (or runs it, where nothing started it) and reads make's record.
    Tests must not change its folder (one that runs make with other settings there works on a copy)."""
    shared = _smoke_shared(pytestconfig)
    done = smokebuild.build(shared)
    if done["returncode"] != 0:
        raise AssertionError(f"make smoke failed ({done['returncode']}):\n{done['stdout'][-4000:]}\n"
                             f"{done['stderr'][-4000:]}")
    return smokebuild.paths(shared)[0], subprocess.CompletedProcess(done["args"], 0, done["stdout"], done["stderr"])


_SMOKE_BUILD: list[subprocess.Popen] = []


def _needs_smoke_build(item: pytest.Item) -> bool:
    """``item`` asks for ``smoke_dag`` and no skip / true boolean skipif mark skips it before its fixtures."""
    if "smoke_dag" not in getattr(item, "fixturenames", ()):
        return False
    return not any(m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True)
                   for m in item.iter_markers())


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the smoke build in the background when a collected test needs it (one worker starts it)."""
    if session.config.option.collectonly or not any(map(_needs_smoke_build, session.items)):
        return
    shared = _smoke_shared(session.config)
    try:
        os.close(os.open(shared / "smoke-dag.started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    _SMOKE_BUILD.append(subprocess.Popen([sys.executable, str(Path(__file__).with_name("smokebuild.py")),
                                          str(shared)], cwd=REPO))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The worker that started the smoke build outlives it (another worker may still wait for it)."""
    for proc in _SMOKE_BUILD:
        if exitstatus == pytest.ExitCode.INTERRUPTED:
            proc.terminate()
        proc.wait()


# Files that start first under ``make test`` (pytest-xdist ``--dist loadfile`` hands out whole files in
# collection order): the longest first, so that no long file is left for the end while the other worker idles.
# test_evalset_dag waits for the background smoke build and then runs make on a copy of it; the files that
# only read the build come once it is likely done. The others follow in their usual order.
FIRST_FILES = (
    "test_evalset_dag.py", "test_gpu_path.py", "test_dag.py", "test_lora_dist.py", "test_embedding_viz.py",
    "test_embed_distributed.py", "test_adapt.py", "test_synthetic.py", "test_determinism.py", "test_losses.py",
    "test_pipeline.py", "test_browser.py", "test_search.py", "test_retrieval_notebook.py",
    "test_text_encoder_notebook.py", "test_backbones.py", "test_train.py", "test_evalset_notebook.py",
    "test_datasets_synth.py", "test_interactive.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False  # xdist would order the files by their number of tests


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(FIRST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST_FILES)))  # stable: file order kept


@pytest.fixture
def one_torch_thread():
    """Tiny models on one torch thread: two threads on a loaded 2-core machine are many times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
