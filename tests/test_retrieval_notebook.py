"""Notebook 03 through papermill on a fixture study table, two embedding caches and a projector run."""

from __future__ import annotations

import nbformat
import numpy as np
import pandas as pd
import pytest
from nbexec import run_notebook
from PIL import Image

from cxrlib import config, paths
from cxrlib.datasets.labels import FINDING_LABELS
from cxrlib.datasets.table import save_study_table
from cxrlib.embstore import Embeddings, save_embeddings


def write_fixture(root, n: int = 48, dim: int = 16, seed: int = 0) -> None:
    """Study table (36 test + 12 train rows, repeated reports), caches `tiny` and `tiny-adapted`, run `main`."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 3 != 0).astype(int)
    reports = np.where(labels == 1, np.array(["Cardiomegaly.", "Small effusion.", "Left opacity."])[np.arange(n) % 3],
                       "No acute disease.")
    img_dir = root / "imgs"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = img_dir / f"i{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(path)
        finding = {f: 0.0 for f in FINDING_LABELS}
        finding["No Finding"] = float(labels[i] == 0)
        finding[["Cardiomegaly", "Pleural Effusion", "Lung Opacity"][i % 3]] = float(labels[i])
        rows.append({"study_id": f"s{i}", "patient_id": f"p{i // 2}", "image_id": f"i{i}", "image_path": str(path),
                     "view": "frontal", "findings": "", "impression": reports[i], "report": reports[i],
                     "text_sections": "impression", "label_abnormal": int(labels[i]), **finding,
                     "split": "test" if i < 36 else "train", "report_dup_count": 1, "source": "fixture"})
    table = pd.DataFrame(rows)
    table["report_group"] = pd.factorize(table["report"])[0]
    save_study_table(table, paths.study_table_path("fixture"))
    base = rng.standard_normal((n, dim))
    for key in ("tiny", "tiny-adapted"):
        for modality, id_col in (("image", "image_id"), ("text", "study_id")):
            x = base + rng.standard_normal((n, dim)) * (1.0 if key == "tiny" else 0.5)
            x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
            save_embeddings(paths.embeddings_dir() / "fixture" / key / f"{modality}.npz", Embeddings(
                table[id_col], x, {"backbone": key, "fingerprint": "fixture", "modality": modality, "dim": dim}))
    from cxrlib.projector import build_projector, save_projector

    model = build_projector("residual_mlp", dim, dim, width=16)
    from cxrlib import dag

    save_projector(paths.results_dir(dag.out_key("smoke", "fixture")) / "models" / "main" / "projector.pt", model,
                   {"backbone": "tiny-adapted", "dataset": "fixture"})


@pytest.mark.slow
def test_notebook_03_on_fixture(workdir):
    write_fixture(workdir)
    # "fixture" is no registered data set: the smoke parameters with the fixture's table and run set afterwards
    params = {**config.resolve_params("smoke", "03_retrieval_eval", {"backbone": "tiny-adapted"}),
              "dataset": "fixture", "run": "main"}
    out = workdir / "03.out.ipynb"
    env = {"CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    run_notebook("03_retrieval_eval.ipynb", params, out, env)  # in this process (papermill: the smoke DAG's 03)
    res, fig = workdir / "results" / "smoke-fixture", workdir / "figures" / "smoke-fixture"
    df = pd.read_csv(res / "retrieval.csv")
    assert set(df["model"]) == {"tiny (frozen)", "tiny-adapted (frozen)", "tiny-adapted + projector"}
    assert set(df["direction"]) == {"image_to_text", "text_to_image"}
    assert {"recall", "mrr", "median_rank", "label_precision", "label_map", "finding_precision"} <= set(df["metric"])
    main = df[(df["query_class"] == "all") & (df["metric"] == "recall") & (df["gallery"] == "raw")]
    assert (main["n"] == 36).all() and main["ci_low"].notna().all()
    # 4 distinct reports: k=5 and k=10 exceed the merged image->text gallery, stated in a note
    merged = df[(df["gallery"] == "merged") & (df["direction"] == "image_to_text") & (df["k"] == 10)]
    assert merged["value"].isna().all() and merged["note"].str.contains("exceeds").all()
    # every protocol for every model, with CIs and chance (label_match_class: no one-hot class here, a stated skip)
    from cxrlib import protocols

    have = df[df["value"].notna()]
    assert set(have["protocol"]) == set(protocols.PROTOCOLS) - {"label_match_class"}
    for protocol, part in have.groupby("protocol"):
        assert set(part["model"]) == set(df["model"]) and part["ci_low"].notna().any(), protocol
    assert df.loc[df["protocol"] == "strict", "chance"].notna().all()
    assert df.loc[df["protocol"] == "label_match_class", "note"].str.startswith("protocol skipped").all()
    paired = pd.read_csv(res / "paired_tests.csv")
    assert set(paired["model_a"]) == {"tiny-adapted + projector"} and paired["p_value"].between(0, 1).all()
    md = (res / "retrieval.md").read_text()
    assert "SMOKE TEST" in md and "Paired comparison" in md and (res / "retrieval.tex").is_file()
    assert "Protocol `strict`; follows open_clip" in md and "chance (random ranking)" in md
    assert "## Notes (one line per protocol)" in md and "excluded" not in md.split("## Notes")[0]
    stems = {p.stem for p in fig.glob("retrieval_*.png")}
    assert {"retrieval_recall_raw_at_k", "retrieval_label_precision_raw_at_k",
            "retrieval_per_class_precision_at_5"} <= stems
    assert sum(s.startswith("retrieval_examples_") for s in stems) == 4
    assert all((fig / f"{s}.pdf").is_file() for s in stems)
    executed = nbformat.read(out, as_version=4)
    assert any("SMOKE TEST" in "".join(o.get("text", "")) for c in executed.cells for o in c.get("outputs", []))
