"""The stacked MLP is R independent reference models."""

import torch
from torch import nn

from transdnn.model import StackedMLP, seeds_for


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
    net.reset_parameters(seeds_for(0, 3))
    net.eval()
    x = torch.randn(3, 6, 7)
    logits, emb = net(x)
    for r in range(3):
        ref = _reference(net, r)
        assert torch.allclose(logits[r], ref(x[r]), atol=1e-6)
        assert torch.allclose(emb[r], ref[:6](x[r]), atol=1e-6)


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
