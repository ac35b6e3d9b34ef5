"""Refresh README.md's generated blocks, so no number in it is typed by hand.

``python -m cxrlib.readme [--profile offline]`` replaces the text between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* ``make-help``: the output of ``make help``;
* ``choices``: the "Choices the paper leaves open" table; its prose (:data:`CHOICES`) names no default,
  the parameter column renders each default from :mod:`cxrlib.settings` (or, for a node-local
  parameter, the notebook's ``parameters`` cell), so no default is restated by hand;
* ``demo-results``: the headline tables of ``results/<profile>/`` (retrieval summary, paired tests,
  ablation, embedding metrics) and links to key figures, which are copied (PNG) into ``docs/demo/``
  because ``figures/`` is git-ignored. The block names the command, commit and date of the run.
  Its headline cells (values and CIs) go to ``docs/demo/reference.json`` for ``make check-demo``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from cxrlib import config, paths, report, settings
from cxrlib.io import atomic_path

KEY_FIGURES = ("retrieval_label_precision_raw_at_k", "retrieval_recall_merged_at_k",
               "embedding_tsne_image_label", "ablation_heatmap", "text_bench")


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the body of the ``name`` block; a missing marker pair is an error naming it."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


#: the README table "Choices the paper leaves open": (detail, the choice in words, node, parameters); a row
#: without parameters names the module that fixes the choice instead of a node. The words never state a
#: default: the last column renders each parameter's (:func:`parameter_default`).
CHOICES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("dataset", "Open-I, one image per study of the chosen view (MIMIC-CXR-JPG optional)", settings.DATA,
     ("dataset", "view", "one_image_per_study")),
    ("normal vs abnormal", "Open-I: MeSH major term `normal`; studies indexed \"No Indexing\" follow `no_indexing`. "
     "MIMIC: the rule `mimic_normal_rule` on the CheXpert (or NegBio) table, uncertain (-1) values as "
     "`mimic_uncertain` says", settings.DATA,
     ("no_indexing", "mimic_normal_rule", "mimic_uncertain", "mimic_labeler")),
    ("finding labels", "the CheXpert labels, from MeSH by a documented rule table (Open-I) or the CheXpert/NegBio "
     "tables (MIMIC)", "`cxrlib/datasets/labels.py` (`MESH_RULES`)", ()),
    ("report text", "the sections `text_sections` names, falling back to whichever is non-empty (`longest` takes "
     "the longer section by characters, not CXR-CLIP's lexicographic `max`); Open-I's `XXXX` token as `anon` says",
     settings.DATA, ("text_sections", "anon")),
    ("splits", "seeded, patient-level, stratified by label (MIMIC: the official split unless `mimic_split` says "
     "otherwise). Open-I has no patient ids, so a study is its own patient", settings.DATA,
     ("val_frac", "test_frac", "mimic_split", "seed")),
    ("duplicate reports", "counted and grouped (`report_group`); exact-pair metrics on the raw gallery and on the "
     "merged one (one item per report group: its re-normalised mean embedding)",
     "`cxrlib/retrieval.py`, `cxrlib/protocols.py`", ()),
    ("backbone", "BiomedCLIP frozen; general baseline OpenAI CLIP ViT-B/16 (same image tower and input size, "
     "same embedding width; only the pretraining data and text tower differ; `cxrlib/backbones.py`)",
     settings.TRAIN, ("backbone",)),
    ("projector", "per modality a head of kind `kind` (`residual_mlp`: `x + W2·act(W1·x)`, output layer "
     "zero-initialised so training starts at the backbone's own space); one classifier on the projected "
     "embeddings of the modalities `bce_on` names", settings.TRAIN,
     ("kind", "width", "depth", "dropout", "activation", "out_dim", "classifier_hidden", "bce_on")),
    ("loss", "the weighted sum of the terms registered in `cxrlib.losses`: CLIP (temperature learnable unless "
     "`learn_temperature` is false, logit scale clamped at `projector.MAX_LOGIT_SCALE`), cross-modal SupCon "
     "(image anchors vs text references and the reverse, all same-label items positive), BCE", settings.TRAIN,
     (*(f"{settings.WEIGHT_PREFIX[settings.TRAIN]}{t}" for t in settings.loss_terms()), "clip_temperature",
      "learn_temperature", "supcon_temperature", "pos_weight")),
    ("optimisation", "AdamW (weight decay on weight matrices only), linear warm-up then cosine decay, early "
     "stopping on validation label-match P@`eval_k` (both directions averaged)", settings.TRAIN,
     ("lr", "weight_decay", "warmup_epochs", "epochs", "batch_size", "patience", "min_delta", "eval_k")),
    ("metrics", "every protocol of `cxrlib.protocols` side by side: exact-pair R@K, MRR, median rank; label-match "
     "P@K, Hit@K, mAP, overall and per class; finding-overlap P@K, Hit@K, mAP; graded nDCG@K", settings.EVAL,
     ("ks", "protocols")),
    ("uncertainty", "percentile bootstrap CIs resampling patients; paired bootstrap CI of the difference and a "
     "patient-level sign-flip permutation p-value", settings.EVAL, ("n_boot", "n_perm")),
    ("embedding maps", "t-SNE (PCA first; openTSNE above a size threshold) and UMAP (cosine), seeded; silhouette, "
     "k-NN label accuracy and modality-centroid gap in the original space", settings.VIZ,
     ("methods", "pca_dims", "perplexity", "n_neighbors", "min_dist", "sample_size", "k")),
    ("backbone adaptation", "off in the paper profile (`adapt: false` in `configs/paper.yaml`: the paper freezes "
     "the backbone); the offline profile adapts its untrained image tower (`configs/offline.yaml`)", settings.ADAPT,
     (*(f"{settings.WEIGHT_PREFIX[settings.ADAPT]}{t}" for t in settings.loss_terms()), "adapt_epochs",
      "adapt_lr", "adapt_batch_size", "lock_text")),
)


def parameter_default(node: str, name: str) -> object:
    """The default of ``node``'s parameter ``name``: its :mod:`cxrlib.settings` entry, else (a node-local
    parameter) the literal in the notebook's ``parameters`` cell; an unknown name is an error naming it."""
    s = settings.lookup(node, name)
    if s is not None:
        return s.default
    local = config.notebook_parameters(paths.repo_root() / "notebooks" / f"{node}.ipynb")
    if name not in local:
        raise ValueError(f"README choices: {name!r} is neither a setting nor a parameter of {node}")
    return local[name]


def format_default(value: object) -> str:
    """A default as the README shows it: ``[1, 5, 10]``, ``0.001``, ``None``, ``findings+impression``."""
    return str(value)


def choices_block() -> str:
    """The "Choices the paper leaves open" table, every default rendered from where it is defined."""
    lines = ["| detail | choice | set by (default) |", "|---|---|---|"]
    for detail, words, node, names in CHOICES:
        where = (f"`{node}`: " + ", ".join(f"`{n}` = `{format_default(parameter_default(node, n))}`" for n in names)
                 if names else node)
        lines.append(f"| {detail} | {words} | {where} |")
    return "\n".join(lines) + "\n"


def make_help() -> str:
    out = subprocess.run(["make", "--no-print-directory", "help"], cwd=paths.repo_root(), capture_output=True,
                         text=True, check=True).stdout
    return "```text\n" + out.strip("\n") + "\n```\n"


def _headline_retrieval(results: pd.DataFrame) -> pd.DataFrame:
    """Models x (R@1/R@5 merged, P@5, mAP) per direction, overall queries."""
    from cxrlib.check_demo import HEADLINE as cols  # the cells make check-demo compares
    rows = []
    for model in dict.fromkeys(results["model"]):
        for direction in ("image_to_text", "text_to_image"):
            row = {"Model": model, "Direction": report.DIRECTION_LABELS[direction]}
            for metric, gallery, k in cols:
                sel = results[(results["model"] == model) & (results["direction"] == direction)
                              & (results["gallery"] == gallery) & (results["metric"] == metric)
                              & (results["query_class"] == "all")]
                sel = sel[sel["k"].isna()] if k is None else sel[sel["k"] == k]
                name = report.METRIC_LABELS[metric].format(k=k or "") + (" merged" if gallery == "merged" else "")
                row[name] = (report.format_cell(metric, *sel.iloc[0][["value", "ci_low", "ci_high"]])
                             if len(sel) else "n/a")
            rows.append(row)
    return pd.DataFrame(rows)


def demo_block(profile: str, docs_dir: Path) -> str:
    res, fig = paths.results_dir(profile), paths.figures_dir(profile)
    manifest = json.loads((res / "run_manifest.json").read_text())
    commit = (manifest["git"]["commit"] or "?")[:10] + (" (dirty tree)" if manifest["git"]["dirty"] else "")
    seconds = sum(manifest.get("node_seconds", {}).values())
    cmd = "make demo" if profile == "offline" else f"make paper PROFILE={profile}"
    lines = [f"**{'OFFLINE DEMO — real Open-I reports + synthetic radiographs, not real images' if profile == 'offline' else profile}.**",
             f"Made by `{cmd}` at commit `{commit}` on {manifest['created'][:10]} "
             f"({manifest['hardware'].get('cpu_count')} CPU cores, no GPU; node wall times sum to {seconds / 60:.1f} min). "
             "Values in percent with 95% bootstrap CIs resampling patients; test split.", ""]
    results = report.read_results(res / "retrieval.csv")
    lines += ["Retrieval (R@K on the gallery with identical reports merged; P@5 and mAP: same normal/abnormal label):",
              "", report.to_markdown(_headline_retrieval(results))]
    paired = res / "paired_tests.csv"
    if paired.is_file():
        df = pd.read_csv(paired)
        keep = (((df["metric"] == "recall") & (df["gallery"] == "merged") & (df["k"] == 5))
                | ((df["metric"] == "label_precision") & (df["k"] == 5)) | (df["metric"] == "label_map"))
        table = report.comparison_table(df[keep], metrics=("recall", "label_precision", "label_map"))
        lines += ["Paired comparisons on the same queries (difference, 95% CI, sign-flip p):", "",
                  report.to_markdown(table)]
    abl = res / "ablation.md"
    if abl.is_file():
        body = "\n".join(line for line in abl.read_text().splitlines() if not line.startswith("_"))
        lines += ["Loss-weight ablation (notebook 05):", "", body.strip(), ""]
    emb = res / "embedding_metrics.md"
    if emb.is_file():
        lines += ["Embedding-space numbers behind the t-SNE/UMAP maps (notebook 04; before = frozen, after = projector):",
                  "", emb.read_text().strip(), ""]
    text_md = res / "text_bench.md"
    if text_md.is_file():  # notebook 06: its tables without the long paired-test list (text_bench_paired.csv)
        body = text_md.read_text().split("### Paired tests")[0]
        body = "\n".join(line for line in body.splitlines() if not line.startswith("_"))
        lines += ["Text towers (notebook 06, Ko et al.'s report-side benchmarks on rule-based report rewrites):",
                  "", body.strip(), ""]
    docs_dir.mkdir(parents=True, exist_ok=True)
    figs = []
    for stem in KEY_FIGURES:
        src = fig / f"{stem}.png"
        if src.is_file():
            shutil.copyfile(src, docs_dir / src.name)
            figs.append(f"![{stem}](docs/demo/{src.name})")
    if figs:
        lines += ["Key figures (all of them: `figures/offline/`):", "", *figs]
    return "\n".join(lines) + "\n"


def update(readme: Path, profile: str = "offline", with_results: bool = True) -> None:
    text = readme.read_text()
    text = replace_block(text, "make-help", make_help())
    text = replace_block(text, "choices", choices_block())
    if with_results:
        text = replace_block(text, "demo-results", demo_block(profile, paths.repo_root() / "docs" / "demo"))
        from cxrlib import check_demo

        check_demo.write_reference(profile)  # the values make check-demo compares a later run against
    with atomic_path(readme) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.readme")
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--help-only", action="store_true",
                    help="refresh only the blocks that need no finished run (make help, the choices table)")
    args = ap.parse_args(argv)
    try:
        update(paths.repo_root() / "README.md", args.profile, with_results=not args.help_only)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
