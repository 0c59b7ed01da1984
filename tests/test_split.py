"""Split and scaler on tiny arrays with hand-checked answers."""

import numpy as np
import torch

from transdnn.split import fit_scalers, split_rows, split_samples


def test_split_takes_ten_percent_of_samples_per_region_at_least_one():
    # region 0: 20 samples -> 2 valid; region 1: 3 samples -> max(1, round(0.3)) = 1; region 2: 2 -> 1
    sample_region = np.array([0] * 20 + [1] * 3 + [2] * 2)
    valid = split_samples(sample_region, 0.1, np.random.default_rng(0))
    assert np.bincount(sample_region[valid], minlength=3).tolist() == [2, 1, 1]


def test_split_never_sends_a_whole_region_to_validation():
    sample_region = np.array([0, 0, 1, 1, 1])
    valid = split_samples(sample_region, 0.9, np.random.default_rng(0))
    assert np.bincount(sample_region[~valid], minlength=2).tolist() == [1, 1]


def test_split_rows_keeps_samples_whole():
    row_sample = np.array([0, 0, 1, 1, 2, 2, 2])
    train, valid = split_rows(row_sample, np.array([False, True, False]))
    assert train.tolist() == [0, 1, 4, 5, 6]
    assert valid.tolist() == [2, 3]


def test_split_is_seeded_and_varies_with_seed():
    sample_region = np.repeat(np.arange(5), 20)
    a = split_samples(sample_region, 0.1, np.random.default_rng(1))
    b = split_samples(sample_region, 0.1, np.random.default_rng(1))
    c = split_samples(sample_region, 0.1, np.random.default_rng(2))
    assert (a == b).all()
    assert (a != c).any()


def test_scaler_matches_hand_computed_statistics_per_replicate():
    X = torch.tensor([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0], [100.0, 0.0]])
    masks = torch.tensor([[True, True, True, False], [False, False, True, True]])
    mean, std = fit_scalers(X, masks, chunk=3)
    assert torch.allclose(mean, torch.tensor([[3.0, 5.0], [52.5, 2.5]]))
    # ddof 0; a constant gene gets std 1 (sklearn's StandardScaler does the same)
    assert torch.allclose(std, torch.tensor([[np.sqrt(8 / 3), 1.0], [47.5, 2.5]], dtype=torch.float32))


def test_scaler_gives_a_gene_constant_over_the_training_rows_std_1_like_sklearn():
    """Found on 2026-11-27: 79 of 300 constant genes (values -50..50, 20k rows) got a std of 1e-8-1e-6."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    constant = rng.uniform(-50, 50, 300).astype(np.float32)
    X = np.tile(constant, (20_000, 1))
    X[::7] += rng.normal(size=(len(X[::7]), 300)).astype(np.float32)  # rows the mask below leaves out
    masks = torch.ones(2, len(X), dtype=torch.bool)
    masks[:, ::7] = False
    masks[1, 1::3] = False
    mean, std = fit_scalers(torch.from_numpy(X), masks)
    assert torch.equal(std, torch.ones_like(std))
    assert torch.equal(mean, torch.from_numpy(constant).expand(2, -1))
    for r in range(2):
        expected = StandardScaler().fit(X[masks[r].numpy()])
        assert np.array_equal(expected.scale_, np.ones(300))
    # and on ordinary data the statistics are sklearn's
    Y = rng.normal(loc=30, scale=0.01, size=(3000, 50)).astype(np.float32)
    mean, std = fit_scalers(torch.from_numpy(Y), torch.ones(1, len(Y), dtype=torch.bool))
    sk = StandardScaler().fit(Y.astype(np.float64))
    assert np.allclose(mean[0].numpy(), sk.mean_, rtol=1e-7) and np.allclose(std[0].numpy(), sk.scale_, rtol=1e-5)
