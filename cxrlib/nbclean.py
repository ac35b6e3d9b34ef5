"""Tracked notebooks stay clean: opening, running or saving one changes neither ``git status`` nor make's view.

Three pieces, one rule (:data:`EXTRA_KEYS` + nbstripout's own list):

* a git filter (nbstripout, cell ids kept) so ``git status`` / ``git diff`` see notebooks without outputs or volatile
  metadata (``install-git``, run by ``make env``);
* a Jupyter server ``pre_save_hook`` (:func:`strip_on_save`) so a save from JupyterLab writes the
  notebook stripped: no outputs, no execution counts, ``language_info`` reduced to its name
  (``install-jupyter`` writes the setting into the environment's ``etc/jupyter``, run by ``make env``);
* :func:`source_key`: a hash of what a notebook *does* (cell types, sources, tags), the make prerequisite
  of a notebook node instead of its mtime (:func:`write_source_keys` rewrites a key file only on change).

``python -m cxrlib.nbclean install-git | install-jupyter [--config-dir D] | keys --out-dir D NB ...``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from cxrlib import paths
from cxrlib.io import write_text_if_changed

#: metadata the kernel or JupyterLab fills in (beyond nbstripout's defaults); ``language_info.name`` stays
EXTRA_KEYS = tuple(f"metadata.language_info.{k}" for k in
                   ("codemirror_mode", "file_extension", "mimetype", "nbconvert_exporter", "pygments_lexer",
                    "version")) + ("metadata.widgets", "cell.metadata.jupyter", "cell.metadata.trusted")
HOOK = "cxrlib.nbclean.strip_on_save"
SETTING_FILE = "jupyter_server_config.json"  # (files in jupyter_server_config.d/ are not read for this)


def strip(nb: Any) -> Any:
    """``nb`` (an nbformat NotebookNode) without outputs, counts and volatile metadata (nbstripout)."""
    from nbstripout import strip_output

    return strip_output(nb, keep_output=False, keep_count=False, keep_id=True,
                        extra_keys=["metadata.signature", "cell.metadata.collapsed", "cell.metadata.ExecuteTime",
                                    "cell.metadata.execution", "cell.metadata.heading_collapsed",
                                    "cell.metadata.hidden", "cell.metadata.scrolled", *EXTRA_KEYS])


def _tracked_notebook(path: str, contents_manager: Any) -> bool:
    root = Path(getattr(contents_manager, "root_dir", ".")).resolve()
    full = (root / path).resolve()
    return full.suffix == ".ipynb" and full.parent.name == "notebooks" and (full.parent.parent / "pyproject.toml").is_file()


def strip_on_save(model: dict, path: str, contents_manager: Any = None, **kwargs: Any) -> None:
    """Jupyter ``ContentsManager.pre_save_hook``: a notebook of this repository's ``notebooks/`` is saved stripped."""
    if model.get("type") != "notebook" or not _tracked_notebook(path, contents_manager):
        return
    import nbformat

    model["content"] = strip(nbformat.from_dict(model["content"]))


def source_key(notebook: str | Path) -> str:
    """A hash of the notebook's cells (type, source, tags): what changes when its code or parameters do."""
    nb = json.loads(Path(notebook).read_text())
    cells = [{"type": c["cell_type"], "source": "".join(c["source"]) if isinstance(c["source"], list) else c["source"],
              "tags": sorted(c.get("metadata", {}).get("tags", []))} for c in nb.get("cells", [])]
    kernel = nb.get("metadata", {}).get("kernelspec", {}).get("name")
    return hashlib.sha256(json.dumps({"cells": cells, "kernel": kernel}, sort_keys=True).encode()).hexdigest()


def key_path(out_dir: Path, notebook: str | Path) -> Path:
    return Path(out_dir) / f"{Path(notebook).stem}.src"


def write_source_keys(out_dir: Path, notebooks: list[str | Path]) -> list[Path]:
    """``<out_dir>/<stem>.src`` holding :func:`source_key` per notebook, each rewritten only when it changes."""
    out = []
    for nb in notebooks:
        path = key_path(out_dir, nb)
        write_text_if_changed(path, source_key(nb) + "\n")
        out.append(path)
    return out


def install_git(repo: Path | None = None, python: str | None = None) -> None:
    """The nbstripout git filter (+ :data:`EXTRA_KEYS`) in ``repo``'s local git config and info/attributes."""
    repo = repo or paths.repo_root()
    py = python or sys.executable
    run = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True, text=True)  # noqa: E731
    run("config", "filter.nbstripout.clean", f'"{py}" -m nbstripout --keep-id')
    run("config", "filter.nbstripout.smudge", "cat")
    run("config", "filter.nbstripout.required", "true")
    run("config", "filter.nbstripout.extrakeys", " ".join(EXTRA_KEYS))
    run("config", "diff.ipynb.textconv", f'"{py}" -m nbstripout -t --keep-id')
    attrs = Path(run("rev-parse", "--git-path", "info/attributes").stdout.strip())
    attrs = attrs if attrs.is_absolute() else repo / attrs
    attrs.parent.mkdir(parents=True, exist_ok=True)
    have = attrs.read_text() if attrs.is_file() else ""
    add = [line for line in ("*.ipynb filter=nbstripout", "*.ipynb diff=ipynb") if line not in have.splitlines()]
    if add:
        attrs.write_text(have + ("" if not have or have.endswith("\n") else "\n") + "\n".join(add) + "\n")


def install_jupyter(config_dir: Path | None = None) -> Path:
    """Set :func:`strip_on_save` as the save hook in ``<config_dir>/jupyter_server_config.json`` (default:
    this environment's ``etc/jupyter``, which every ``jupyter lab`` started from it reads), keeping the
    file's other settings."""
    config_dir = Path(config_dir or Path(sys.prefix) / "etc" / "jupyter")
    path = config_dir / SETTING_FILE
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    cfg.setdefault("ContentsManager", {})["pre_save_hook"] = HOOK
    write_text_if_changed(path, json.dumps(cfg, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.nbclean")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install-git", help="install the nbstripout git filter in this repository")
    j = sub.add_parser("install-jupyter", help="make JupyterLab save this repository's notebooks stripped")
    j.add_argument("--config-dir", type=Path, default=None)
    k = sub.add_parser("keys", help="write <out-dir>/<notebook>.src source keys (only when they change)")
    k.add_argument("--out-dir", type=Path, required=True)
    k.add_argument("notebooks", nargs="+")
    args = ap.parse_args(argv)
    if args.cmd == "install-git":
        install_git()
    elif args.cmd == "install-jupyter":
        print(install_jupyter(args.config_dir))
    else:
        write_source_keys(args.out_dir, args.notebooks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
