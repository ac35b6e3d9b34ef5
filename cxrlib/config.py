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
import sys
from pathlib import Path
from typing import Any

import yaml

from cxrlib import paths
from cxrlib.io import write_text_if_changed


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
    declared = notebook_parameters(notebook)
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


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cxrlib.config")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("params", help="write a node's resolved parameters (only if changed)")
    p.add_argument("--profile", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("overrides", nargs="*", help="KEY=VALUE; KEY is case-insensitive, empty VALUE = unset")
    g = sub.add_parser("get", help="print one resolved value (for make)")
    g.add_argument("--profile", required=True)
    g.add_argument("key", help="common.KEY or nodes.NODE.KEY or a top-level key")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "params":
            overrides = {}
            for item in args.overrides:
                if "=" not in item:
                    raise ConfigError(f"override {item!r} is not KEY=VALUE")
                k, v = item.split("=", 1)
                overrides[k.strip().lower()] = parse_value(v.strip())
            params = resolve_params(args.profile, args.node, overrides)
            write_text_if_changed(args.out, yaml.safe_dump(params, sort_keys=True))
        else:
            value: Any = load_profile(args.profile)
            for part in args.key.split("."):
                value = value.get(part, "") if isinstance(value, dict) else ""
            print(value if not isinstance(value, bool) else str(value).lower())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
