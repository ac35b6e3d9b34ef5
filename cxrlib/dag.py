"""The make DAG's variables, computed once in Python so paths have one source of truth.

``python -m cxrlib.dag makevars --profile P [DATASET=..] [BACKBONE=..]`` prints make assignments:
the dataset, the backbone the projector is trained on, every embedding set to extract, and the
file each node writes (all through :mod:`cxrlib.paths`, so ``CXR_WORKDIR`` redirects them).

Embedding keys: each backbone of the profile's ``backbones`` list is embedded frozen under its own
name; when the profile adapts (``adapt: true``), the training backbone is adapted in notebook 00 and
embedded again under ``<backbone>-adapted``, which is then the one the projector trains on.
"""

from __future__ import annotations

import argparse
import sys

from cxrlib import config, paths

ADAPTED_SUFFIX = "-adapted"


def train_key(backbone: str, adapt: bool) -> str:
    return f"{backbone}{ADAPTED_SUFFIX}" if adapt else backbone


def adapted_checkpoint(dataset: str, backbone: str):
    return paths.models_dir() / dataset / f"{backbone}{ADAPTED_SUFFIX}.pt"


def embedding_key(key: str) -> str:
    """The embedding folder name of a backbone key (file-system safe)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)





def makevars(profile: str, dataset: str | None = None, backbone: str | None = None) -> dict[str, str]:
    cfg = config.load_profile(profile)
    ds = dataset or cfg["common"]["dataset"]
    bk = backbone or cfg["common"]["backbone"]
    adapt = bool(cfg.get("adapt", False))
    frozen = list(dict.fromkeys(list(cfg.get("backbones", [])) + [bk]))
    key = train_key(bk, adapt)
    keys = frozen + ([key] if adapt else [])
    emb = paths.embeddings_dir() / ds
    out = {
        "DS": ds, "BK": bk, "ADAPT": "1" if adapt else "", "TRAIN_KEY": key,
        "EMBED_KEYS": " ".join(embedding_key(k) for k in keys),
        "FROZEN_KEYS": " ".join(embedding_key(k) for k in frozen),
        "TABLE": str(paths.study_table_path(ds)),
        "EMB_ROOT": str(emb),
        "ADAPTED_CKPT": str(adapted_checkpoint(ds, bk)),
        "RESULTS": str(paths.results_dir(profile)),
        "FIGURES": str(paths.figures_dir(profile)),
        "B": str(paths.build_dir() / profile),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.dag")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("makevars")
    m.add_argument("--profile", required=True)
    m.add_argument("--dataset", default="")
    m.add_argument("--backbone", default="")
    args = ap.parse_args(argv)
    try:
        values = makevars(args.profile, args.dataset or None, args.backbone or None)
    except config.ConfigError as exc:
        print(f"$(error {exc})")
        return 0
    for k, v in values.items():
        print(f"{k} := {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
