"""``make check-demo``: does a finished ``results/offline/`` reproduce the README's numbers?

``make readme`` stores the headline values it renders (every model x direction x headline metric of
``retrieval.csv``, with their 95% bootstrap CIs) in :data:`REFERENCE` beside the README's figures.
This check reads the same cells from a finished run and prints, per cell, the reference value and
CI, this run's value, and whether it falls inside the reference CI; it exits 1 when one falls
outside or is missing, 2 when there is no finished run or no reference (naming what to run).
The CI, not equality, is the test, because a CPU without AVX2 or a GPU rounds differently
(:mod:`cxrlib.determinism`); identical cells are counted separately. The reference also keeps the
run's node parameters (``run_manifest.json``): a run made with other settings (``make demo W_SUPCON=0.5``)
is named as such, setting by setting, since its numbers are not expected to match.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from cxrlib import paths

#: (metric, gallery, k) of the README's headline retrieval table, in its column order
HEADLINE = (("recall", "merged", 1), ("recall", "merged", 5), ("label_precision", "raw", 5),
            ("label_map", "raw", None))
REFERENCE = Path("docs") / "demo" / "reference.json"
KEYS = ("model", "direction", "metric", "gallery", "k")


class NoRunError(FileNotFoundError):
    """No finished run (or no reference) to compare; the message names the command to run."""


def reference_path() -> Path:
    return paths.repo_root() / REFERENCE


def headline_values(results: pd.DataFrame) -> pd.DataFrame:
    """The headline cells of a tidy ``retrieval.csv`` (all queries), one row per model x direction x metric."""
    rows = []
    for model in dict.fromkeys(results["model"]):
        for direction in ("image_to_text", "text_to_image"):
            for metric, gallery, k in HEADLINE:
                sel = results[(results["model"] == model) & (results["direction"] == direction)
                              & (results["gallery"] == gallery) & (results["metric"] == metric)
                              & (results["query_class"] == "all")]
                sel = sel[sel["k"].isna()] if k is None else sel[sel["k"] == k]
                if len(sel) > 1:
                    raise ValueError(f"retrieval.csv has {len(sel)} rows for {model} {direction} {metric} "
                                     f"{gallery} k={k}; expected one")
                if len(sel):
                    r = sel.iloc[0]
                    rows.append({"model": model, "direction": direction, "metric": metric, "gallery": gallery,
                                 "k": k, "value": float(r["value"]), "ci_low": float(r["ci_low"]),
                                 "ci_high": float(r["ci_high"]), "n": int(r["n"])})
    return pd.DataFrame(rows, columns=[*KEYS, "value", "ci_low", "ci_high", "n"])


def finished_results(profile: str = "offline") -> pd.DataFrame:
    """``retrieval.csv`` of a finished run (its manifest written last by the DAG), else NoRunError."""
    from cxrlib import report

    res = paths.results_dir(profile)
    command = "make demo" if profile == "offline" else f"make paper PROFILE={profile}"
    if not (res / "run_manifest.json").is_file() or not (res / "retrieval.csv").is_file():
        raise NoRunError(f"no finished {profile} run in {res} (no run_manifest.json / retrieval.csv): "
                         f"run `{command}` first, then `make check-demo`")
    return report.read_results(res / "retrieval.csv")


def write_reference(profile: str = "offline", path: Path | None = None) -> Path:
    """Store the headline cells of the finished run (called by ``make readme``), atomically."""
    from cxrlib.io import atomic_path

    res = paths.results_dir(profile)
    values = headline_values(finished_results(profile))
    manifest = json.loads((res / "run_manifest.json").read_text())
    obj = {"profile": profile, "commit": (manifest.get("git") or {}).get("commit"),
           "created": manifest.get("created"), "determinism": manifest.get("determinism"),
           "parameters": manifest.get("parameters"), "values": json.loads(values.to_json(orient="records"))}
    path = path or reference_path()
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
    return path


def read_reference(path: Path | None = None) -> dict[str, Any]:
    path = path or reference_path()
    if not path.is_file():
        raise NoRunError(f"no reference values at {path}: `make demo` then `make readme` store them")
    return json.loads(path.read_text())


def compare(reference: pd.DataFrame, run: pd.DataFrame) -> pd.DataFrame:
    """One row per reference cell: reference value and CI, this run, ``inside`` the CI, ``identical``."""
    key = lambda df: df.assign(k=df["k"].map(lambda v: None if v is None or pd.isna(v) else int(v)))  # noqa: E731
    merged = key(reference).merge(key(run)[[*KEYS, "value"]].rename(columns={"value": "run"}), on=list(KEYS),
                                  how="left")
    merged["inside"] = (merged["run"] >= merged["ci_low"] - 1e-12) & (merged["run"] <= merged["ci_high"] + 1e-12)
    merged["identical"] = [not pd.isna(r) and math.isclose(r, v, abs_tol=1e-9)
                           for r, v in zip(merged["run"], merged["value"])]
    return merged


def setting_differences(reference: dict[str, dict] | None, run: dict[str, dict] | None) -> list[str]:
    """``<node>.<setting>: reference X, this run Y`` for each node parameter that differs (or is only in one of
    the two); empty where they agree or either side has no parameters recorded."""
    if not reference or not run:
        return []
    lines = []
    for node in sorted(set(reference) | set(run)):
        ref, got = reference.get(node) or {}, run.get(node) or {}
        for name in sorted(set(ref) | set(got)):
            if name not in ref or name not in got or ref[name] != got[name]:
                a, b = (repr(d[name]) if name in d else "not set" for d in (ref, got))
                lines.append(f"{node}.{name}: reference {a}, this run {b}")
    return lines


def render(table: pd.DataFrame) -> str:
    from cxrlib import report

    lines = [f"{'model':<30} {'direction':<16} {'metric':<12} {'reference [95% CI]':>22} {'this run':>9}  inside"]
    for r in table.itertuples():
        name = report.METRIC_LABELS[r.metric].format(k="" if r.k is None or pd.isna(r.k) else int(r.k))
        name += " merged" if r.gallery == "merged" else ""
        ref = f"{100 * r.value:.1f} [{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]"
        run = "missing" if pd.isna(r.run) else f"{100 * r.run:.1f}"
        verdict = "yes" if r.inside else "NO"
        lines.append(f"{str(r.model)[:30]:<30} {report.DIRECTION_LABELS[r.direction]:<16} {name:<12} "
                     f"{ref:>22} {run:>9}  {verdict}{' (identical)' if r.identical else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cxrlib.check_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="offline")
    ap.add_argument("--reference", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        run = headline_values(finished_results(args.profile))  # first: before any demo run, name make demo
        ref = read_reference(args.reference)
    except (NoRunError, ValueError) as exc:
        print(f"check-demo: {exc}", file=sys.stderr)
        return 2
    table = compare(pd.DataFrame(ref["values"]), run)
    print(f"check-demo: {paths.results_dir(args.profile)} against {args.reference or REFERENCE} "
          f"(reference commit {str(ref.get('commit'))[:10]}; values in percent)")
    print(render(table))
    outside = int((~table["inside"]).sum())
    print(f"{len(table) - outside}/{len(table)} headline numbers inside the reference 95% CI "
          f"({int(table['identical'].sum())} identical); "
          + ("PASS" if outside == 0 else f"FAIL: {outside} outside or missing"))
    manifest = json.loads((paths.results_dir(args.profile) / "run_manifest.json").read_text())
    differ = setting_differences(ref.get("parameters"), manifest.get("parameters"))
    if differ:
        print(f"this run's settings differ from the reference's in {len(differ)} place(s), so its numbers need "
              "not match; `make demo` with the profile's defaults reproduces the reference:\n  "
              + "\n  ".join(differ))
    return 0 if outside == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
