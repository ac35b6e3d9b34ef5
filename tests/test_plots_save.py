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


def _inline(monkeypatch) -> list:
    """plots on matplotlib's inline backend (as in a notebook), with IPython's display captured."""
    import IPython.display

    shown: list = []
    monkeypatch.setattr(plots.matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    monkeypatch.setattr(IPython.display, "display", lambda obj, *a, **k: shown.append(obj))
    return shown


def test_in_a_notebook_the_saved_png_is_shown_and_the_figure_closed(tmp_path, monkeypatch):
    plots.apply_style()
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    shown = _inline(monkeypatch)
    written = plots.save_figure(fig, "fig", tmp_path, formats=("pdf", "png"))
    assert len(shown) == 1 and shown[0].data == written[1].read_bytes()
    width = Image.open(written[1]).width
    assert shown[0].width == round(width * 110 / 200)  # the inline figure's size: figure.dpi / savefig.dpi
    assert not plt.fignum_exists(fig.number)  # nothing left for the backend to render again


def test_without_a_png_or_outside_a_notebook_nothing_is_shown(tmp_path, monkeypatch):
    fig, _ = plt.subplots()
    assert plots.show_saved(fig, plots.save_figure(fig, "a", tmp_path, formats=("png",))) is False  # Agg here
    assert plt.fignum_exists(fig.number)
    shown = _inline(monkeypatch)
    plots.save_figure(fig, "b", tmp_path, formats=("pdf",))
    assert shown == [] and plt.fignum_exists(fig.number)
    plt.close(fig)
