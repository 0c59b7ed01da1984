"""Embed: the answer of a job over all its data sets, on hand-checked 2 x 2 correlations."""

from __future__ import annotations

import numpy as np
import torch

from transdnn.embed import Embeddings, pool_data_sets


def _embeddings(raw_rank: float) -> Embeddings:
    """Two human and two mouse regions, paired h0-m0 and h1-m1: only names, pairs and the raw rank matter."""
    empty = np.zeros((1, 2, 2))
    return Embeddings(
        replicates=[0],
        left_out=[],
        human_regions=["h0", "h1"],
        mouse_regions=["m0", "m1"],
        human=empty,
        mouse=empty,
        correlation=empty,
        ranks=np.ones(1),
        consensus=empty[0],
        consensus_rank=1.0,
        raw_rank=raw_rank,
        pair_idx=(torch.tensor([0, 1]), torch.tensor([0, 1])),
    )


def _set_metrics(ranks: list[float], left_out: int = 0, **extra: float) -> dict:
    return {"homology_rank": {str(r): v for r, v in enumerate(ranks)}, "replicates_left_out": left_out, **extra}


def test_pooled_consensus_is_the_mean_of_the_sets_and_is_ranked_afresh():
    # set a ranks h1 above h0 for m0 (pair rank 2, mean 1.5); set b ranks both pairs first (1.0)
    a = np.array([[0.9, 0.1], [0.95, 0.2]])
    b = np.array([[0.9, 0.1], [0.5, 0.3]])
    pooled, metrics = pool_data_sets(
        [a, b],
        [_set_metrics([1.5, 2.0], best_valid_loss=1.0), _set_metrics([1.0, 1.0], left_out=3, best_valid_loss=2.0)],
        _embeddings(raw_rank=2.0),
    )
    assert np.allclose(pooled, [[0.9, 0.1], [0.725, 0.25]])
    assert metrics["homology_rank_consensus"] == 1.0  # h0 0.9 > h1 0.725 for m0; h1 0.25 > h0 0.1 for m1
    assert (metrics["data_sets"], metrics["models"], metrics["homology_rank_mean"]) == (2, 4, 1.375)
    assert metrics["replicates_left_out"] == 3
    assert metrics["best_valid_loss"] == 1.5 and "best_valid_acc" not in metrics
    assert metrics["raw_homology_rank"] == 2.0 and metrics["improvement_over_raw"] == 0.5 and metrics["beats_raw"]
    assert metrics["chance_homology_rank"] == 1.5


def test_a_set_with_a_replicate_left_out_weighs_one_model_less():
    a, b = np.zeros((2, 2)), np.ones((2, 2))
    pooled, metrics = pool_data_sets(
        [a, b],
        [_set_metrics([1.0, 1.0, 1.0], best_valid_loss=1.0), _set_metrics([2.0], left_out=2, best_valid_loss=3.0)],
        _embeddings(1.0),
    )
    assert np.allclose(pooled, 0.25) and metrics["models"] == 4 and metrics["replicates_left_out"] == 2
    assert metrics["homology_rank_mean"] == 1.25 and metrics["best_valid_loss"] == 1.5


def test_a_figure_some_sets_lack_is_left_out():
    a = np.eye(2)
    _, metrics = pool_data_sets([a, a], [_set_metrics([1.0], best_valid_loss=1.0), _set_metrics([1.0])], _embeddings(1.0))
    assert "best_valid_loss" not in metrics and not metrics["beats_raw"]
