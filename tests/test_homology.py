"""Correlation and homology rank on tiny arrays with hand-checked answers."""

import numpy as np
import torch

from transdnn.homology import homology_rank, pair_indices, pair_ranks, pearson, raw_rank


def test_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    h, m = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
    expected = np.corrcoef(h, m)[:4, 4:]
    assert np.allclose(pearson(torch.tensor(h), torch.tensor(m)).numpy(), expected)


def test_pair_ranks_hand_checked():
    # rows: human regions, columns: mouse regions
    corr = torch.tensor([[0.9, 0.1], [0.5, 0.8], [0.7, 0.2]])
    h_idx, m_idx = torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1])
    # mouse 0 sorted: h0 (0.9), h2 (0.7), h1 (0.5) -> h0 rank 1, h2 rank 2; mouse 1: h1 rank 1
    assert pair_ranks(corr, h_idx, m_idx).tolist() == [1, 2, 1]
    assert float(homology_rank(corr, h_idx, m_idx)) == 4 / 3


def test_rank_is_batched_over_replicates():
    corr = torch.tensor([[[0.9, 0.1], [0.5, 0.8]], [[0.1, 0.9], [0.8, 0.5]]])
    ranks = homology_rank(corr, torch.tensor([0]), torch.tensor([0]))
    assert ranks.tolist() == [1.0, 2.0]


def test_nan_correlation_ranks_last():
    corr = torch.tensor([[float("nan")], [0.1], [0.2]])
    assert pair_ranks(corr, torch.tensor([0]), torch.tensor([0])).tolist() == [3]


def test_ties_take_their_mean_rank():
    nan = float("nan")
    corr = torch.tensor([[0.5, nan, nan], [0.5, nan, 0.3], [0.9, nan, nan], [0.1, nan, nan]])
    # mouse 0: h2 above, h0 and h1 tied for 2-3; mouse 1 (a constant mouse embedding): all four tied for 1-4;
    # mouse 2: h1 first, h0, h2 and h3 (constant human embeddings) tied below it for 2-4
    ranks = pair_ranks(corr, torch.tensor([0, 1, 3, 3]), torch.tensor([0, 0, 1, 2]))
    assert ranks.tolist() == [2.5, 2.5, 2.5, 3.0]


def test_a_dead_model_scores_chance_not_a_perfect_rank():
    """A network whose last hidden layer is all zeros (ReLUs dead after a too-large learning rate) gives
    constant embeddings: every correlation is NaN."""
    human, mouse = torch.zeros(2, 5, 8), torch.zeros(2, 4, 8)
    ranks = homology_rank(pearson(human, mouse), torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 2, 3]))
    assert ranks.tolist() == [3.0, 3.0], "chance for 5 human regions: (5 + 1) / 2"


def test_pair_indices_and_raw_rank_on_identical_species_is_perfect():
    regions = ["a", "b", "c"]
    h_idx, m_idx = pair_indices(regions, regions, ["a", "b", "c"], ["a", "b", "c"])
    means = np.random.default_rng(1).normal(size=(3, 10))
    assert raw_rank(means, means, h_idx, m_idx) == 1.0
