"""Notebook 03 on a peer's evaluation set: a fake MIMIC copy -> MIMIC-5x200 -> label_match_class with
BenchX's published numbers beside ours (papermill, tiny backbone, no network)."""

from __future__ import annotations

import pandas as pd
import pytest
from nbexec import run_notebook

from cxrlib import config, evalsets
from cxrlib.datasets.fixtures import make_fake_mimic


@pytest.mark.slow
def test_notebook_03_on_mimic_5x200(workdir, tmp_path, monkeypatch):
    root = make_fake_mimic(tmp_path / "mimic", n_patients=12)
    rows = [(f"{10000000 + 37 * p:08d}-{50000000 + 1000 * p + s:08d}-pa", 10000000 + 37 * p, 50000000 + 1000 * p + s)
            for p in range(12) for s in (0, 1)]  # every PA image: the one-hot ones (Cardiomegaly) are kept
    ids = tmp_path / "ids.csv"
    pd.DataFrame(rows, columns=["dicom_id", "subject_id", "study_id"]).to_csv(ids, index=False)
    monkeypatch.setenv("MIMIC_5X200_IDS", str(ids))
    evalsets.build_table("mimic_5x200", mimic_root=str(root))
    evalsets.embed("mimic_5x200", "tiny", batch_size=4, num_workers=0, precision="fp32", device="cpu", progress=False)

    params = {**config.resolve_params("smoke", "03_retrieval_eval", {"dataset": "mimic", "backbone": "tiny"}),
              "eval_set": "mimic_5x200", "protocols": ["strict", "label_match_class", "graded"],
              "models": [{"name": "tiny (frozen)", "backbone": "tiny"}], "paired": [], "ks": [1, 5]}
    env = {"CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1", "MIMIC_5X200_IDS": str(ids)}
    # in this process (papermill runs 03 in the smoke DAG)
    run_notebook("03_retrieval_eval.ipynb", params, tmp_path / "out.ipynb", env)
    res = workdir / "results" / "smoke-mimic-mimic_5x200"
    df = pd.read_csv(res / "retrieval.csv")
    assert set(df["protocol"]) == {"strict", "label_match_class", "graded"}
    cls = df[(df["protocol"] == "label_match_class") & (df["metric"] == "class_precision")]
    assert cls.loc[cls["query_class"] != "normal", "value"].notna().all()  # 5x200 has no normal queries
    assert (cls.loc[cls["query_class"] == "all", "chance"] == 1.0).all()  # every kept fake image is Cardiomegaly
    md = (res / "retrieval.md").read_text()
    assert "Evaluation set: `mimic_5x200`" in md
    assert "Published numbers beside ours" in md and "MGCA-ViT" in md and "Zhou et al." in md
    published = md.split("## Published numbers beside ours")[1].split("\n## ")[0]
    assert "MGCA-ViT" in published and "MedProbCLIP" not in published  # another evaluation set: not placed
