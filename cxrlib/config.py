"""Profiles (``configs/<profile>.yaml``) and the parameters each node receives.

A profile holds ``common`` settings and one section per node (``nodes: {02_train: {...}}``); it overrides
and never restates a default (defaults: :mod:`cxrlib.settings`, and a notebook's own ``parameters`` cell
for its node-local parameters). A node's parameters are, in increasing priority: its declared defaults
(the notebook's ``parameters`` cell, or the schema's settings of a script node such as ``embed``), the
profile's ``common`` keys it declares, its own section (every key must be one it declares), then
overrides (make variables, applied by :mod:`cxrlib.dag` only to the nodes their setting lists). Every
layer is checked by the schema's one validator (:func:`cxrlib.settings.validate`).

``python -m cxrlib.config params --profile P --node N --out F [KEY=VALUE ...]`` writes the resolved
parameters as YAML, rewriting the file only when its content changes (make uses it as a prerequisite).
"""

from __future__ import annotations

import argparse
import ast
import copy
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from cxrlib import paths, settings
from cxrlib.io import write_text_if_changed

#: common settings a script node (no notebook) receives besides its own
SCRIPT_COMMON_KEYS = ("device",)


#: PyYAML's safe loader on libyaml's C parser where PyYAML was built with it (the same safe constructor, so the
#: same values), else its pure-Python one: every ``make`` call reads the profile files several times
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_yaml(text: str) -> Any:
    """``yaml.safe_load`` through :data:`SAFE_LOADER`."""
    return yaml.load(text, Loader=SAFE_LOADER)


class ConfigError(ValueError):
    """A profile, a parameter or an override that cannot be used; the message says which."""


def available_profiles() -> list[str]:
    return sorted(p.stem for p in paths.configs_dir().glob("*.yaml"))


def load_profile(profile: str) -> dict[str, Any]:
    """Read ``configs/<profile>.yaml``; an unknown name lists the known ones."""
    path = paths.configs_dir() / f"{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {profile!r}; choose one of {available_profiles()}")
    st = path.stat()
    cfg = copy.deepcopy(_read_profile_file(str(path), st.st_mtime_ns, st.st_size))  # callers may change theirs
    cfg.setdefault("common", {})
    cfg.setdefault("nodes", {})
    cfg["profile"] = profile
    return cfg


@functools.lru_cache(maxsize=32)
def _read_profile_file(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """A profile file's contents, parsed once per version of the file in a process."""
    return read_yaml(Path(path).read_text()) or {}


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
    return read_yaml(text) if text != "" else None


def declared_parameters(node: str, notebook: str | Path | None = None) -> dict[str, Any]:
    """``{parameter: default}`` a node takes: its notebook's parameters cell, or a script node's schema settings."""
    notebook = Path(notebook) if notebook else paths.repo_root() / "notebooks" / f"{node}.ipynb"
    if notebook.is_file():
        return notebook_parameters(notebook)
    own = {s.name: s.default for s in settings.schema() if node in s.nodes}
    if not own:
        raise ConfigError(f"node {node!r} is neither a notebook ({notebook}) nor a script node of cxrlib.settings")
    return {**{k: settings.lookup(node, k).default for k in SCRIPT_COMMON_KEYS}, **own}


def resolve_params(profile: str, node: str, overrides: dict[str, Any] | None = None,
                   notebook: str | Path | None = None) -> dict[str, Any]:
    """The parameters of ``node`` under ``profile``; overrides whose value is None are ignored.

    Script nodes get every declared parameter (their defaults included); notebook nodes get only the
    keys the profile or an override sets (papermill keeps the notebook's own defaults for the rest).
    """
    cfg = load_profile(profile)
    declared = declared_parameters(node, notebook)
    is_script = not (Path(notebook) if notebook else paths.repo_root() / "notebooks" / f"{node}.ipynb").is_file()
    section = cfg["nodes"].get(node) or {}
    extra = sorted(set(section) - set(declared))
    if extra:
        raise ConfigError(f"configs/{profile}.yaml nodes.{node}: {extra} not parameters of {node} "
                          f"(it takes {sorted(declared)})")
    params: dict[str, Any] = dict(declared) if is_script else {}
    try:
        params.update(settings.validate(node, {k: v for k, v in cfg["common"].items() if k in declared},
                                        f"configs/{profile}.yaml common"))
        params.update(settings.validate(node, section, f"configs/{profile}.yaml nodes.{node}"))
        params.update({k: v for k, v in (overrides or {}).items() if v is not None and k in declared})
        if "profile" in declared:
            params["profile"] = profile
        return settings.validate(node, params, f"node {node}")
    except settings.SettingError as exc:
        raise ConfigError(str(exc)) from None


def validate_params(params: dict[str, Any], node: str = "02_train") -> dict[str, Any]:
    """The schema's validator for ``node`` (default the training node), as a :class:`ConfigError`."""
    try:
        return settings.validate(node, params)
    except settings.SettingError as exc:
        raise ConfigError(str(exc)) from None


def restated_defaults(profile: str) -> list[str]:
    """``nodes.<node>.<key>`` / ``common.<key>`` entries of a profile that equal the default they override."""
    cfg = load_profile(profile)
    out = []
    for node, section in cfg["nodes"].items():
        try:
            declared = declared_parameters(node)
        except ConfigError:
            continue
        out += [f"nodes.{node}.{k}" for k, v in (section or {}).items() if k in declared and declared[k] == v]
    from cxrlib import dag

    def declared(node: str) -> dict[str, Any]:
        try:
            return declared_parameters(node)
        except ConfigError:  # a script node with no schema settings declares nothing
            return {}

    for k, v in cfg["common"].items():
        takers = [declared(n)[k] for n in dag.NODES if k in declared(n)]
        if takers and all(d == v for d in takers):
            out.append(f"common.{k}")
    return out


def write_params_files(out_dir: Path, params: dict[str, dict[str, Any]]) -> list[Path]:
    """Write ``<out_dir>/<node>.yaml`` per node; a file is rewritten only when it changes.

    ``<out_dir>/built/<node>.yaml`` is the copy a node's recipe keeps (``cp -p``) after a successful
    run. When the requested parameters equal those, the file gets the built copy's time back, so a
    dry run with other values (``make -n W_SUPCON=0.5``) does not leave nodes looking stale.
    """
    written = []
    for node, values in params.items():
        text = yaml.safe_dump(values, sort_keys=True)
        path, built = Path(out_dir) / f"{node}.yaml", Path(out_dir) / "built" / f"{node}.yaml"
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
        elif args.cmd == "flags":
            params = read_yaml(Path(args.file).read_text()) or {}
            flags = []
            for k, v in params.items():
                if k == "profile" or v is None or v is False:
                    continue
                flags.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
            print(" ".join(flags))
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
