"""Workflow helpers that are pure functions: the per-epoch curves DVC plots."""

from __future__ import annotations

import pandas as pd
import pytest

from transdnn.jobs import mean_curves
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
