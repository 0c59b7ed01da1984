"""Homology metric: Pearson correlation between human and mouse region vectors and the homology rank.

Pure tensor functions with a leading batch (replicate) dimension allowed.
"""

from __future__ import annotations

import numpy as np
import torch


def pearson(human: torch.Tensor, mouse: torch.Tensor) -> torch.Tensor:
    """Correlation of every human row with every mouse row: (..., H, D) x (..., M, D) -> (..., H, M)."""
    h = human - human.mean(dim=-1, keepdim=True)
    m = mouse - mouse.mean(dim=-1, keepdim=True)
    h = h / h.norm(dim=-1, keepdim=True)
    m = m / m.norm(dim=-1, keepdim=True)
    return h @ m.transpose(-1, -2)


def pair_indices(
    human_regions: list[str], mouse_regions: list[str], pairs_human: list[str], pairs_mouse: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each homologous pair's regions in the human and mouse region lists."""
    h = {r: i for i, r in enumerate(human_regions)}
    m = {r: i for i, r in enumerate(mouse_regions)}
    return torch.tensor([h[r] for r in pairs_human]), torch.tensor([m[r] for r in pairs_mouse])


def pair_ranks(corr: torch.Tensor, human_idx: torch.Tensor, mouse_idx: torch.Tensor) -> torch.Tensor:
    """1-based rank of each pair's human region among all human regions, by correlation with its mouse region.

    A NaN correlation (a constant embedding) ranks below every number. Regions that tie take their mean
    rank, the expected one when the tie is broken at random: a mouse region with a constant embedding has
    a whole column of NaNs, and a dead model then scores chance, not a perfect 1 that would make it the
    best-rank checkpoint and the champion. Returns (..., pairs), float64.
    """
    corr = torch.nan_to_num(corr, nan=-torch.inf)
    columns = corr[..., :, mouse_idx]  # (..., H, P)
    paired = columns.gather(-2, human_idx.to(corr.device).view(*([1] * (corr.dim() - 2)), 1, -1).expand(*corr.shape[:-2], 1, -1))
    above = (columns > paired).sum(dim=-2)
    tied = (columns == paired).sum(dim=-2) - 1  # the paired region ties with itself
    return 1 + above + tied.to(torch.float64) / 2


def homology_rank(corr: torch.Tensor, human_idx: torch.Tensor, mouse_idx: torch.Tensor) -> torch.Tensor:
    """Mean homology rank over the pairs (lower is better; chance is about (H + 1) / 2)."""
    return pair_ranks(corr, human_idx, mouse_idx).mean(dim=-1)


def raw_rank(human_means: np.ndarray, mouse_means: np.ndarray, human_idx: torch.Tensor, mouse_idx: torch.Tensor) -> float:
    """The same metric on raw region-averaged expression: the baseline every model must beat."""
    corr = pearson(torch.as_tensor(human_means, dtype=torch.float64), torch.as_tensor(mouse_means, dtype=torch.float64))
    return float(homology_rank(corr, human_idx, mouse_idx))
