"""Figures: the heatmap's margins hold its tick labels, whatever their length."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from transdnn.plots import _fit_to_labels


@pytest.mark.parametrize("longest", [3, 35, 60])
def test_tick_labels_fit_between_the_figure_edge_and_the_axes(longest: int):
    """Margins are measured from the labels, not found by a trial drawing: every label, drawn, lies inside the
    figure and outside the axes, from 3-letter mouse regions to the subcortex's 35-character names and beyond."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow([[0.0, 1.0], [1.0, 0.0]], aspect="auto")
    ax.set_xticks([0, 1], ["W" * longest, "ACB"], rotation=90, fontsize=6)
    ax.set_yticks([0, 1], ["M" * longest, "CA1"], fontsize=4)
    ax.set_title("title")
    _fit_to_labels(fig, ax)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page, axes = fig.bbox, ax.get_window_extent(renderer)
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        box = label.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, label.get_text()
        assert not box.overlaps(axes), label.get_text()
    assert ax.title.get_window_extent(renderer).y1 <= page.y1
    plt.close(fig)
