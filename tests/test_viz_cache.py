"""2-D map cache of notebook 04: identical points and settings are read back, anything else recomputes."""

from __future__ import annotations

import numpy as np
import pytest

from cxrlib import embedding_viz as ev


def test_map_cache_hits_only_identical_inputs(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32)
    info: dict = {}
    first = ev.cached_project_2d(x, "tsne", tmp_path, info, seed=0, perplexity=50.0)
    assert info["cached"] is False and info["fallbacks"]  # perplexity 50 lowered for 40 points
    fallbacks = list(info["fallbacks"])

    def boom(*a, **k):
        raise AssertionError("recomputed a cached map")

    monkeypatch.setattr(ev, "project_2d", boom)
    again: dict = {}
    np.testing.assert_array_equal(ev.cached_project_2d(x, "tsne", tmp_path, again, seed=0, perplexity=50.0), first)
    assert again["cached"] is True and again["fallbacks"] == fallbacks and again["backend"] == "sklearn"
    for changed in ({"x": x + 1e-3}, {"perplexity": 5.0}, {"seed": 1}):
        kw = {"seed": 0, "perplexity": 50.0, **{k: v for k, v in changed.items() if k != "x"}}
        with pytest.raises(AssertionError, match="recomputed"):
            ev.cached_project_2d(changed.get("x", x), "tsne", tmp_path, {}, **kw)
    assert len(list(tmp_path.glob("tsne-*.npz"))) == 1 and not list(tmp_path.glob(".*"))


def test_no_cache_dir_always_computes(tmp_path):
    x = np.random.default_rng(1).standard_normal((30, 4)).astype(np.float32)
    info: dict = {}
    ev.cached_project_2d(x, "tsne", None, info, seed=0, perplexity=5.0)
    assert info["cached"] is False and not list(tmp_path.iterdir())
