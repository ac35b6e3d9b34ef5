"""``results/<profile>/run_manifest.json``: what produced the results, so a run can be repeated.

Records the git commit (and whether the tree was dirty), package versions, hardware, the profile,
every node's resolved parameters (``build/<profile>/params/*.yaml``), fingerprints (size + SHA-256)
of the inputs and outputs, and each node's wall time (from ``timings.jsonl``, which
``python -m cxrlib.manifest timed`` appends to around each make recipe).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from cxrlib import paths
from cxrlib.io import write_json

PACKAGES = ("torch", "torchvision", "open-clip-torch", "transformers", "timm", "pytorch-metric-learning",
            "torchmetrics", "faiss-cpu", "numpy", "scipy", "pandas", "pyarrow", "scikit-learn", "umap-learn",
            "openTSNE", "matplotlib", "seaborn", "papermill", "torchxrayvision", "cxrlib")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def fingerprint(path: Path) -> dict[str, Any]:
    """Size and SHA-256 of a file; for a folder, the count and total size of its files."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return {"path": str(path), "files": len(files), "bytes": sum(p.stat().st_size for p in files)}
    return {"path": str(path), "missing": True}


def git_state(root: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:  # pragma: no cover
        pass
    return info


def versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def read_timings(log: Path) -> dict[str, float]:
    """Latest wall time per node from the jsonl log."""
    timings: dict[str, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                timings[rec["node"]] = rec["seconds"]
    return timings


def _all_parameters(params_file: Path) -> dict[str, Any]:
    """A node's parameters as it ran: the notebook's own defaults overlaid with the params file."""
    from cxrlib.config import notebook_parameters

    given = yaml.safe_load(params_file.read_text()) or {}
    notebook = paths.repo_root() / "notebooks" / f"{params_file.stem}.ipynb"
    return {**(notebook_parameters(notebook) if notebook.is_file() else {}), **given}


def _determinism() -> dict[str, Any]:
    """The pins the DAG ran under (cxrlib.determinism: threads, CPU kernels, MKL), from the environment."""
    from cxrlib import determinism

    return determinism.describe()


def build_manifest(profile: str, inputs: list[Path], outputs: list[Path], out: str | None = None) -> dict[str, Any]:
    """``out``: the results/build folder name (``cxrlib.dag.out_key``: the profile, or ``<profile>-<dataset>``)."""
    bdir = paths.build_dir() / (out or profile)
    params = {p.stem: _all_parameters(p) for p in sorted((bdir / "params").glob("*.yaml"))}
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "profile": profile,
        "out": out or profile,
        "git": git_state(paths.repo_root()),
        "versions": versions(),
        "hardware": hardware(),
        "determinism": _determinism(),
        "parameters": params,
        "node_seconds": read_timings(bdir / "timings.jsonl"),
        "inputs": [fingerprint(p) for p in inputs],
        "outputs": [fingerprint(p) for p in outputs],
    }


def timed(log: Path, node: str, cmd: list[str]) -> int:
    """Run ``cmd``; on success append ``{"node", "seconds"}`` to ``log``. Returns the exit code."""
    start = time.perf_counter()
    code = subprocess.call(cmd)
    if code == 0:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as fh:
            fh.write(json.dumps({"node": node, "seconds": round(time.perf_counter() - start, 2),
                                 "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.manifest")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write results/<out>/run_manifest.json")
    w.add_argument("--profile", required=True)
    w.add_argument("--out", default=None, help="results/build folder name (default: the profile)")
    w.add_argument("--inputs", nargs="*", default=[])
    w.add_argument("--outputs", nargs="*", default=[])
    t = sub.add_parser("timed", help="run a command and log its wall time")
    t.add_argument("--log", required=True)
    t.add_argument("--node", required=True)
    t.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    if args.cmd == "timed":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        return timed(Path(args.log), args.node, cmd)
    manifest = build_manifest(args.profile, [Path(p) for p in args.inputs], [Path(p) for p in args.outputs], args.out)
    out = write_json(paths.results_dir(args.out or args.profile) / "run_manifest.json", manifest)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
