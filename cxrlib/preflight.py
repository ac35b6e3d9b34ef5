"""Checks `make` runs before any heavy work: one clear line instead of a failure an hour in.

``python -m cxrlib.preflight --profile P [--dataset D] [--backbones a,b]`` exits 2 with one line on
stderr when the run cannot succeed here. It reads the two registries, so it holds no name list of
its own: a data set is checked by its registry entry's ``check`` (``OPENI_ROOT`` / ``MIMIC_ROOT``, or
the network to download), and a backbone by its entry's repositories: for every Hugging Face repo a
load reads (BiomedCLIP's own and BiomedBERT's, which holds its text config and tokenizer), the files
it reads there must be in the local folder that replaces the repo (``<NAME>_DIR``, ``BIOMEDBERT_DIR``),
or all be in the Hugging Face cache, or the hub must be reachable. A name of a registered family
(``<prefix><rest>``, e.g. a local folder) is checked by that family's spec, which reads what the load
would read first (a folder's config and weights file) and loads nothing. A profile that needs the
network on a machine without it names ``make demo``. It downloads and computes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cxrlib import config, paths

HUB_URL = "https://huggingface.co"
OFFLINE_HINT = "run `make demo` for the offline profile, or see README, 'Local weights'"


class PreflightError(RuntimeError):
    """The run cannot succeed as configured; the message says what to do instead."""


def reachable(url: str, timeout: float = 3.0) -> bool:
    """True when the URL's host (or the proxy that would carry it) answers; nothing is downloaded.

    ``HF_HUB_OFFLINE=1`` means the hub is unreachable by choice.
    """
    from cxrlib.datasets.download import network_available

    if os.environ.get("HF_HUB_OFFLINE") == "1" and "huggingface" in url:
        return False
    return network_available(url, timeout)


class Network:
    """``network(url) -> bool``, probed once per host; always False when the profile forbids the network."""

    def __init__(self, allowed: bool = True, probe: Callable[[str], bool] = reachable):
        self.allowed, self.probe, self.seen = allowed, probe, {}

    def __call__(self, url: str) -> bool:
        if not self.allowed:
            return False
        if url not in self.seen:
            self.seen[url] = self.probe(url)
        return self.seen[url]


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache as the loads will use it (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_file(repo_id: str, filename: str, cache_dir: Path | None = None) -> Path | None:
    """The cached copy of ``filename`` of model repo ``repo_id`` (revision main), when it is a readable file."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=str(cache_dir or hf_cache_dir()))
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def check_backbone(name: str, network: Callable[[str], bool]) -> None:
    """Every repository and file backbone ``name``'s load reads is local, cached, or reachable; else PreflightError."""
    from cxrlib import backbones

    backbones.validate_backbone_name(name)  # raises ValueError listing the valid names
    base = backbones.base_name(name)  # an adapted copy needs its base (notebook 00 writes the checkpoint)
    entry = backbones.backbone_entry(base)
    if entry is None:  # a family name (<prefix><rest>): its registered spec checks what it reads, loading nothing
        try:
            spec = backbones.build_spec(base)
        except (FileNotFoundError, ValueError) as exc:
            msg = str(exc)
            raise PreflightError(msg if base in msg else f"backbone {base!r}: {msg}") from None
        parts = spec.get("parts", {})  # a composite: each part it is built from is checked the same way
        if "backbone" in parts:
            try:
                check_backbone(parts["backbone"], network)
            except PreflightError as exc:
                raise PreflightError(f"backbone {name!r}: its image tower: {exc}") from None
        if "text_tower" in parts:
            check_text_tower(parts["text_tower"], network, within=name)
        return
    if not entry.repos:  # a packaged config, unless <NAME>_DIR replaces it
        folder = entry.local_dir()
        if folder is not None:
            _check_folder(entry.local_env, folder, backbones.LOCAL_DIR_FILES, name)
        return
    for repo in entry.repos:
        env = entry.repo_env(repo)
        folder = entry.local_dir(env)
        if folder is not None:
            _check_folder(env, folder, repo, name)
            continue
        cache = hf_cache_dir()
        missing = missing_in_cache(repo, cache)
        if not missing or network(HUB_URL):
            continue  # cached, or the load downloads what is missing
        files = ", ".join(" or ".join(alts) for alts in repo.files)
        where = (f"the Hugging Face cache ({cache}) holds it without {missing}" if len(missing) < len(repo.files)
                 else f"it is not in the Hugging Face cache ({cache})")
        raise PreflightError(f"backbone {name!r} reads {repo.repo_id} ({files}); {where} and the hub is unreachable "
                             f"(no network): pre-download it or set {env}=<folder with those files>; or {OFFLINE_HINT}")


def check_text_tower(name: str, network: Callable[[str], bool], within: str | None = None) -> None:
    """The text tower ``name`` (:mod:`cxrlib.text_towers`) can load: its folder holds the files the load
    reads, or its hub repository is cached with them, or the hub is reachable; else PreflightError."""
    from cxrlib import backbones, text_towers

    who = f"backbone {within!r}: text tower {name!r}" if within else f"text tower {name!r}"
    try:
        spec = text_towers.text_tower_spec(name)
        source = text_towers.resolve_source(spec)
    except (ValueError, FileNotFoundError) as exc:
        raise PreflightError(f"{who}: {exc}") from None
    repo = backbones.HubRepo(source, text_towers.required_files(spec), spec.local_env)
    folder = Path(source).expanduser()
    if folder.is_dir() or source.startswith(("/", ".", "~")):
        if not folder.is_dir():
            raise PreflightError(f"{who}: folder {folder} does not exist")
        missing = repo.missing_in(folder)
        if missing:
            raise PreflightError(f"{who}: {folder} lacks {missing} (the files its load reads)")
        return
    cache = hf_cache_dir()
    missing = missing_in_cache(repo, cache)
    if missing and not network(HUB_URL):
        hint = f"set {spec.local_env}=<folder with those files>" if spec.local_env else "pre-download it"
        raise PreflightError(f"{who} reads {source}; the Hugging Face cache ({cache}) lacks {missing} and the hub "
                             f"is unreachable (no network): {hint}; or {OFFLINE_HINT}")


def missing_in_cache(repo, cache: Path | None = None) -> list[str]:
    """The files of ``repo`` (a :class:`cxrlib.backbones.HubRepo`) that the Hugging Face cache lacks."""
    cache = cache or hf_cache_dir()
    return repo.missing(lambda f: cached_file(repo.repo_id, f, cache) is not None)


def _check_folder(env: str, folder: Path, repo, name: str) -> None:
    if not folder.is_dir():
        raise PreflightError(f"backbone {name!r}: {env}={folder} does not exist")
    missing = repo.missing_in(folder)
    if missing:
        raise PreflightError(f"backbone {name!r}: {env}={folder} lacks {missing} (the files its load reads"
                             + (f" from {repo.repo_id})" if "/" in repo.repo_id else ")"))


def check_dataset(dataset: str, network: Callable[[str], bool]) -> None:
    """A registered data set whose table exists, or whose entry's check passes here; else PreflightError."""
    from cxrlib.datasets.registry import DatasetUnavailable, get_dataset

    try:
        entry = get_dataset(dataset)
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    if paths.study_table_path(dataset).is_file() or entry.check is None:
        return
    try:
        entry.check(network)
    except DatasetUnavailable as exc:
        raise PreflightError(str(exc)) from None


def run(profile: str, dataset: str | None = None, backbones: list[str] | None = None,
        network: Callable[[str], bool] | None = None, eval_set: str | None = None) -> None:
    """``eval_set``: a peer's evaluation set (``EVAL_SET``) checked like a data set (its local copy is there),
    before training rather than when the DAG reaches it."""
    from cxrlib import settings

    cfg = config.load_profile(profile)
    common = {**settings.defaults("common"), **cfg["common"]}  # a profile never restates a default
    dataset = dataset or common["dataset"]
    names = list(dict.fromkeys((backbones or []) + list(cfg.get("backbones", [])) + [common["backbone"]]))
    network = network or Network(allowed=bool(cfg.get("network", True)))
    check_dataset(dataset, network)
    if eval_set:
        check_dataset(eval_set, network)
    for name in names:
        check_backbone(name, network)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.preflight")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--backbones", default="", help="comma-separated extra backbones")
    ap.add_argument("--eval-set", default=None, help="a peer's evaluation set (EVAL_SET)")
    args = ap.parse_args(argv)
    try:
        run(args.profile, args.dataset or None, [b for b in args.backbones.split(",") if b],
            eval_set=args.eval_set or None)
    except (PreflightError, config.ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
