"""The peers' fixed evaluation sets: build one's study table and embed it for the models to compare.

An evaluation set is a registered data set whose every row is ``split = "test"``
(``mimic_5x200``: :mod:`cxrlib.datasets.mimic5x200`; ``openi_cxrclip``:
:mod:`cxrlib.datasets.openi_cxrclip`). Models are trained on their own data set (``DATASET``) and
evaluated on the set by notebook 03 with ``eval_set=<name>``, which reads the table
``paths.study_table_path(<name>)`` and the embeddings ``paths.embeddings_dir()/<name>/<backbone>/``
written here. ``make paper EVAL_SET=<name>`` does both before notebook 03 (node ``evalset`` of
:mod:`cxrlib.dag`, passing notebook 01's parameters with ``--params``); by hand:

    python -m cxrlib.evalsets mimic_5x200 --backbones clip biomedclip
    python -m cxrlib.evalsets openi_cxrclip --backbones offline-adapted \\
        --checkpoint offline-adapted=data/models/openi_synth/offline-adapted.pt
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from cxrlib import paths

#: evaluation set -> the data set whose local copy it is built from (the MIMIC or Open-I root settings)
EVAL_SETS = {"mimic_5x200": "mimic", "openi_cxrclip": "openi"}


def check_eval_set(name: str | None) -> str | None:
    """``name`` if it is an evaluation set (or None); otherwise an error listing the valid names."""
    if name is not None and name not in EVAL_SETS:
        raise ValueError(f"unknown evaluation set {name!r}; choose from {sorted(EVAL_SETS)} (or None: the data "
                         f"set's own test split)")
    return name


def require_built(name: str, backbones) -> None:
    """Raise naming the command to run when evaluation set ``name``'s table or an embedding set is missing."""
    from cxrlib.dag import embedding_dir

    missing = [] if paths.study_table_path(name).is_file() else ["its study table"]
    missing += [f"{b} embeddings" for b in dict.fromkeys(backbones)
                if not (embedding_dir(name, b) / "image.npz").is_file()]
    if missing:
        raise FileNotFoundError(f"evaluation set {name!r} lacks {', '.join(missing)}: `make paper EVAL_SET={name}` "
                                f"builds and embeds it before notebook 03; by hand, `python -m cxrlib.evalsets "
                                f"{name} --backbones {' '.join(dict.fromkeys(backbones))}` (add --mimic-root / "
                                f"--openi-root for your copy, --checkpoint NAME=PATH for an adapted backbone)")


def table_params(name: str, data_params: dict) -> dict:
    """The notebook-01 parameters in ``data_params`` that evaluation set ``name``'s table is built from:
    those :func:`cxrlib.datasets.build.notebook_params` takes (not ``dataset``, nor the notebook's own such
    as ``n_examples``). make passes all of notebook 01's parameters (``--params``, see ``cxrlib.dag``)."""
    import inspect

    from cxrlib.datasets.build import notebook_params

    check_eval_set(name)
    taken = set(inspect.signature(notebook_params).parameters) - {"dataset"}
    return {k: v for k, v in data_params.items() if k in taken}


def build_table(name: str, **params) -> Path:
    """Build and save the study table of evaluation set ``name``; returns its path. ``params`` are notebook
    01's flat parameters (``mimic_root``, ``openi_root``, ...; see :func:`cxrlib.datasets.build.notebook_params`).
    The skips are written beside it as ``<name>.skips.csv`` (every listed item left out, with its reason)."""
    from cxrlib.datasets import build_study_table, save_study_table
    from cxrlib.datasets.build import notebook_params
    from cxrlib.io import atomic_path

    check_eval_set(name)
    table, skips = build_study_table(name, **notebook_params(name, **params))
    out = save_study_table(table, paths.ensure_dir(paths.processed_dir()) / f"{name}.parquet")
    with atomic_path(out.with_name(f"{name}.skips.csv"), suffix=".csv") as tmp:
        skips.to_csv(tmp, index=False)
    return out


def embed(name: str, backbone: str, checkpoint: str | os.PathLike | None = None, **embed_kw) -> Path:
    """Embed evaluation set ``name`` with ``backbone`` (an adapted one needs its ``checkpoint``) into
    ``paths.embeddings_dir()/<name>/<backbone key>/``; returns that folder."""
    from cxrlib.dag import embedding_dir
    from cxrlib.embed import extract_embeddings

    table = paths.study_table_path(name)
    if not table.is_file():
        raise FileNotFoundError(f"no study table for evaluation set {name!r} at {table}: run "
                                f"`python -m cxrlib.evalsets {name}` first")
    from cxrlib.backbones import base_name, is_adapted

    if is_adapted(backbone) and checkpoint is None:
        raise ValueError(f"{backbone!r} is an adapted backbone: give its checkpoint (notebook 00 writes it to "
                         f"data/models/<training dataset>/{backbone}.pt)")
    out = embedding_dir(name, backbone)
    extract_embeddings(table, base_name(backbone), out, checkpoint=checkpoint, name=backbone, **embed_kw)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.evalsets", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(EVAL_SETS))
    ap.add_argument("--backbones", nargs="+", default=[], help="backbones to embed the set with")
    ap.add_argument("--checkpoint", action="append", default=[], metavar="BACKBONE=PATH",
                    help="adapted backbone checkpoint (repeatable)")
    ap.add_argument("--mimic-root", default=None)
    ap.add_argument("--openi-root", default=None)
    ap.add_argument("--params", default=None, help="YAML of notebook 01's parameters (make passes them); those "
                                                   "the set's builder takes are used (table_params), "
                                                   "--mimic-root/--openi-root override them")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    checkpoints = dict(c.split("=", 1) for c in args.checkpoint)
    params = table_params(args.name, yaml.safe_load(Path(args.params).read_text()) or {}) if args.params else {}
    params.update({k: v for k, v in (("mimic_root", args.mimic_root), ("openi_root", args.openi_root)) if v})
    path = build_table(args.name, **params)
    print(f"{args.name}: study table {path}")
    for b in args.backbones:
        print(f"{args.name}: {b} -> {embed(args.name, b, checkpoints.get(b), device=args.device)}")


if __name__ == "__main__":
    main()
