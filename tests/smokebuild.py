"""The session's one ``make smoke`` build (conftest ``smoke_dag``), shared by every pytest-xdist worker.

``build(shared)`` runs it under a file lock in ``shared`` unless a record of it is already there; the record
(make's arguments, exit status and output) is what every worker reads. conftest starts it in the background
(``python tests/smokebuild.py <shared>``) as soon as the collection holds a test that needs it, so the build
runs beside the first test files instead of holding a worker for its whole length."""

from __future__ import annotations

import fcntl
import json
import shutil
import sys
from pathlib import Path


def paths(shared: Path) -> tuple[Path, Path, Path]:
    """The build's work folder, its record and its lock file in the session's shared temp folder."""
    return shared / "smoke-dag", shared / "smoke-dag.json", shared / "smoke-dag.lock"


def build(shared: Path) -> dict:
    """The record of the session's smoke build: run now under the lock, or read once another process ran it."""
    from conftest import run_make  # tests/ is on sys.path both under pytest and as a script

    work, record, lock_path = paths(shared)
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not record.is_file():
            shutil.rmtree(work, ignore_errors=True)  # a build that was interrupted
            work.mkdir()
            out = run_make(["smoke"], work, check=False)
            record.write_text(json.dumps({"args": out.args, "returncode": out.returncode,
                                          "stdout": out.stdout, "stderr": out.stderr}))
        return json.loads(record.read_text())


if __name__ == "__main__":
    build(Path(sys.argv[1]))
