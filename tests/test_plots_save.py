"""save_figure: the PNG it writes (at its faster zlib level) has the pixels of matplotlib's default PNG."""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from cxrlib import plots


def test_saved_png_is_pixel_identical_to_the_default_encoding(tmp_path):
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.imshow(np.random.default_rng(0).random((40, 60)), cmap="gray")
    ax.plot([0, 59], [0, 39], color="C1")
    written = plots.save_figure(fig, "fig", tmp_path, formats=("png", "pdf"))
    assert [p.name for p in written] == ["fig.png", "fig.pdf"] and all(p.stat().st_size > 0 for p in written)
    ref = io.BytesIO()
    fig.savefig(ref, format="png")  # PIL's default level
    plt.close(fig)
    got, want = np.asarray(Image.open(written[0])), np.asarray(Image.open(ref))
    assert got.shape == want.shape and np.array_equal(got, want)
    assert written[1].read_bytes().startswith(b"%PDF")
