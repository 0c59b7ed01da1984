"""Figures people look at in the MLflow UI: training curves and the consensus correlation heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

from transdnn.atomic import write_with


def curves(history: pd.DataFrame, path: Path, title: str) -> Path:
    """Loss, accuracy and homology rank per epoch, one line per replicate: one figure per training
    (the per-replicate curves are the child runs' metrics, which the MLflow UI draws itself)."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    panels = (("train_loss", "valid_loss"), ("train_acc", "valid_acc"), ("homology_rank",))
    for r, frame in history.groupby("replicate"):
        color = f"C{int(r) % 10}"
        for ax, cols in zip(axes, panels, strict=True):
            for col, style in zip(cols, ("-", "--"), strict=False):
                ax.plot(frame["epoch"], frame[col], style, color=color, linewidth=1, label=f"r{r}" if col == cols[0] else None)
    for ax, cols in zip(axes, panels, strict=True):
        ax.set_xlabel("epoch")
        ax.set_ylabel(" / ".join(cols) + (" (dashed)" if len(cols) == 2 else ""))
    axes[2].legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def heatmap(corr: pd.DataFrame, pairs: list[tuple[str, str]], path: Path, title: str) -> Path:
    """Human x mouse consensus correlation with the known homologous pairs marked."""
    fig, ax = plt.subplots(figsize=(max(6, corr.shape[1] * 0.22), max(6, corr.shape[0] * 0.12)))
    im = ax.imshow(corr.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1)
    rows = {r: i for i, r in enumerate(corr.index)}
    cols = {c: j for j, c in enumerate(corr.columns)}
    ax.scatter([cols[m] for _, m in pairs], [rows[h] for h, _ in pairs], marker="s", facecolors="none", edgecolors="k", s=18)
    ax.set_xticks(range(corr.shape[1]), corr.columns, rotation=90, fontsize=6)
    ax.set_yticks(range(corr.shape[0]), corr.index, fontsize=4)
    fig.colorbar(im, ax=ax, shrink=0.5)
    ax.set_title(title)
    _fit_to_labels(fig, ax)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path


def _fit_to_labels(fig: Figure, ax: Axes) -> None:
    """Margins from the widest tick label of each axis (the x labels stand upright), measured one string at a
    time: `tight_layout` draws the whole figure to find them, 40 % of a cortex heatmap's drawing (0.45 of 1.2 s)."""
    width, height = fig.get_size_inches()
    renderer = RendererAgg(int(width * fig.dpi), int(height * fig.dpi), fig.dpi)

    def widest(labels: list[Text]) -> float:
        sizes = [renderer.get_text_width_height_descent(t.get_text(), t.get_fontproperties(), ismath=False) for t in labels]
        return max(w for w, _, _ in sizes) / fig.dpi

    ticks = 0.2  # inches: tick marks and their padding
    fig.subplots_adjust(
        left=(widest(ax.get_yticklabels()) + ticks) / width,
        bottom=(widest(ax.get_xticklabels()) + ticks) / height,
        right=1 - 0.1 / width,
        top=1 - 0.35 / height,  # the title
    )
