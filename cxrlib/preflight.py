"""Checks `make` runs before any heavy work: one clear line instead of a failure an hour in.

``python -m cxrlib.preflight --profile P [--dataset D] [--backbones a,b]`` exits 2 with one line on
stderr when the run cannot succeed here: an unknown profile, dataset or backbone, a missing
``OPENI_ROOT`` / ``MIMIC_ROOT``, or a profile that needs the network (the paper profile downloads
Open-I and the hub weights) on a machine without it and without local copies -- then it names
``make demo``. It downloads and computes nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cxrlib import config, paths

DATASETS = ("openi", "openi_synth", "mimic", "synthetic")
HUB_BACKBONES = {"biomedclip": "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
                 "clip": "timm/vit_base_patch16_clip_224.openai"}
OPENI_URL = "https://openi.nlm.nih.gov/imgs/collections/NLMCXR_png.tgz"
HUB_URL = "https://huggingface.co"


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


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache folder yet
        return False


def check_backbone(name: str, network: bool | None) -> bool | None:
    """Validate a backbone name; returns the (possibly probed) network state."""
    from cxrlib import backbones

    backbones.validate_backbone_name(name)  # raises ValueError listing the valid names
    if name.startswith("local-dir:"):
        folder = Path(name.split(":", 1)[1]).expanduser()
        if not folder.is_dir():
            raise PreflightError(f"backbone {name}: folder {folder} does not exist")
        return network
    repo = HUB_BACKBONES.get(name)
    local_env = {"biomedclip": "BIOMEDCLIP_DIR"}.get(name)
    if repo and not (local_env and os.environ.get(local_env)) and not _hub_cached(repo):
        network = reachable(HUB_URL) if network is None else network
        if not network:
            raise PreflightError(
                f"backbone {name!r} needs the Hugging Face hub ({repo}) and this machine has no network "
                f"and no cached copy: run `make demo` for the offline profile, or pre-download the weights"
                + (f" and set {local_env}=<folder>" if local_env else "") + " (see README, 'Local weights')")
    return network


def check_dataset(dataset: str, network: bool | None) -> bool | None:
    if dataset not in DATASETS:
        raise PreflightError(f"unknown dataset {dataset!r}; choose one of {list(DATASETS)}")
    if paths.study_table_path(dataset).is_file():
        return network
    if dataset == "mimic":
        root = paths.mimic_root()
        if root is None:
            raise PreflightError("DATASET=mimic needs MIMIC_ROOT=/path/to/mimic-cxr-jpg (credentialed data, "
                                 "never downloaded by this package)")
        if not root.is_dir():
            raise PreflightError(f"MIMIC_ROOT={root} does not exist")
    if dataset == "openi":
        if os.environ.get("OPENI_ROOT"):
            root = paths.openi_root()
            if not root.is_dir():
                raise PreflightError(f"OPENI_ROOT={root} does not exist")
        elif not any(paths.openi_root().glob("*")):
            network = reachable(OPENI_URL) if network is None else network
            if not network:
                raise PreflightError("Open-I images are not here and NLM is unreachable (no network): run "
                                     "`make demo` for the offline profile, or set OPENI_ROOT to a local copy")
    return network


def run(profile: str, dataset: str | None = None, backbones: list[str] | None = None) -> None:
    cfg = config.load_profile(profile)
    dataset = dataset or cfg["common"].get("dataset")
    names = list(dict.fromkeys((backbones or []) + list(cfg.get("backbones", []))))
    network = None if cfg.get("network", True) else False
    network = check_dataset(dataset, network)
    for name in names:
        network = check_backbone(name, network)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.preflight")
    ap.add_argument("--profile", required=True)
    ap.add_argument("--dataset", default=None)
    ap.add_argument("--backbones", default="", help="comma-separated extra backbones")
    args = ap.parse_args(argv)
    try:
        run(args.profile, args.dataset or None, [b for b in args.backbones.split(",") if b])
    except (PreflightError, config.ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
