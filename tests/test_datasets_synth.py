"""openi_synth: real NLM reports (torchxrayvision copy) + images from the renderer, which is stubbed here
(the renderer itself is tested in its own module); and notebook 01 end to end through papermill."""

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
from nbexec import run_notebook
from PIL import Image

from cxrlib.datasets import build_study_table, load_study_table, skip_counts

REPO = Path(__file__).resolve().parent.parent
STUDY_REASONS = ("malformed_xml", "empty_report", "no_label", "no_frontal_image", "no_image", "max_studies")


@pytest.fixture
def stub_renderer(monkeypatch):
    calls = []

    def render_openi_images(images, out_dir, size=256, seed=0):
        calls.append((images.copy(), Path(out_dir), size, seed))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for i in images["image_id"]:
            Image.new("L", (size, size), 100).save(Path(out_dir) / f"{i}.png")
        return pd.DataFrame({"image_id": images["image_id"].values,
                             "image_path": [str(Path(out_dir) / f"{i}.png") for i in images["image_id"]]})

    mod = types.SimpleNamespace(render_openi_images=render_openi_images)
    monkeypatch.setitem(sys.modules, "cxrlib.datasets.synthetic", mod)
    import cxrlib.datasets as pkg

    monkeypatch.setattr(pkg, "synthetic", mod, raising=False)
    return calls


def test_openi_synth_renders_only_the_table_images(workdir, stub_renderer):
    table, skips = build_study_table("openi_synth", image_size=16, seed=3, max_studies=60)
    (images, out_dir, size, seed), = stub_renderer
    assert size == 16 and seed == 3 and out_dir == workdir / "data" / "raw" / "openi_synth" / "NLMCXR_png"
    assert len(table) == 60 and sorted(images["image_id"]) == sorted(table["image_id"])
    assert set(images["view"]) == {"frontal"}
    normal = set(table.loc[table["label_abnormal"] == 0, "image_id"])
    assert (images.loc[images["image_id"].isin(normal), "mesh"] == "normal").all()
    assert table["image_path"].map(lambda p: Path(p).is_file() and Path(p).parent == out_dir).all()
    counts = skip_counts(skips).set_index("reason")["count"].to_dict()
    assert counts["no_label"] >= 92  # the "No Indexing" studies
    assert 90 < counts["no_image"] <= 104  # reports without images (104, some skipped earlier for text/label)
    assert len(table) + sum(counts.get(r, 0) for r in STUDY_REASONS) == 3955  # every report accounted for


@pytest.mark.slow
def test_notebook_01_on_fake_kaggle_tree(tmp_path):
    from cxrlib.datasets.fixtures import make_fake_openi_kaggle

    root = make_fake_openi_kaggle(tmp_path / "kaggle", n_studies=32)
    env = {"CXR_WORKDIR": str(tmp_path / "work"), "HF_HUB_OFFLINE": "1",
           **dict.fromkeys(("CXR_DATA_DIR", "CXR_RESULTS_DIR", "CXR_FIGURES_DIR", "OPENI_ROOT"))}
    # in this process (papermill runs 01 in the smoke DAG)
    run_notebook("01_data_prep.ipynb", {"profile": "smoke", "dataset": "openi", "openi_root": str(root),
                                        "n_examples": 4}, tmp_path / "out.ipynb", env)
    work = tmp_path / "work"
    table = load_study_table(work / "data" / "processed" / "openi.parquet")
    assert len(table) == 32 and (work / "data" / "processed" / "openi.splits.csv").is_file()
    from cxrlib import dag

    out = dag.out_key("smoke", "openi")  # another dataset than the profile's: results/smoke-openi, side by side
    assert out == "smoke-openi"
    summary = json.loads((work / "results" / out / "data_summary.json").read_text())
    assert summary["splits"]["all"]["studies"] == 32 and summary["skips"]["by_reason"] == {"not_frontal": 32}
    assert summary["dataset"] == "openi" and summary["parameters"]["root"] == str(root)
    for stem in ("data_label_balance", "data_report_lengths", "data_examples"):
        assert (work / "figures" / out / f"{stem}.png").is_file()
        assert (work / "figures" / out / f"{stem}.pdf").is_file()
