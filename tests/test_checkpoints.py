"""Training outputs on disk: a checkpoint loads back as it was saved, and weights that do not fit their
model description are refused in one line, whether mapped (the check before a job) or read."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from transdnn.checkpoints import RunLayout, StoredModel, load_model, read_summary, require_checkpoint, save_model
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
