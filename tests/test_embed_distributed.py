"""The CLI in real processes: torchrun with 2 CPU ranks (gloo) and a SIGKILLed run that resumes.

Both must reproduce an uninterrupted single-process run exactly. Every run uses one thread
(torchrun sets OMP_NUM_THREADS=1 per rank), so the arithmetic is the same in each process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from cxrlib import embed
from cxrlib.embstore import load_embeddings

pytestmark = pytest.mark.slow

ARGS = ["--backbone", "tiny", "--batch-size", "4", "--chunk-size", "8", "--num-workers", "0",
        "--precision", "fp32", "--device", "cpu", "--no-progress"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"


@pytest.fixture(scope="module")
def table_and_reference(tmp_path_factory):
    """120 studies of 512 px images (one file missing) and the uninterrupted single-process result (this one)."""
    root = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(0)
    base = np.linspace(0, 200, 512)[None, :] + np.linspace(0, 50, 512)[:, None]
    rows = []
    for i in range(120):
        path = root / f"img{i:03d}.png"
        img = (base + rng.normal(0, 8, (512, 512))).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, compress_level=1)
        rows.append({"image_id": f"im{i:03d}", "image_path": str(path), "study_id": f"s{i:03d}",
                     "report": f"Report {i}: {['no acute disease', 'left effusion', 'cardiomegaly'][i % 3]}."})
    rows[50]["image_path"] = str(root / "missing.png")
    pd.DataFrame(rows).to_parquet(root / "table.parquet")
    # the same command line in this process (its interpreter start is the other tests' to pay)
    _in_this_process(["--table", str(root / "table.parquet"), "--out-dir", str(root / "single"), *ARGS])
    return root


def _in_this_process(argv: list[str]) -> None:
    """``python -m cxrlib.embed <argv>`` run here, on one thread as in every rank and subprocess."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert embed.main(argv) == 0
    finally:
        torch.set_num_threads(threads)


def _assert_same(a: Path, b: Path) -> None:
    for m in ("image", "text"):
        x, y = load_embeddings(a / f"{m}.npz"), load_embeddings(b / f"{m}.npz")
        assert x.ids.tolist() == y.ids.tolist(), m
        assert np.array_equal(x.emb, y.emb), f"{m}: max |diff| {np.abs(x.emb - y.emb).max()}"
    sa, sb = (json.loads((p / "done.json").read_text())["modalities"] for p in (a, b))
    assert sa["image"]["skipped"] == sb["image"]["skipped"] == [{"id": "im050", "reason": "file not found"}]


def test_torchrun_two_ranks_equals_single_process(table_and_reference):
    """The extractor's torchrun command (also the GPU check's, benchmarks/gpu_check.py, whose verdict on
    these two runs must be a pass)."""
    import importlib.util

    root = table_and_reference
    _run(embed.torchrun_command(root / "table.parquet", root / "dist", 2, ARGS))
    assert json.loads((root / "dist" / "done.json").read_text())["world_size"] == 2
    assert not (root / "dist" / ".partial").exists()
    _assert_same(root / "single", root / "dist")
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    verdict = gpu_check.compare_runs(root / "single", root / "dist")
    assert verdict["ok"] and verdict["world_size"] == 2, verdict


def test_killed_run_resumes_to_the_same_embeddings(table_and_reference):
    root = table_and_reference
    out = root / "killed"
    cmd = [sys.executable, "-m", "cxrlib.embed", "--table", str(root / "table.parquet"), "--out-dir", str(out),
           "--modalities", "image,text", *ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while len(list(out.glob(".partial/image-*/chunk-*.npz"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "no shard appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "done.json").exists() and not (out / "image.npz").exists()
    n_shards = len(list(out.glob(".partial/image-*/chunk-*.npz")))
    assert 2 <= n_shards < 15  # 120 images in chunks of 8: it really stopped part-way
    _in_this_process(cmd[cmd.index("cxrlib.embed") + 1:])  # the same command line resumes (start-up paid above)
    stamp = json.loads((out / "done.json").read_text())
    assert stamp["modalities"]["image"]["chunks_reused"] == n_shards
    _assert_same(root / "single", out)
