"""Independent test: the confusion matrix, and scoring a held-out set whose regions are coded apart from the model's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from transdnn.checkpoints import StoredModel
from transdnn.data import TrainingSet
from transdnn.errors import InputError
from transdnn.evaluate import confusion_matrix, independent_test
from transdnn.model import StackedMLP

GENES = ["g0", "g1", "g2", "g3"]


def test_confusion_rows_sum_to_one_and_a_class_without_rows_stays_zero():
    conf = confusion_matrix(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), 3)
    assert np.allclose(conf, [[0.5, 0.5, 0], [1 / 3, 2 / 3, 0], [0, 0, 0]])


def _model(regions: list[str], epochs: tuple[int, int] = (3, 4)) -> StoredModel:
    net = StackedMLP(2, len(GENES), [5, 5, 5], len(regions), 0.1, "unit")
    net.reset_parameters([1, 2])
    meta = {"genes": GENES, "regions": regions, "hidden_units": [5, 5, 5], "dropout": 0.1, "dropout_mode": "unit"}
    return StoredModel(meta, net.state_dict(), torch.zeros(2, len(GENES)), torch.ones(2, len(GENES)), torch.tensor(epochs))


def _test_set(regions: list[str], labels: list[int]) -> TrainingSet:
    X = np.random.default_rng(0).standard_normal((len(labels), len(GENES))).astype(np.float32)
    codes = np.array(labels)
    return TrainingSet(Path("held_out.h5ad"), X, codes, regions, codes, np.arange(len(regions)), GENES)


def test_test_labels_are_scored_under_the_models_region_names_in_any_chunking():
    """The test set codes only its own regions ("B", "C" as 0, 1); the model codes "A", "B", "C"."""
    model = _model(["A", "B", "C"])
    test = _test_set(["B", "C"], [0, 1, 1, 0, 1])
    whole = independent_test(model, test, torch.device("cpu"))
    chunked = independent_test(model, test, torch.device("cpu"), chunk=2)
    with torch.no_grad():
        logits, _ = model.module(torch.device("cpu"))(model.model_inputs(torch.from_numpy(test.X), scale=True))
    expected = np.array(["A", "B", "C"])[logits.argmax(-1).numpy()]
    for report in (whole, chunked):
        assert [list(p["gt"]) for p in report.predictions] == [["B", "C", "C", "B", "C"]] * 2
        assert [list(p["pred"]) for p in report.predictions] == expected.tolist()
        assert np.allclose(report.accuracy, (expected == np.array(["B", "C", "C", "B", "C"])).mean(axis=1))
        assert all(list(c.index) == ["A", "B", "C"] and c.loc["A"].sum() == 0 for c in report.confusion)


def test_a_test_region_the_model_never_trained_on_is_named():
    with pytest.raises(InputError, match=r"held_out.h5ad: obs\['region_index'\] regions \['D'\] were not trained on"):
        independent_test(_model(["A", "B", "C"]), _test_set(["B", "D"], [0, 1]), torch.device("cpu"))


def test_a_replicate_without_trained_weights_is_not_tested():
    """Replicate 0 diverged before its first finite validation loss (epoch -1): its initial weights would
    score chance's accuracy into the mean. Replicate 1 is scored as when it is the only one."""
    test = _test_set(["B", "C"], [0, 1, 1, 0, 1])
    both = independent_test(_model(["A", "B", "C"]), test, torch.device("cpu"))
    report = independent_test(_model(["A", "B", "C"], epochs=(-1, 4)), test, torch.device("cpu"))
    assert report.replicates == [1] and both.replicates == [0, 1]
    assert report.accuracy.tolist() == both.accuracy[1:].tolist()
    assert report.predictions[0].equals(both.predictions[1]) and report.confusion[0].equals(both.confusion[1])
