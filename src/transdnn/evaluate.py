"""Independent test (the reference's `-itest`): predictions, accuracy and a row-normalised confusion matrix
of trained replicates on a held-out labelled set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from transdnn.checkpoints import StoredModel
from transdnn.data import TrainingSet
from transdnn.errors import InputError


@dataclass(frozen=True)
class TestReport:
    replicates: list[int]  # the model's trained replicates, which the lists below are of
    predictions: list[pd.DataFrame]  # per replicate: gt, pred (region names)
    accuracy: np.ndarray  # (R,)
    confusion: list[pd.DataFrame]  # per replicate, rows sum to 1


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """Row-normalised confusion matrix (rows: true class); a class with no rows stays all zero."""
    counts = np.zeros((n, n), dtype=np.float64)
    np.add.at(counts, (gt, pred), 1)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def check_test_regions(test: TrainingSet, regions: list[str]) -> None:
    """Every test label must be a trained region, or its rows cannot be scored."""
    unknown = sorted(set(test.regions) - set(regions))
    if unknown:
        raise InputError(
            f"{test.path}: obs['region_index'] regions {unknown[:3]} were not trained on (expected the training regions)"
        )


@torch.no_grad()
def independent_test(model: StoredModel, test: TrainingSet, device: torch.device, chunk: int = 4096) -> TestReport:
    """Classify every test row with each trained replicate (through its training scaler); one that diverged
    before a finite validation loss holds no trained weights, and its accuracy would be chance's."""
    regions = model.meta["regions"]
    trained = model.trained
    model = model.trained_only()
    check_test_regions(test, regions)
    code = {r: i for i, r in enumerate(regions)}
    gt = np.array([code[test.regions[label]] for label in test.labels])
    net = model.module(device)
    preds = []
    for start in range(0, len(gt), chunk):
        x = torch.as_tensor(test.X[start : start + chunk], device=device)
        logits, _ = net(model.model_inputs(x, scale=True))
        preds.append(logits.argmax(-1).cpu().numpy())
    pred = np.concatenate(preds, axis=1)
    names = np.array(regions)
    return TestReport(
        replicates=trained,
        predictions=[pd.DataFrame({"gt": names[gt], "pred": names[p]}) for p in pred],
        accuracy=(pred == gt).mean(axis=1),
        confusion=[pd.DataFrame(confusion_matrix(gt, p, len(regions)), index=regions, columns=regions) for p in pred],
    )
