"""The stacked MLP is R independent reference models."""

import math

import pytest
import torch
from torch import nn

from transdnn.model import StackedMLP, seeds_for, unit_keep_mask


def _reference(net: StackedMLP, r: int) -> nn.Sequential:
    layers = []
    for w, b in zip(net.weights, net.biases, strict=True):
        lin = nn.Linear(w.shape[1], w.shape[2])
        lin.weight.data = w[r].T.clone()
        lin.bias.data = b[r, 0].clone()
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_stacked_forward_equals_independent_models():
    net = StackedMLP(3, 7, [5, 5, 5], 4, dropout=0.1, dropout_mode="unit")
    net.reset_parameters(seeds_for(0, 3, "a"))
    net.eval()
    x = torch.randn(3, 6, 7)
    logits, emb = net(x)
    for r in range(3):
        ref = _reference(net, r)
        assert torch.allclose(logits[r], ref(x[r]), atol=1e-6)
        assert torch.allclose(emb[r], ref[:6](x[r]), atol=1e-6)


@pytest.mark.parametrize("inputs_need_grad", [False, True])
def test_stacked_gradients_equal_independent_models(inputs_need_grad: bool):
    net = StackedMLP(3, 40, [6, 6, 6], 4, dropout=0.0, dropout_mode="unit")
    net.reset_parameters(seeds_for(0, 3, "a"))
    x = torch.randn(3, 9, 40, requires_grad=inputs_need_grad)
    logits, _ = net(x)
    logits.square().sum().backward()
    for r in range(3):
        ref = _reference(net, r)
        xr = x[r].detach().clone().requires_grad_(inputs_need_grad)
        ref(xr).square().sum().backward()
        linears = [m for m in ref if isinstance(m, nn.Linear)]
        for w, b, lin in zip(net.weights, net.biases, linears, strict=True):
            assert torch.allclose(w.grad[r], lin.weight.grad.T, atol=1e-5)
            assert torch.allclose(b.grad[r, 0], lin.bias.grad, atol=1e-5)
        if inputs_need_grad:
            assert torch.allclose(x.grad[r], xr.grad, atol=1e-5)


def test_init_is_seeded_per_replicate():
    a = StackedMLP(2, 7, [5], 3, 0.0, "unit")
    b = StackedMLP(2, 7, [5], 3, 0.0, "unit")
    a.reset_parameters([1, 2])
    b.reset_parameters([1, 3])
    assert torch.equal(a.weights[0][0], b.weights[0][0])
    assert not torch.equal(a.weights[0][1], b.weights[0][1])


def test_row_dropout_zeroes_whole_rows_and_unit_dropout_does_not():
    torch.manual_seed(0)
    emb = torch.ones(1, 400, 50)
    row = StackedMLP(1, 3, [50], 2, 0.5, "row").train()
    row.weights[-1].data = torch.eye(50)[None, :, :2].clone()
    row.biases[-1].data.zero_()
    out = row.head(emb)
    zero_rows = (out == 0).all(dim=-1)
    assert 100 < int(zero_rows.sum()) < 300
    unit = StackedMLP(1, 3, [50], 2, 0.5, "unit").train()
    unit.weights[-1].data = torch.eye(50)[None, :, :2].clone()
    unit.biases[-1].data.zero_()
    assert int((unit.head(emb) == 0).all(dim=-1).sum()) < 150


def test_unit_keep_mask_keeps_each_unit_with_the_rounded_probability():
    """Four 16-bit lanes per 64-bit draw: every lane must be as random as the others (no lane biased by
    the generator's range), and the scale must make the expected output equal the input."""
    torch.manual_seed(0)
    keep, scale = unit_keep_mask(torch.Size((250_000, 4)), 0.1, torch.device("cpu"))
    q = 1 - math.ceil(0.1 * 65536) / 65536
    assert scale == 1 / q
    per_lane = keep.float().mean(dim=0)
    assert torch.all((per_lane - q).abs() < 4 * math.sqrt(q * (1 - q) / 250_000)), per_lane
    assert keep.shape == (250_000, 4) and keep.dtype == torch.bool
    odd, _ = unit_keep_mask(torch.Size((3, 7)), 0.5, torch.device("cpu"))  # not a multiple of four units
    assert odd.shape == (3, 7) and 0 < int(odd.sum()) < 21


def test_unit_dropout_preserves_the_mean_in_training_and_is_off_in_eval():
    torch.manual_seed(1)
    net = StackedMLP(1, 3, [200], 200, 0.3, "unit").train()
    net.weights[-1].data = torch.eye(200)[None].clone()
    net.biases[-1].data.zero_()
    emb = torch.ones(1, 1000, 200)
    out = net.head(emb).detach()
    assert abs(float(out.mean()) - 1.0) < 0.01
    assert 0.29 < float((out == 0).float().mean()) < 0.31
    assert torch.equal(net.eval().head(emb), emb)


def test_seeds_are_the_data_sets_own():
    seeds = seeds_for(0, 10, "Integrated_dataset_0")
    assert seeds == seeds_for(0, 10, "Integrated_dataset_0"), "reproducible"
    assert len(set(seeds)) == 10
    others = [seeds_for(0, 10, f"Integrated_dataset_{k}") for k in range(1, 100)] + [seeds_for(1, 10, "Integrated_dataset_0")]
    assert all(not set(seeds) & set(other) for other in others), "no replicate shares a seed with another set's or run's"
    assert seeds_for(0, 3, "a") == seeds_for(0, 10, "a")[:3], "more replicates keep the first ones' seeds"
