"""Notebook 06 through papermill on tiny settings: the tiny random Llama as every tower, a fixture table
of hand-written reports, cached fixture image embeddings; asserts on the files it writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from nbexec import run_notebook

from cxrlib import dag, paths
from cxrlib.embstore import Embeddings, save_embeddings

REPORTS = [
    ("There is a small left pleural effusion. No pneumothorax.", "Small left pleural effusion.", 1),
    ("Mild cardiomegaly. Right lower lobe consolidation.", "Right lower lobe pneumonia.", 1),
    ("Lungs are clear. No pleural effusion or pneumothorax.", "No acute cardiopulmonary abnormality.", 0),
    ("PA and lateral views. There is a 1.2 cm nodule in the left upper lobe.", "Left upper lobe nodule.", 1),
    ("An endotracheal tube terminates 4 cm above the carina. Bilateral airspace disease.", "Likely CHF.", 1),
    ("The heart size is normal. The lungs are clear.", "No acute cardiopulmonary abnormality.", 0),
]


def write_fixture(n: int = 24, dim: int = 32) -> None:  # dim: the tiny backbone's joint space
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        f, imp, lab = REPORTS[i % len(REPORTS)]
        rows.append({"study_id": f"s{i}", "patient_id": f"p{i // 2}", "image_id": f"i{i}", "findings": f,
                     "impression": imp, "report": f"{f} {imp}", "label_abnormal": lab,
                     "split": "test" if i < 12 else "train"})
    table = pd.DataFrame(rows)
    table["report_group"] = pd.factorize(table["report"])[0]
    path = paths.study_table_path("fixture")
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path)
    x = rng.standard_normal((n, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    save_embeddings(paths.embeddings_dir() / "fixture" / "tiny" / "image.npz", Embeddings(
        table["image_id"], x, {"backbone": "tiny", "fingerprint": "fixture", "modality": "image", "dim": dim}))


@pytest.mark.slow
def test_notebook_06_on_tiny_settings(workdir):
    write_fixture()
    params = {"profile": "smoke", "dataset": "fixture", "backbone": "tiny", "device": "cpu",
              "text_towers": ["tiny-llama"], "adapt_tower": "tiny-llama", "lora_r": 2, "lora_alpha": 4,
              "lora_epochs": 1, "lora_batch_size": 8, "variant_epochs": 1, "variant_batch_size": 8,
              "mntp_epochs": 1, "styles": ["abbreviated", "reordered"], "n_boot": 20, "ks": [1, 5], "threads": 1}
    nb = REPO / "notebooks" / "06_text_encoder.ipynb"
    out = workdir / "06.out.ipynb"
    env = {"CXR_WORKDIR": str(workdir), "HF_HUB_OFFLINE": "1"}
    run_notebook(nb.name, params, out, env)  # in this process (papermill runs 06 in the smoke DAG)
    res = workdir / "results" / dag.out_key("smoke", "fixture")
    fig = workdir / "figures" / dag.out_key("smoke", "fixture")
    df = pd.read_csv(res / "text_bench.csv")
    models = set(df["model"])
    assert models == {"tiny-llama (frozen)", "tiny-llama + LoRA (tiny space)",
                      "tiny-llama + variant SupCon (MNTP first)", "tiny (its text tower)"}
    assert set(df["benchmark"]) == {"style_robustness", "error_discrimination"}
    img = df[df["direction"] == "image_to_report"]
    assert set(img["model"]) == {"tiny-llama + LoRA (tiny space)", "tiny (its text tower)"}
    assert "original" in set(img["style"])
    assert df["value"].between(0, 1).all() and (df["n_patients"] > 0).all()
    paired = pd.read_csv(res / "text_bench_paired.csv")
    assert {"style_drop", "style_robustness", "error_discrimination"} <= set(paired["benchmark"])
    assert ("tiny-llama + LoRA (tiny space)", "tiny (its text tower)") in set(zip(paired["model_a"], paired["model_b"]))
    runs = json.loads((res / "text_encoder_runs.json").read_text())
    assert runs["adjustments"]["tiny-llama (frozen)"]["pad_token"]
    assert len(runs["truncation"]) == 3 and all(t["texts"] > 0 for t in runs["truncation"].values())
    assert all(not r["reused"] for r in runs["runs"].values())
    assert "Error discrimination" in (res / "text_bench.md").read_text()
    assert (fig / "text_bench.png").is_file() and (fig / "text_bench.pdf").is_file()
    assert list((workdir / "data" / "models" / "fixture" / "text").glob("*.pt"))
