"""Figures people look at in the MLflow UI: training curves and the consensus correlation heatmap."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from transdnn.atomic import write_with


def curves(history: pd.DataFrame, path: Path, title: str) -> Path:
    """Loss, accuracy and homology rank per epoch of one replicate."""
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for col in ("train_loss", "valid_loss"):
        axes[0].plot(history["epoch"], history[col], label=col)
    for col in ("train_acc", "valid_acc"):
        axes[1].plot(history["epoch"], history[col], label=col)
    axes[2].plot(history["epoch"], history["homology_rank"], label="homology_rank")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
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
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80))
    plt.close(fig)
    return path
