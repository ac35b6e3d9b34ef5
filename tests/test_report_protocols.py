"""Rendered tables name each protocol and its chance level, notes are one line per protocol, and the
LaTeX tables fit an article page (compiled with pdflatex where it is installed)."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest

from cxrlib import protocols, report
from cxrlib.datasets.table import report_groups
from cxrlib.pairs import PairedSplit


def _split(seed: int, n: int = 60, d: int = 8) -> PairedSplit:
    rng = np.random.default_rng(seed)
    reports = pd.Series(rng.choice(["No acute disease.", "no acute disease", "Effusion.", "Cardiomegaly.",
                                    "Edema and effusion."], n))
    base = {t: rng.standard_normal(d) for t in reports.unique()}
    txt = np.stack([base[t] for t in reports]) + 0.3 * rng.standard_normal((n, d))
    img = txt + rng.standard_normal((n, d))
    norm = lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # noqa: E731
    findings = (rng.random((n, 4)) < 0.3).astype(np.float32)
    ids = np.array([f"s{i}" for i in range(n)])
    return PairedSplit(img=norm(img), txt=norm(txt), labels=(findings.sum(1) > 0).astype(np.int64), study_ids=ids,
                       patient_ids=np.array([f"p{i // 2}" for i in range(n)]), image_ids=ids,
                       report_groups=report_groups(reports)[0], findings=findings,
                       table=pd.DataFrame({"report": reports}))


@pytest.fixture(scope="module")
def rendered():
    scores = {name: protocols.protocol_scores(_split(seed), name, ks=(1, 5, 10))
              for seed, name in enumerate(["Tuned", "Frozen A", "Frozen B"])}
    df = pd.concat([protocols.summarise(s, n_boot=20) for s in scores.values()], ignore_index=True)
    paired = pd.concat([protocols.compare(scores["Tuned"], scores[b], n_boot=20, n_perm=50)
                        for b in ("Frozen A", "Frozen B")], ignore_index=True)
    return df, paired, report.render_results(df, paired, subtitle="SYNTHETIC", eval_set="openi_test")


def test_every_protocol_and_model_in_the_tidy_table(rendered):
    df, _, _ = rendered
    have = df[df["value"].notna()]
    expected = set(protocols.PROTOCOLS) - {"label_match_class"}  # no one-hot class column here
    assert set(have["protocol"]) == expected
    for protocol in expected:
        assert set(have.loc[have["protocol"] == protocol, "model"]) == {"Tuned", "Frozen A", "Frozen B"}
    assert have["ci_low"].notna().any() and have["chance"].notna().any()


def test_tables_name_protocol_and_chance(rendered):
    df, _, r = rendered
    md = r.markdown
    for sec in report.SECTIONS:
        if sec.protocol != "label_match_class":
            assert f"Protocol `{sec.protocol}`; follows" in md
    strict = r.tables[report.SECTIONS[0].title]
    chance = strict[strict["Model"] == report.CHANCE_ROW]
    assert len(chance) == 2  # one per direction
    expected = df[(df.protocol == "strict") & (df.metric == "recall") & (df.k == 1) & (df.query_class == "all")]
    assert chance["R@1"].iloc[0] == report.format_value("recall", expected["chance"].iloc[0])
    assert "No published number" in md  # openi_test: no published setting matches


def test_notes_are_one_line_per_protocol(rendered):
    df, _, r = rendered
    notes = r.markdown.split("## Notes (one line per protocol)")[1].strip().splitlines()
    assert len(notes) == len(set(df.loc[df["note"].fillna("") != "", "protocol"]))
    assert any(line.startswith("- **label_match_class**: protocol skipped") for line in notes)


def test_paired_tables_per_protocol_and_direction_with_distinct_labels(rendered):
    _, paired, r = rendered
    keys = [k for k in r.tables if k.startswith("Paired comparison")]
    assert len(keys) == paired.groupby(["protocol", "direction"]).ngroups
    for k in keys:
        t = r.tables[k]
        for _comp, part in t.groupby("Comparison"):
            assert part["Metric"].is_unique  # no two metrics share a label within a table


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
def test_latex_tables_compile_and_fit_the_page(rendered, tmp_path):
    _, _, r = rendered
    tables = re.findall(r"\\begin\{table\}.*?\\end\{table\}", r.latex, flags=re.S)
    assert tables
    for i, t in enumerate(tables):
        doc = ("\\documentclass{article}\n\\usepackage{booktabs}\n\\usepackage{graphicx}\n\\begin{document}\n"
               + t + "\n\\clearpage\n\\end{document}\n")
        (tmp_path / f"t{i}.tex").write_text(doc)
        out = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"t{i}.tex"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
        log = (tmp_path / f"t{i}.log").read_text(errors="replace")
        assert out.returncode == 0, log[-2000:]
        assert "Overfull \\hbox" not in log, f"table {i} is wider than the text"
        assert "Float too large" not in log, f"table {i} is taller than the page"
