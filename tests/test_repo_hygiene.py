"""Repository rules: notebooks committed without outputs and with a `parameters` cell first."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped_and_parameterised(nb_path):
    nb = json.loads(nb_path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, f"{nb_path.name}: code cells {dirty} carry outputs; run `nbstripout {nb_path}`"
    assert code and "parameters" in code[0].get("metadata", {}).get("tags", []), (
        f"{nb_path.name}: the first code cell must be tagged 'parameters'")
    assert nb["metadata"].get("kernelspec", {}).get("name") == "cxr-retrieval", (
        f"{nb_path.name}: kernelspec must be 'cxr-retrieval' (the kernel `make env` registers)")


def test_no_generated_files_tracked():
    files = subprocess.run(["git", "ls-files", "data", "build", "results", "figures"], cwd=REPO,
                           capture_output=True, text=True).stdout.split()
    bad = [f for f in files if not f.endswith((".gitignore", "README.md"))]
    assert not bad, f"generated outputs are committed: {bad[:5]}"
