"""The MLflow pyfunc flavour of one replicate, logged as "model from code" (nothing pickled).

Input: a DataFrame of raw expression with gene-symbol columns (any order, extra columns ignored).
Output: the last-hidden-layer embedding per row, or class probabilities with params={"output": "proba"}.
Weights load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc.model import PythonModel, PythonModelContext

from transdnn.checkpoints import load_tensors, stored_from_tensors
from transdnn.errors import InputError


class RegionEmbedder(PythonModel):
    def load_context(self, context: PythonModelContext) -> None:
        weights = Path(context.artifacts["weights"])
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        self.model = stored_from_tensors(load_tensors(weights), meta, weights)
        self.net = self.model.module(torch.device("cpu"))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        genes = self.model.meta["genes"]
        missing = [g for g in genes if g not in model_input.columns]
        if missing:
            raise InputError(
                f"model input: {len(missing)} of {len(genes)} genes missing, e.g. {missing[:3]} (expected gene-symbol columns)"
            )
        x = torch.as_tensor(model_input[genes].to_numpy(dtype=np.float32))
        scale = self.model.meta["transform_scaling"] == "train"
        with torch.no_grad():
            if (params or {}).get("output") == "proba":
                logits, _ = self.net(self.model.model_inputs(x, scale=True))
                return pd.DataFrame(
                    torch.softmax(logits[0], -1).numpy(), columns=self.model.meta["regions"], index=model_input.index
                )
            emb = self.net.embed(self.model.model_inputs(x, scale=scale))[0].numpy()
        return pd.DataFrame(emb, columns=[str(i) for i in range(1, emb.shape[1] + 1)], index=model_input.index)


set_model(RegionEmbedder())
