"""Refresh README.md's generated blocks, so no number in it is typed by hand.

``python -m cxrlib.readme [--profile offline]`` replaces the text between
``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers:

* ``make-help``: the output of ``make help``;
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

from cxrlib import paths, report
from cxrlib.io import atomic_path

KEY_FIGURES = ("retrieval_label_precision_raw_at_k", "retrieval_recall_merged_at_k",
               "embedding_tsne_image_label", "ablation_heatmap", "text_bench")


def replace_block(text: str, name: str, body: str) -> str:
    """Replace the body of the ``name`` block; a missing marker pair is an error naming it."""
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


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
    if with_results:
        text = replace_block(text, "demo-results", demo_block(profile, paths.repo_root() / "docs" / "demo"))
        from cxrlib import check_demo

        check_demo.write_reference(profile)  # the values make check-demo compares a later run against
    with atomic_path(readme) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.readme")
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--help-only", action="store_true", help="refresh only the make-help block")
    args = ap.parse_args(argv)
    try:
        update(paths.repo_root() / "README.md", args.profile, with_results=not args.help_only)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
