"""plots.cache_font_subsets: each embedded TrueType font holds every glyph its figure draws, a figure's PDF
does not depend on what the process saved before, and figures within the base characters share one subset."""

from __future__ import annotations

import io
import re
import zlib

import pytest
from fontTools.ttLib import TTFont
from matplotlib.backends import _backend_pdf_ps as pdf_ps

from cxrlib import plots

ASCII_TITLES = ["Recall@k by model", "Precision (%) at k=5; MAP", "ROC {AUC} [val] #2 & ~3 <x>"]
ACCENTED = "ñ ü é, ∑ αβ"  # outside the base characters: widens that figure's subsets


def _figure_pdf(title: str, legend: str = "image → report") -> bytes:
    plots.apply_style()
    fig, ax = plots.plt.subplots(figsize=(3, 2))
    ax.plot([0, 1, 2], [1, 0, 2], label=legend)
    ax.set(title=title, xlabel="k", ylabel="value (%)")
    ax.legend()
    fig.text(0.5, -0.01, "OFFLINE DEMO stand-in", style="italic")
    fig.suptitle("a bold title", fontweight="bold")
    out = io.BytesIO()
    fig.savefig(out, format="pdf")
    plots.plt.close(fig)
    return out.getvalue()


def _embedded_code_points(pdf: bytes) -> list[set[int]]:
    """The code points of each TrueType font embedded in ``pdf`` (its FontFile2 streams, read by fontTools)."""
    fonts = []
    for raw in re.findall(rb"stream\r?\n(.*?)\r?\nendstream", pdf, flags=re.S):
        try:
            data = zlib.decompress(raw)
        except zlib.error:
            continue
        if data[:4] in (b"\x00\x01\x00\x00", b"true"):
            with TTFont(io.BytesIO(data)) as font:
                fonts.append(set(font.getBestCmap()))
    return fonts


@pytest.fixture
def counted(monkeypatch):
    """A fresh memo (it lives in the installed function's closure) around a counting matplotlib subsetter."""
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")  # fixed PDF and font timestamps
    installed = pdf_ps.get_glyphs_subset
    assert plots.cache_font_subsets() and getattr(installed, "_cxr_cached", False)
    original = installed.__wrapped__
    calls: list[set] = []

    def subset(fontfile, glyphs):
        calls.append(set(glyphs))
        return original(fontfile, glyphs)

    monkeypatch.setattr(pdf_ps, "get_glyphs_subset", subset)
    monkeypatch.setattr(pdf_ps, "font_as_file", pdf_ps.font_as_file.__wrapped__)
    assert plots.cache_font_subsets()
    assert pdf_ps.get_glyphs_subset.__wrapped__ is subset
    return calls


def test_every_drawn_character_is_in_the_embedded_fonts(counted):
    for title in [ASCII_TITLES[1], ACCENTED]:
        pdf = _figure_pdf(title)
        fonts = _embedded_code_points(pdf)
        assert b"FontFile2" in pdf and len(fonts) >= 3  # regular, bold and italic faces, Type 42
        drawn = set(map(ord, title + "image → report a bold title OFFLINE DEMO stand-in k value (%)0.5"))
        assert drawn - {ord(" ")} <= set.union(*fonts)


def test_ascii_figures_share_one_subset_per_font(counted):
    first = _figure_pdf(ASCII_TITLES[0])
    n_fonts = len(counted)
    assert n_fonts >= 3
    for title in ASCII_TITLES[1:]:
        _figure_pdf(title)
    assert len(counted) == n_fonts  # other titles, other glyphs: no new subsetting
    assert _figure_pdf(ASCII_TITLES[0]) == first
    _figure_pdf(ACCENTED)
    assert len(counted) > n_fonts  # glyphs outside the base set: a wider subset


def test_a_figures_pdf_does_not_depend_on_what_was_saved_before(counted, monkeypatch):
    after_others = [_figure_pdf(ACCENTED), _figure_pdf(ASCII_TITLES[2])][1]
    monkeypatch.setattr(pdf_ps, "get_glyphs_subset", pdf_ps.get_glyphs_subset.__wrapped__)
    assert plots.cache_font_subsets()  # a new process's empty memo
    assert _figure_pdf(ASCII_TITLES[2]) == after_others


def test_the_widened_set_keeps_the_figures_glyphs_and_adds_the_base(counted):
    _figure_pdf(ACCENTED)
    assert counted and all(len(glyphs) > len(set(plots.FONT_SUBSET_BASE_CHARS)) // 2 for glyphs in counted)


def test_cache_is_installed_once():
    before = pdf_ps.get_glyphs_subset
    assert plots.cache_font_subsets() and pdf_ps.get_glyphs_subset is before


@pytest.mark.parametrize("missing", ["get_glyphs_subset", "font_as_file", "SubsetResults"])
def test_without_the_hook_matplotlib_is_left_alone(monkeypatch, missing):
    monkeypatch.delattr(pdf_ps, missing)
    assert plots.cache_font_subsets() is False
