"""Evaluation sets: a fake MIMIC copy -> the 5x200 study table and its embeddings where notebook 03 reads them."""

from __future__ import annotations

import pandas as pd
import pytest

from cxrlib import evalsets, paths
from cxrlib.datasets.fixtures import make_fake_mimic


def test_unknown_eval_set_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown evaluation set 'chexpert_5x200'.*mimic_5x200"):
        evalsets.check_eval_set("chexpert_5x200")
    assert evalsets.check_eval_set(None) is None


def test_build_and_embed_mimic_5x200(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m cxrlib.evalsets mimic_5x200 --backbones tiny"):
        evalsets.require_built("mimic_5x200", ["tiny"])
    root = make_fake_mimic(tmp_path / "mimic")
    ids = tmp_path / "ids.csv"
    rows = [(f"{10000000 + 37 * p:08d}-{50000000 + 1000 * p + 1:08d}-pa", 10000000 + 37 * p, 50000000 + 1000 * p + 1)
            for p in (0, 2, 4)]
    pd.DataFrame(rows, columns=["dicom_id", "subject_id", "study_id"]).to_csv(ids, index=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIMIC_5X200_IDS", str(ids))
        table_path = evalsets.build_table("mimic_5x200", mimic_root=str(root))
    table = pd.read_parquet(table_path)
    assert table_path == paths.study_table_path("mimic_5x200") and len(table) == 3
    assert set(table["onehot_label"]) == {"Cardiomegaly"}
    assert table_path.with_name("mimic_5x200.skips.csv").is_file()
    out = evalsets.embed("mimic_5x200", "tiny", batch_size=2, num_workers=0, precision="fp32", device="cpu",
                         progress=False)
    assert (out / "image.npz").is_file() and (out / "text.npz").is_file()
    evalsets.require_built("mimic_5x200", ["tiny"])
    from cxrlib.models import load_eval_split

    sp = load_eval_split("mimic_5x200", "tiny", "test")
    assert len(sp) == 3 and "onehot_label" in sp.table
