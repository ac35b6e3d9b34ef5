"""Profiles (``configs/<profile>.yaml``) and the parameters each notebook node receives.

A profile holds ``common`` settings and one section per node (``nodes: {02_train: {...}}``).
A node's parameters are, in increasing priority: the notebook's own ``parameters`` cell
defaults, the profile's ``common`` keys, the node's section, then command-line overrides
(make variables such as ``W_SUPCON=0.5``). Only keys the notebook declares are passed to it,
so a loss weight never marks data prep stale.

``python -m cxrlib.config params --profile P --node N --out F [KEY=VALUE ...]`` writes the
resolved parameters as YAML, rewriting the file only when its content changes: make uses
that file as a prerequisite, so a node reruns exactly when one of its parameters changed.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from cxrlib import paths
from cxrlib.io import write_text_if_changed

#: common keys a script node (no notebook) receives besides its own section
SCRIPT_COMMON_KEYS = ("device",)


class ConfigError(ValueError):
    """A profile, a parameter or an override that cannot be used; the message says which."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in paths.configs_dir().glob("*.yaml"))


def load_profile(profile: str) -> dict[str, Any]:
    """Read ``configs/<profile>.yaml``; an unknown name lists the known ones."""
    path = paths.configs_dir() / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}; choose one of {available_profiles()}")
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg.setdefault("common", {})
    cfg.setdefault("nodes", {})
    cfg["profile"] = profile
    return cfg


def notebook_parameters(notebook: str | Path) -> dict[str, Any]:
    """Literal defaults of the cell tagged ``parameters`` (parsed, never executed)."""
    nb = json.loads(Path(notebook).read_text())
    for cell in nb.get("cells", []):
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            out: dict[str, Any] = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError as exc:
                        raise ConfigError(f"{notebook}: parameter {node.targets[0].id} is not a literal") from exc
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                    out[node.target.id] = ast.literal_eval(node.value)
            return out
    raise ConfigError(f"{notebook} has no cell tagged 'parameters'")


def parse_value(text: str) -> Any:
    """Command-line value -> Python value via YAML (``0.5`` -> float, ``true`` -> bool, ``a`` -> str)."""
    return yaml.safe_load(text) if text != "" else None


def resolve_params(profile: str, node: str, overrides: dict[str, Any] | None = None,
                   notebook: str | Path | None = None) -> dict[str, Any]:
    """The parameters of ``node`` under ``profile``; overrides whose value is None are ignored."""
    cfg = load_profile(profile)
    notebook = Path(notebook) if notebook else paths.repo_root() / "notebooks" / f"{node}.ipynb"
    if notebook.is_file():
        declared = notebook_parameters(notebook)
    elif node in cfg["nodes"]:  # a script node (e.g. `embed`): its section lists what it takes
        declared = {**dict.fromkeys(SCRIPT_COMMON_KEYS), **(cfg["nodes"][node] or {})}
    else:
        raise ConfigError(f"node {node!r} is neither a notebook ({notebook}) nor a section of profile {profile!r}")
    params: dict[str, Any] = {}
    for source in (cfg["common"], cfg["nodes"].get(node, {}) or {}):
        params.update({k: v for k, v in source.items() if k in declared})
    for k, v in (overrides or {}).items():
        if v is not None and k in declared:
            params[k] = v
    if "profile" in declared:
        params["profile"] = profile
    validate_params(params)
    return params


def validate_params(params: dict[str, Any]) -> None:
    """Reject what would only fail later: negative or all-zero loss weights, a bad seed."""
    weights = {k: params[k] for k in ("w_bce", "w_supcon", "w_clip") if k in params}
    for k, v in weights.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{k} must be a number >= 0, got {v!r}")
    if weights and len(weights) == 3 and sum(weights.values()) == 0:
        raise ConfigError("all loss weights are 0: nothing to train (set W_BCE, W_SUPCON or W_CLIP > 0)")
    if "seed" in params and not (isinstance(params["seed"], int) and params["seed"] >= 0):
        raise ConfigError(f"seed must be a non-negative integer, got {params['seed']!r}")


def all_nodes(profile: str) -> list[str]:
    """Every notebook in notebooks/ plus the profile's script nodes (sections without a notebook)."""
    notebooks = sorted(p.stem for p in (paths.repo_root() / "notebooks").glob("[0-9]*.ipynb"))
    return notebooks + [n for n in load_profile(profile)["nodes"] if n not in notebooks]


def write_all_params(profile: str, out_dir: Path, overrides: dict[str | None, dict[str, Any]]) -> list[Path]:
    """Write ``<out_dir>/<node>.yaml`` for every node; a file is rewritten only when it changes.

    ``<out_dir>/built/<node>.yaml`` is the copy a node's recipe keeps (``cp -p``) after a successful
    run. When the requested parameters equal those, the file gets the built copy's time back, so a
    dry run with other values (``make -n W_SUPCON=0.5``) does not leave nodes looking stale.
    """


    written = []
    for node in all_nodes(profile):
        node_overrides = {**overrides.get(None, {}), **overrides.get(node, {})}
        text = yaml.safe_dump(resolve_params(profile, node, node_overrides), sort_keys=True)
        path, built = out_dir / f"{node}.yaml", out_dir / "built" / f"{node}.yaml"
        write_text_if_changed(path, text)
        if built.is_file() and built.read_text() == text:
            st = built.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        written.append(path)
    return written


def _parse_overrides(items: list[str]) -> dict[str | None, dict[str, Any]]:
    """``KEY=VALUE`` (all nodes, key None) and ``NODE:KEY=VALUE`` (one node)."""
    out: dict[str | None, dict[str, Any]] = {None: {}}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE")
        k, v = item.split("=", 1)
        node, _, key = k.strip().rpartition(":")
        out.setdefault(node or None, {})[key.lower()] = parse_value(v.strip())
    return out


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrlib.config")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="write a node's resolved parameters (only if changed)")
    p.add_argument("--profile", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE; KEY is case-insensitive, empty VALUE = unset")
    a = sub.add_parser("params-all", help="write every node's parameters into a folder (only files that change)")
    a.add_argument("--profile", required=True)
    a.add_argument("--out-dir", required=True)
    a.add_argument("overrides", nargs="*", help="KEY=VALUE for every node, or NODE:KEY=VALUE for one node")
    f = sub.add_parser("flags", help="print a params file as command-line flags (--batch-size 64 ...)")
    f.add_argument("file")
    g = sub.add_parser("get", help="print one resolved value (for make)")
    g.add_argument("--profile", required=True)
    g.add_argument("key", help="common.KEY or nodes.NODE.KEY or a top-level key")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "params":
            params = resolve_params(args.profile, args.node, _parse_overrides(args.overrides)[None])
            write_text_if_changed(args.out, yaml.safe_dump(params, sort_keys=True))
        elif args.cmd == "params-all":
            write_all_params(args.profile, Path(args.out_dir), _parse_overrides(args.overrides))
        elif args.cmd == "flags":
            params = yaml.safe_load(Path(args.file).read_text()) or {}
            print(" ".join(f"--{k.replace('_', '-')} {v}" for k, v in params.items()
                           if k != "profile" and v is not None))
        else:
            value: Any = load_profile(args.profile)
            for part in args.key.split("."):
                value = value.get(part, "") if isinstance(value, dict) else ""
            if isinstance(value, list):
                value = " ".join(map(str, value))
            print(str(value).lower() if isinstance(value, bool) else value)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
