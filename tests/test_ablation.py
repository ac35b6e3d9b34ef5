"""The loss-weight ablation: grid construction, one run per weighting, tables from the tidy results."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlib import ablation, retrieval
from cxrlib.train import TrainConfig, synthetic_splits


def test_default_grid_covers_singles_pairs_all_and_main():
    grid = ablation.default_grid((1.0, 0.5, 1.0))
    assert grid[:7] == [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    assert (1.0, 0.5, 1.0) in grid and len(grid) == len(set(grid))
    assert ablation.default_grid((1, 1, 1)).count((1.0, 1.0, 1.0)) == 1


@pytest.mark.parametrize("bad", ["all", [[1, 2]], [[-1, 1, 1]], [[0, 0, 0]], []])
def test_bad_grid_is_an_error(bad):
    with pytest.raises(ValueError):
        ablation.parse_grid(bad, (1, 1, 1))


def test_weights_name():
    assert ablation.weights_name((1, 0, 0.5)) == "BCE 1 + CLIP 0.5"


@pytest.mark.slow
def test_run_ablation_one_row_per_weighting_and_frozen_reference():
    splits = synthetic_splits(240, 120, dim=32, seed=3)
    train, test = splits["train"], splits["val"]
    grid = [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0)]
    base = TrainConfig(width=32, epochs=3, batch_size=64, patience=5)
    results, runs = ablation.run_ablation(train, test, test, grid, base, ks=(1, 5), n_boot=20, seed=0)
    assert list(runs["model"]) == ["CLIP 1", "BCE 1 + SupCon 1 + CLIP 1"]
    assert set(results["model"]) == {ablation.FROZEN, "CLIP 1", "BCE 1 + SupCon 1 + CLIP 1"}
    assert results.loc[results["model"] == ablation.FROZEN, "w_clip"].isna().all()
    # the frozen row is exactly the retrieval module's own evaluation of the unprojected split
    ref = retrieval.evaluate_pairs(test, ablation.FROZEN, ks=(1, 5), n_boot=20, seed=0)
    got = results[results["model"] == ablation.FROZEN].drop(columns=["w_bce", "w_supcon", "w_clip"])
    np.testing.assert_allclose(got["value"].to_numpy(float), ref["value"].to_numpy(float), equal_nan=True)
    # the same seed gives the same ablation
    again, _ = ablation.run_ablation(train, test, test, grid[:1], base, ks=(1, 5), n_boot=20, seed=0)
    a = results[results["model"] == "CLIP 1"]["value"].to_numpy(float)
    b = again[again["model"] == "CLIP 1"]["value"].to_numpy(float)
    np.testing.assert_array_equal(a, b)

    table = ablation.headline_table(results)
    assert list(table["Model"]) == [ablation.FROZEN, "CLIP 1", "BCE 1 + SupCon 1 + CLIP 1"]
    assert table.shape[1] == 1 + 2 * len(ablation.HEADLINE) and "[" in table.iloc[0, 1]
    values, annot = ablation.heatmap_frame(results)
    assert values.shape == (3, 6) and np.isfinite(values.to_numpy()).all()
    p5 = results[(results["model"] == "CLIP 1") & (results["metric"] == "label_precision") & (results["k"] == 5)
                 & (results["direction"] == "image_to_text") & (results["query_class"] == "all")]["value"].item()
    assert values.loc["CLIP 1", "P@5\ni→t"] == pytest.approx(100 * p5)
