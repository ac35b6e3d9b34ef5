"""Figures ready for a paper: one colour scale per heatmap column, legends clear of the data, the
image-to-report gallery with the true report and identical texts collapsed."""

from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from cxrlib import plots


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_heatmap_one_colour_scale_per_column():
    values = pd.DataFrame({"R@5 i2t": [1.0, 3.0, 6.0], "P@5 i2t": [66.0, 80.0, 89.0]}, index=["frozen", "a", "b"])
    annot = values.map(lambda v: f"{v:.1f}")
    scaled = plots.column_scaled(values)
    np.testing.assert_allclose(scaled.min(), [0, 0])
    np.testing.assert_allclose(scaled.max(), [1, 1])
    fig = plots.plot_ablation_heatmap(values, annot)
    mesh = fig.axes[0].collections[0]
    colours = mesh.get_facecolors().reshape(3, 2, 4)  # rows x columns
    assert not np.allclose(colours[0, 0], colours[2, 0])  # R@5 (1-6%) spans the colour map like P@5 does
    np.testing.assert_allclose(colours[[0, 2], 0], colours[[0, 2], 1])  # each column's min and max: the same colours
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels[0].endswith("(1.0-6.0%)")
    plots.plt.close(fig)


def _results():
    rows = []
    for model in ("Frozen CLIP", "Frozen BiomedCLIP", "Projector"):
        for d in ("image_to_text", "text_to_image"):
            for cls, v in (("normal", 0.95), ("abnormal", 0.9), ("all", 0.92)):  # bars up to the top
                rows.append(dict(model=model, direction=d, gallery="raw", query_class=cls, metric="label_precision",
                                 k=5, value=v, ci_low=v - 0.03, ci_high=min(1, v + 0.03)))
    return pd.DataFrame(rows)


def test_per_class_legend_is_outside_every_panel():
    fig = plots.plot_per_class(_results(), "label_precision", 5)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert all(not _overlaps(legend, ax.get_window_extent(renderer)) for ax in fig.axes)
    plots.plt.close(fig)


def test_adaptation_curve_legends_are_outside_the_data_area():
    epochs = np.arange(0, 6)
    history = pd.DataFrame({"epoch": epochs, "train_loss": np.r_[np.nan, np.linspace(3, 1, 5)],
                            "val_loss": np.linspace(3.2, 1.2, 6), "val_i2t_R@1": np.linspace(0.1, 0.9, 6),
                            "val_t2i_R@1": np.linspace(0.1, 0.95, 6), "val_i2t_R@5": np.linspace(0.3, 1, 6),
                            "val_t2i_R@5": np.linspace(0.3, 1, 6)})
    fig = plots.plot_adaptation_curves(history, best_epoch=4)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        legend = ax.get_legend().get_window_extent(renderer)
        assert not _overlaps(legend, ax.get_window_extent(renderer))
    plots.plt.close(fig)


def test_collapse_identical_texts():
    texts = np.array(["No acute disease.", "Effusion.", "No  acute disease.", "Edema."])
    groups = plots.collapse_identical(texts, [0, 1, 2, 3])
    assert [(g[1], g[2]) for g in groups] == [([1, 3], [0, 2]), ([2], [1]), ([4], [3])]


def test_image_to_report_gallery_shows_true_report_and_counts(tmp_path):
    p = tmp_path / "im.png"
    Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(p)
    table = pd.DataFrame({"image_path": [str(p)] * 4, "label_abnormal": [0, 0, 1, 0],
                          "report": ["Heart normal. Query's own text.", "No acute disease.", "Effusion.",
                                     "No acute disease."]})
    fig = plots.plot_image_to_reports(table, [0], np.array([[1, 3, 2]]), np.array([[0.9, 0.9, 0.5]]))
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert "true report" in texts and any("Query's own text" in t for t in texts)
    assert any("×2 (ranks 1, 2)" in t for t in texts)
    assert sum("No acute disease." in t for t in texts) == 1  # shown once
    plots.plt.close(fig)
