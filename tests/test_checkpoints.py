"""Training outputs on disk: a checkpoint loads back as it was saved, and weights that do not fit their
model description are refused in one line, whether mapped (the check before a job) or read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from transdnn.checkpoints import (
    RunLayout,
    StoredModel,
    encode_weights,
    load_model,
    read_summary,
    require_checkpoint,
    save_model,
)
from transdnn.errors import InputError
from transdnn.model import StackedMLP

META = {
    "genes": ["g0", "g1", "g2", "g3"],
    "regions": ["A", "B", "C"],
    "hidden_units": [5, 6, 7],
    "dropout": 0.1,
    "dropout_mode": "unit",
}


def _saved(tmp_path: Path, meta: dict[str, Any] | None = None) -> RunLayout:
    net = StackedMLP(2, 4, [5, 6, 7], 3, 0.1, "unit")
    net.reset_parameters([1, 2])
    model = StoredModel(META, net.state_dict(), torch.rand(2, 4), torch.rand(2, 4) + 0.5, torch.tensor([3, 4]))
    layout = RunLayout(tmp_path, "Integrated_dataset_0")
    save_model(layout.checkpoint("best_valid"), layout.model_meta, model)
    if meta is not None:
        save_model(layout.checkpoint("best_valid"), layout.model_meta, StoredModel(meta, *_tensors(model)))
    return layout


def _tensors(model: StoredModel) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    return model.state, model.scaler_mean, model.scaler_std, model.epochs


def test_a_checkpoint_loads_back_as_saved(tmp_path: Path):
    layout = _saved(tmp_path)
    require_checkpoint(layout, "best_valid")
    loaded = load_model(layout, "best_valid")
    net = StackedMLP(2, 4, [5, 6, 7], 3, 0.1, "unit")
    net.reset_parameters([1, 2])
    assert loaded.meta == META and loaded.replicates == 2 and loaded.epochs.tolist() == [3, 4]
    assert all(torch.equal(loaded.state[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"hidden_units": [5, 6, 8]}, r"'biases\.2' has shape \(2, 1, 7\) \(expected \(2, 1, 8\)"),
        ({"genes": ["g0", "g1", "g2"]}, r"'scaler_mean' has shape \(2, 4\) \(expected \(2, 3\)"),
        ({"regions": ["A", "B"]}, r"'biases\.3' has shape \(2, 1, 3\) \(expected \(2, 1, 2\)"),
        ({"hidden_units": [5, 6]}, r"'biases\.2' has shape \(2, 1, 7\) \(expected \(2, 1, 3\)"),
        ({"hidden_units": None}, r"its model description describes no model"),
        ({"regions": None}, r"its model description describes no model"),
    ],
)
def test_weights_that_do_not_fit_their_description_are_refused(tmp_path: Path, edit: dict[str, Any], message: str):
    layout = _saved(tmp_path, {**META, **edit})
    for attempt in (lambda: require_checkpoint(layout, "best_valid"), lambda: load_model(layout, "best_valid")):
        with pytest.raises(InputError, match=rf"^{re.escape(str(layout.checkpoint('best_valid')))}: {message}"):
            attempt()


def _trained_like(replicates: int = 3) -> dict[str, torch.Tensor]:
    net = StackedMLP(replicates, 40, [30, 20, 10], 3, 0.1, "unit")
    net.reset_parameters(list(range(replicates)))
    return net.state_dict()


def test_int8_weights_halve_float16_and_stay_within_half_a_step_of_the_trained_ones(tmp_path: Path):
    weights = _trained_like()
    weights["weights.1"][1, :, 4] = 0  # a unit with no input weights: its scale must not divide by zero
    weights["weights.2"][0, 3, 7] = float("nan")  # as in `last` of a diverged replicate: stays non-finite
    meta = {**META, "genes": [f"g{i}" for i in range(40)], "hidden_units": [30, 20, 10]}
    sizes = {}
    for dtype in ("float16", "int8"):
        state, scales = encode_weights(weights, dtype)
        layout = RunLayout(tmp_path / dtype, "Integrated_dataset_0")
        save_model(
            layout.checkpoint("best_valid"),
            layout.model_meta,
            StoredModel(meta, state, torch.rand(3, 40), torch.ones(3, 40), torch.tensor([1, 2, 3]), scales),
        )
        sizes[dtype] = sum(v.numel() * v.element_size() for v in state.values())
    loaded = load_model(layout, "best_valid")
    assert loaded.state["weights.0"].dtype == torch.int8 and loaded.state["biases.0"].dtype == torch.float32
    assert loaded.scales["weights.0"].shape == (3, 1, 30) and set(loaded.scales) == {f"weights.{i}" for i in range(4)}
    numbers = loaded.weights()
    assert numbers["weights.2"][0, :, 7].isnan().all() and numbers["weights.2"].isnan().sum() == 20
    weights["weights.2"][0, :, 7] = numbers["weights.2"][0, :, 7] = 0
    for name, full in weights.items():
        step = torch.nan_to_num(loaded.scales.get(name, torch.zeros(())), nan=0.0)
        assert (numbers[name] - full).abs().le(step / 2 + 1e-7).all(), name
    assert torch.equal(numbers["weights.1"][1, :, 4], torch.zeros(30))
    assert loaded.select([2]).weights()["weights.0"].equal(numbers["weights.0"][2:])
    assert sizes["int8"] < 0.55 * sizes["float16"]
    x = torch.rand(3, 5, 40)
    full_net = StackedMLP(3, 40, [30, 20, 10], 3, 0.1, "unit")
    full_net.load_state_dict(weights)
    ours, theirs = loaded.module(torch.device("cpu")).embed(x), full_net.eval().embed(x)
    assert torch.allclose(ours[1:], theirs[1:], atol=0.02)  # replicate 0 has the non-finite unit


@pytest.mark.parametrize("scales", [{}, {"weights.0": torch.ones(2, 1, 4)}])
def test_int8_weights_without_their_scales_are_refused(tmp_path: Path, scales: dict[str, torch.Tensor]):
    """Without its scale an int8 weight would load as integers, a model of nonsense."""
    net = StackedMLP(2, 4, [5, 6, 7], 3, 0.1, "unit")
    state, _ = encode_weights(net.state_dict(), "int8")
    layout = RunLayout(tmp_path, "Integrated_dataset_0")
    save_model(
        layout.checkpoint("best_valid"),
        layout.model_meta,
        StoredModel(META, state, torch.rand(2, 4), torch.ones(2, 4), torch.tensor([3, 4]), scales),
    )
    with pytest.raises(
        InputError, match=r"best_valid\.pt: 'scale\.weights\.0' has shape (None|\(2, 1, 4\)) \(expected \(2, 1, 5\): int8 weights"
    ):
        require_checkpoint(layout, "best_valid")


def test_a_description_without_a_field_names_it(tmp_path: Path):
    layout = _saved(tmp_path, {k: v for k, v in META.items() if k != "genes"})
    with pytest.raises(InputError, match=r"its model description lacks field 'genes'"):
        require_checkpoint(layout, "best_valid")


@pytest.mark.parametrize("field", ["replicate", "epochs_run", "best_valid_loss", "best_valid_acc", "diverged"])
def test_a_summary_without_a_field_its_readers_use_is_refused(tmp_path: Path, field: str):
    """The CLI prints a kept data set's replicates, epochs, loss and divergence; embed averages loss and accuracy."""
    summary = pd.DataFrame(
        {
            "replicate": [0, 1],
            "epochs_run": [3, 4],
            "best_valid_loss": [0.2, 0.3],
            "best_valid_acc": [0.9, 0.8],
            "diverged": [False] * 2,
        }
    )
    path = tmp_path / "train_summary.csv"
    summary.to_csv(path, index=False)
    assert read_summary(path).equals(summary)
    summary.drop(columns=field).to_csv(path, index=False)
    with pytest.raises(InputError, match=rf"train_summary.csv: field '{field}' missing or not numeric"):
        read_summary(path)
