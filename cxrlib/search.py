"""Search with a model of a profile's comparison, from Python and the command line.

A model is found by the name notebook 03 gives it (``configs/<profile>.yaml``, ``03_retrieval_eval.models``,
with ``{backbone}`` / ``{run}`` filled exactly as ``make`` fills them): a frozen backbone's cached
embeddings, optionally passed through a trained projector run. The gallery is one split of the study
table (``test`` by default, the split notebook 03 scores); queries are a new image, a typed report, or a
study of the table (its cached embedding).

>>> r = Retriever.from_run("offline", "offline-adapted + projector")     # doctest: +SKIP
>>> r.by_text("small left pleural effusion", k=5)                        # doctest: +SKIP

``python -m cxrlib.search --profile offline --model "offline-adapted + projector" --text "..." -k 5``
prints a table (``--json`` for machines, ``--image FILE`` for an image query, ``--study ID``,
``--export DIR`` for parquet files of projected embeddings and every gallery study's ranked list).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from cxrlib import paths
from cxrlib.pairs import PairedSplit

#: columns of every result table, in order
RESULT_COLUMNS = ("query", "rank", "study_id", "score", "label_abnormal", "findings", "report",
                  "image_path", "report_group", "same_text_as_rank", "is_query_study")
#: which gallery side a query of each modality ranks (cross-modal retrieval)
TARGET = {"image": "text", "text": "image"}
NODE = "03_retrieval_eval"


class SearchError(ValueError):
    """A search that cannot run: an unknown profile or model, a bad query, missing inputs; says which."""


def _plan(profile: str):
    """The DAG of ``profile`` as make resolves it (:func:`cxrlib.dag.plan`), as a :class:`SearchError`."""
    from cxrlib import config, dag, settings

    try:
        return dag.plan(profile)
    except (config.ConfigError, settings.SettingError) as exc:
        raise SearchError(str(exc)) from None


def model_specs(profile: str) -> dict[str, Any]:
    """``{name: ModelSpec}`` of the models notebook 03 compares under ``profile`` (``{backbone}`` and
    ``{run}`` filled with the training backbone and the main run, as make fills them)."""
    from cxrlib.interactive import make_params
    from cxrlib.models import ModelSpec

    plan = _plan(profile)
    params = make_params(profile, NODE)
    specs = [ModelSpec.parse(m, backbone=plan.train_key, run=plan.run) for m in params["models"]]
    return {s.name: s for s in specs}


def embed_target(profile: str) -> str:
    """The make command that builds ``profile``'s study table and embedding sets."""
    return f"make embed PROFILE={profile}"


def build_target(profile: str) -> str:
    """The make command that builds ``profile``'s embeddings and runs."""
    return {"offline": "make demo", "smoke": "make smoke"}.get(profile, f"make paper PROFILE={profile}")


@dataclass
class Retriever:
    """Ranked search over one split of a profile's study table with one model of its comparison.

    ``gallery`` holds the split's (projected) embeddings; ``encoder`` (the backbone that made the
    cached embeddings) is loaded on the first image or text query only.
    """

    profile: str
    model: str
    dataset: str
    backbone: str
    run: str | None
    gallery: PairedSplit
    device: str = "cpu"
    batch_size: int = 64
    projector: torch.nn.Module | None = None
    _encoder: Any = field(default=None, repr=False)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_run(cls, profile: str, model: str, split: str | None = None, device: str = "auto",
                 batch_size: int = 64) -> Retriever:
        """The model named ``model`` in notebook 03 under ``profile``; an unknown name lists the valid ones."""
        from cxrlib import dag
        from cxrlib.embed import resolve_device
        from cxrlib.interactive import make_params
        from cxrlib.models import load_checked_projector
        from cxrlib.pairs import load_paired

        specs = model_specs(profile)
        if model not in specs:
            raise SearchError(f"unknown model {model!r} for profile {profile!r}; choose one of {list(specs)}")
        spec, params = specs[model], make_params(profile, NODE)
        dataset, split = params["dataset"], split or params.get("split", "test")
        device = resolve_device(device)
        try:
            data = load_paired(dataset, spec.backbone, (split,), _finding_columns())[split]
        except FileNotFoundError as exc:
            raise SearchError(f"model {model!r}: {exc}. Build the study table and the embeddings of "
                              f"{spec.backbone!r} with `{embed_target(profile)}`") from None
        projector = None
        if spec.run is not None:
            ckpt = paths.readable(dag.run_dir(profile, dataset, spec.run) / "projector.pt")
            if not ckpt.is_file():
                raise SearchError(f"model {model!r}: no projector checkpoint at {ckpt}; train it with "
                                  f"`{build_target(profile)}` (notebook 02_train, run {spec.run!r})")
            try:
                projector, _ = load_checked_projector(ckpt, spec.backbone, dataset,
                                                      (data.img.shape[1], data.txt.shape[1]), map_location=device)
            except ValueError as exc:
                raise SearchError(str(exc)) from None
            projector = projector.to(device).eval()
        self = cls(profile=profile, model=model, dataset=dataset, backbone=spec.backbone, run=spec.run,
                   gallery=data, device=device, batch_size=batch_size, projector=projector)
        if projector is not None:
            self.gallery = PairedSplit(**{**vars(data), "img": self._project(data.img, "image"),
                                          "txt": self._project(data.txt, "text")})
        return self

    # ---- encoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def _project(self, x: np.ndarray, modality: str) -> np.ndarray:
        """Backbone embeddings -> the search space (the projector's, or the backbone's own)."""
        if self.projector is None:
            return np.asarray(x, np.float32)
        from cxrlib.models import encode

        return encode(self.projector, x, modality, device=str(self.device))

    def encoder(self):
        """The backbone that made the gallery's cached embeddings (adapted checkpoint included), checked
        against the cache's fingerprint so a query and the gallery are always in one space."""
        if self._encoder is None:
            from cxrlib.backbones import load_backbone
            from cxrlib.dag import embedding_dir

            emb_dir = embedding_dir(self.dataset, self.backbone)
            stamp = json.loads((emb_dir / "done.json").read_text()) if (emb_dir / "done.json").is_file() else {}
            source = stamp.get("source_backbone", self.backbone)
            checkpoint = stamp.get("checkpoint")
            if checkpoint and not Path(checkpoint).is_file():
                raise SearchError(f"the embeddings of {self.backbone!r} were made with checkpoint {checkpoint}, "
                                  f"which no longer exists; rebuild it with `{build_target(self.profile)}`")
            backbone = load_backbone(source, device=self.device, checkpoint=checkpoint)
            if stamp.get("fingerprint") and stamp["fingerprint"] != backbone.fingerprint:
                raise SearchError(f"backbone {source!r} (checkpoint {checkpoint}) is not the one that made the "
                                  f"cached embeddings in {emb_dir}; rebuild them with `{build_target(self.profile)}`")
            precision = stamp.get("precision", "fp32")
            if precision == "fp16" and not self.device.startswith("cuda") or precision not in ("fp32", "bf16", "fp16"):
                precision = "fp32"
            self._encoder = (backbone, precision)
        return self._encoder

    def _encode(self, items: list, modality: str) -> np.ndarray:
        from cxrlib.embed import _encode

        backbone, precision = self.encoder()
        out = []
        for s in range(0, len(items), self.batch_size):
            chunk = items[s:s + self.batch_size]
            x = torch.stack([backbone.preprocess(im) for im in chunk]) if modality == "image" else chunk
            out.append(_encode(backbone.model, modality, x, backbone.tokenizer, self.device, precision))
        return self._project(np.concatenate(out), modality)

    # ---- queries -----------------------------------------------------------------------------
    def by_text(self, report: str | Sequence[str], k: int = 10) -> pd.DataFrame:
        """Gallery images ranked for each report (text -> image); one block of ``k`` rows per query."""
        reports = [report] if isinstance(report, str) else list(report)
        for i, r in enumerate(reports):
            if not isinstance(r, str) or not r.strip():
                raise SearchError(f"report {i} is empty: type the findings to search for")
        return self._rank(self._encode([r.strip() for r in reports], "text"), "text", k)

    def by_image(self, image: str | os.PathLike | np.ndarray | Any | Sequence, k: int = 10) -> pd.DataFrame:
        """Gallery reports ranked for each image (image -> text): a file path, a numpy array
        (H x W grey or H x W x 3, any dtype), a PIL image, or a list of these."""
        items = list(image) if isinstance(image, (list, tuple)) else [image]
        return self._rank(self._encode([_as_pil(x) for x in items], "image"), "image", k)

    def by_study(self, study_id: str | Sequence[str], k: int = 10, modality: str = "image") -> pd.DataFrame:
        """Rank the other side for gallery studies, from their cached ``modality`` embedding
        (``image``: the study's radiograph ranks reports; ``text``: its report ranks images)."""
        if modality not in TARGET:
            raise SearchError(f"modality must be 'image' or 'text', got {modality!r}")
        ids = [study_id] if isinstance(study_id, str) else [str(s) for s in study_id]
        index = {s: i for i, s in enumerate(self.gallery.study_ids)}
        missing = [s for s in ids if s not in index]
        if missing:
            raise SearchError(f"study ids {missing[:5]} are not in the gallery ({len(index)} studies of "
                              f"{self.dataset!r}, e.g. {list(index)[:3]})")
        rows = [index[s] for s in ids]
        queries = (self.gallery.img if modality == "image" else self.gallery.txt)[rows]
        return self._rank(queries, modality, k, query_ids=ids)

    def _rank(self, queries: np.ndarray, modality: str, k: int, query_ids: list[str] | None = None) -> pd.DataFrame:
        from cxrlib.retrieval import topk_similarity

        g = self.gallery
        gallery = g.txt if TARGET[modality] == "text" else g.img
        if not 1 <= k <= len(gallery):
            raise SearchError(f"k must be between 1 and the gallery size ({len(gallery)}), got {k}")
        dev = self.device if self.device.startswith("cuda") else "cpu"
        scores, idx = topk_similarity(torch.as_tensor(queries, device=dev), torch.as_tensor(gallery, device=dev), k)
        return result_table(g, scores, idx, query_ids)

    # ---- export ------------------------------------------------------------------------------
    def export(self, out_dir: str | os.PathLike, k: int = 10) -> dict[str, Path]:
        """Write ``embeddings.parquet`` (the gallery's projected embeddings) and, for every gallery study
        as a query, ``ranked_image_to_text.parquet`` / ``ranked_text_to_image.parquet`` (top ``k``)."""
        from cxrlib.io import atomic_path

        out_dir = paths.ensure_dir(Path(out_dir))
        g = self.gallery
        emb = pd.DataFrame({"study_id": g.study_ids, "image_id": g.image_ids, "label_abnormal": g.labels,
                            "image_embedding": list(g.img.astype(np.float32)),
                            "text_embedding": list(g.txt.astype(np.float32))})
        frames = {"embeddings": emb}
        for modality in ("image", "text"):
            ranked = self.by_study(list(g.study_ids), k=min(k, len(g)), modality=modality)
            frames[f"ranked_{modality}_to_{TARGET[modality]}"] = ranked.drop(columns=["report", "image_path"])
        written = {}
        meta = {"profile": self.profile, "model": self.model, "backbone": self.backbone, "run": self.run or ""}
        for name, frame in frames.items():
            frame = frame.copy()
            frame.attrs = meta
            with atomic_path(out_dir / f"{name}.parquet") as tmp:
                frame.to_parquet(tmp, index=False)
            written[name] = out_dir / f"{name}.parquet"
        return written


def _finding_columns() -> list[str]:
    from cxrlib.datasets.labels import FINDING_LABELS

    return [c for c in FINDING_LABELS if c != "No Finding"]


def result_table(g: PairedSplit, scores: np.ndarray, idx: np.ndarray, query_ids: list[str] | None = None) -> pd.DataFrame:
    """One row per (query, rank): the gallery study, its score, labels, report and image path;
    ``same_text_as_rank`` names the first higher rank with the identical report text (duplicates)."""
    names = _finding_columns()
    cols = [c for c in names if c in g.table.columns]
    rows = []
    for q in range(len(idx)):
        first_rank: dict[int, int] = {}
        for r, (j, s) in enumerate(zip(idx[q], scores[q]), start=1):
            grp = int(g.report_groups[j])
            row = g.table.iloc[int(j)]
            rows.append({
                "query": q, "rank": r, "study_id": str(g.study_ids[j]), "score": float(s),
                "label_abnormal": int(g.labels[j]),
                "findings": ", ".join(c for c in cols if row[c] == 1),
                "report": str(row.get("report", "")), "image_path": str(row.get("image_path", "")),
                "report_group": grp, "same_text_as_rank": first_rank.get(grp),
                "is_query_study": bool(query_ids is not None and str(g.study_ids[j]) == query_ids[q]),
            })
            first_rank.setdefault(grp, r)
    out = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    out["same_text_as_rank"] = out["same_text_as_rank"].astype("Int64")
    return out


def _as_pil(x):
    """A query image as an 8-bit RGB PIL image; an unreadable file or bad array names the problem."""
    from PIL import Image

    from cxrlib.images import ImageReadError, _to_uint8, load_cxr_image

    if isinstance(x, (str, os.PathLike)):
        try:
            return load_cxr_image(x)
        except ImageReadError as exc:
            raise SearchError(str(exc)) from None
    if isinstance(x, Image.Image):
        return x.convert("L").convert("RGB")
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3].mean(2) if arr.dtype != np.uint8 else np.asarray(Image.fromarray(arr[..., :3]).convert("L"))
    if arr.ndim != 2 or min(arr.shape) < 2 or not np.isfinite(arr).all():
        raise SearchError(f"a query image array must be finite H x W or H x W x 3, got shape {arr.shape}")
    return Image.fromarray(_to_uint8(arr)).convert("RGB")


# ---- command line --------------------------------------------------------------------------------

def _format_table(df: pd.DataFrame, width: int = 70) -> str:
    show = df.drop(columns=["report_group", "is_query_study"]).copy()
    show["score"] = show["score"].map(lambda s: f"{s:.3f}")
    show["report"] = show["report"].map(lambda t: t if len(t) <= width else t[: width - 1] + "…")
    show["same_text_as_rank"] = show["same_text_as_rank"].map(lambda r: "" if pd.isna(r) else f"= #{r}")
    show = show.rename(columns={"same_text_as_rank": "dup", "label_abnormal": "abnormal"})
    return show.to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    from cxrlib import config

    ap = argparse.ArgumentParser(prog="python -m cxrlib.search", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default=os.environ.get("CXR_PROFILE", "paper"),
                    help=f"one of {config.available_profiles()}")
    ap.add_argument("--model", help="a model name of notebook 03 (omit to list them)")
    q = ap.add_mutually_exclusive_group()
    q.add_argument("--text", help="a report to search images for")
    q.add_argument("--image", help="an image file to search reports for")
    q.add_argument("--study", help="a gallery study id (its image searches reports)")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--split", default=None, help="gallery split (default: the one notebook 03 scores)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the results as JSON records")
    ap.add_argument("--export", metavar="DIR", help="write embeddings and every study's ranked list as parquet")
    args = ap.parse_args(argv)
    try:
        specs = model_specs(args.profile)
        if not args.model:
            print(f"models of profile {args.profile!r}: " + ", ".join(repr(n) for n in specs))
            return 0 if not (args.text or args.image or args.study) else 2
        retriever = Retriever.from_run(args.profile, args.model, split=args.split, device=args.device)
        if args.export:
            for name, path in retriever.export(args.export, k=args.k).items():
                print(f"{name:24s} {path}")
        if args.text is not None:
            out = retriever.by_text(args.text, args.k)
        elif args.image is not None:
            out = retriever.by_image(args.image, args.k)
        elif args.study is not None:
            out = retriever.by_study(args.study, args.k)
        else:
            return 0 if args.export else _usage(ap)
    except SearchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(json.loads(out.drop(columns=["query"]).to_json(orient="records")), indent=1))
    else:
        print(f"{args.model} ({args.profile}): top {args.k} of {len(retriever.gallery)} "
              f"{retriever.dataset} {args.split or 'test'} studies")
        print(_format_table(out.drop(columns=["query"])))
    return 0


def _usage(ap: argparse.ArgumentParser) -> int:
    ap.print_usage(sys.stderr)
    print("error: give a query: --text, --image or --study", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
