"""Workflows: the per-epoch curves DVC plots, how a multi-set job holds its data sets, and which code a kept
training was made from."""

from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TinyData
from transdnn import jobs
from transdnn.data import GeneList, TrainingSet, load_training_set
from transdnn.jobs import mean_curves
from transdnn.settings import load_settings
from transdnn.training import EPOCH_METRICS


def _history(values: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"epoch": range(len(values)), **{k: values for k in EPOCH_METRICS}})


def test_mean_curves_average_the_replicates_that_reached_each_epoch():
    """A replicate stopped early leaves the later epochs' means to the others, and the count says so."""
    curves = mean_curves([_history([4.0, 3.0, 2.0]), _history([2.0, 1.0]), _history([3.0, 2.0])])
    assert list(curves.columns) == ["epoch", *EPOCH_METRICS, "replicates"]
    assert curves["epoch"].tolist() == [0, 1, 2]
    assert curves["homology_rank"].tolist() == pytest.approx([3.0, 2.0, 2.0])
    assert curves["replicates"].tolist() == [3, 3, 1]


def test_a_job_frees_each_data_set_before_it_loads_the_next(params: Path, tiny: TinyData, monkeypatch: pytest.MonkeyPatch):
    """A 100-set job needs the memory of one set (the published sets are ~1 GB each), not of two."""
    for k in (1, 2):
        shutil.copy(tiny.train, tiny.train.with_name(f"Integrated_dataset_{k}.h5ad"))
    part = load_settings(params).cortex
    part = part.model_copy(update={"data": part.data.model_copy(update={"train": ["Integrated_dataset_*.h5ad"]})})
    loaded: list[weakref.ref[TrainingSet]] = []
    alive: list[int] = []

    def load(path: Path, genes: GeneList) -> TrainingSet:  # the real loader, watched
        gc.collect()
        alive.append(sum(ref() is not None for ref in loaded))
        train_set = load_training_set(path, genes)
        loaded.append(weakref.ref(train_set))
        return train_set

    monkeypatch.setattr(jobs, "load_training_set", load)
    outcomes = jobs.train_partition("cortex", part, torch.device("cpu"))
    assert [o.dataset for o in outcomes] == [f"Integrated_dataset_{k}" for k in range(3)]
    assert alive == [0, 0, 0], "an earlier data set was still held when the next one loaded"


@pytest.mark.parametrize(
    ("module", "retrains"),
    [
        ("split.py", True),
        ("training.py", True),
        ("settings.py", True),
        ("atlas/__init__.py", True),
        ("cli.py", False),
        ("tracking.py", False),
        ("plots.py", False),
        ("evaluate.py", False),
    ],
)
def test_code_digest_changes_with_the_modules_that_make_a_training(tmp_path: Path, module: str, retrains: bool):
    """A new CLI, figure or MLflow logging must not retrain a 2,000-model job; new training code must."""
    package = Path(jobs.__file__).parent
    copy = tmp_path / "transdnn"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    jobs.code_digest.cache_clear()
    assert jobs.code_digest(copy) == jobs.code_digest(package), "the same source, wherever installed"
    with (copy / module).open("a") as fh:
        fh.write("# changed\n")
    jobs.code_digest.cache_clear()
    assert (jobs.code_digest(copy) != jobs.code_digest(package)) is retrains
    sources = {p.relative_to(package).as_posix() for p in package.rglob("*.py")}
    assert jobs.RECORDING_MODULES.issubset(sources), "each module left out of the digest exists"


def test_a_training_is_summed_up_over_the_replicates_that_trained():
    """One diverged replicate (infinite best loss, no chosen rank) would make the means infinite or NaN."""
    layout = jobs.RunLayout(Path("out"), "Integrated_dataset_0")

    def outcome(losses: list[float], ranks: list[float]) -> jobs.TrainOutcome:
        return jobs.TrainOutcome(
            "cortex", layout.dataset, layout, None, pd.DataFrame({"best_valid_loss": losses}), np.array(ranks)
        )

    some = outcome([1.0, float("inf"), 3.0], [2.0, float("nan"), 4.0])
    assert (some.best_valid_loss_mean, some.chosen_rank_mean) == (2.0, 3.0)
    none = outcome([float("inf")], [float("nan")])
    assert none.best_valid_loss_mean is None and none.chosen_rank_mean is None
