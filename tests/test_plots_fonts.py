"""plots.cache_font_subsets: memoised TrueType subsets leave every PDF byte-identical to matplotlib's own
subsetting, and a repeated glyph set is subset once."""

from __future__ import annotations

import io

import pytest
from matplotlib.backends import _backend_pdf_ps as pdf_ps

from cxrlib import plots


def _figure_pdf() -> bytes:
    plots.apply_style()
    fig, ax = plots.plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 2], label="image → report")
    ax.set(title="Recall@k, ñ ü — bold?", xlabel="k", ylabel="value (%)")
    ax.legend()
    fig.text(0.5, -0.01, "OFFLINE DEMO stand-in", style="italic")
    fig.suptitle("a bold title", fontweight="bold")
    out = io.BytesIO()
    fig.savefig(out, format="pdf")
    plots.plt.close(fig)
    return out.getvalue()


def test_cached_subsets_give_the_same_pdf_bytes(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # fixed PDF and font timestamps
    cached = pdf_ps.get_glyphs_subset
    assert plots.cache_font_subsets() and getattr(cached, "_cxr_cached", False)
    original = cached.__wrapped__
    calls = []

    def counted(fontfile, glyphs):
        calls.append(fontfile)
        return original(fontfile, glyphs)

    monkeypatch.setattr(pdf_ps, "get_glyphs_subset", original)
    monkeypatch.setattr(pdf_ps, "font_as_file", pdf_ps.font_as_file.__wrapped__)
    reference = _figure_pdf()  # matplotlib's own subsetting
    assert b"DejaVuSans" in reference and b"FontFile2" in reference  # Type 42 fonts are embedded

    # a fresh memo (it lives in the installed function's closure) around the counting original
    monkeypatch.setattr(pdf_ps, "get_glyphs_subset", counted)
    assert plots.cache_font_subsets()
    fresh = pdf_ps.get_glyphs_subset
    assert fresh is not counted and fresh.__wrapped__ is counted
    first = _figure_pdf()
    n_first = len(calls)
    second = _figure_pdf()
    assert first == reference and second == reference
    assert n_first > 0 and len(calls) == n_first  # the second figure subset nothing again


def test_cache_is_installed_once():
    before = pdf_ps.get_glyphs_subset
    assert plots.cache_font_subsets() and pdf_ps.get_glyphs_subset is before


@pytest.mark.parametrize("missing", ["get_glyphs_subset", "font_as_file", "SubsetResults"])
def test_without_the_hook_matplotlib_is_left_alone(monkeypatch, missing):
    monkeypatch.delattr(pdf_ps, missing)
    assert plots.cache_font_subsets() is False
