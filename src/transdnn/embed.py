"""Embed: region embeddings of the human and mouse transform sets for each replicate, their correlation,
the consensus over replicates, and the metrics that say whether the model beat raw expression."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from transdnn.atomic import remove_others, write_csv, write_json
from transdnn.checkpoints import RunLayout, StoredModel
from transdnn.data import PartitionInputs, gene_columns
from transdnn.homology import homology_rank, pair_indices, pearson, raw_rank


@dataclass(frozen=True)
class Embeddings:
    replicates: list[int]  # the model's replicates embedded (its trained ones), in the order of the arrays below
    left_out: list[int]  # the others: no weights from an epoch with a finite validation loss
    human_regions: list[str]
    mouse_regions: list[str]
    human: np.ndarray  # (R, H, D)
    mouse: np.ndarray  # (R, M, D)
    correlation: np.ndarray  # (R, H, M)
    ranks: np.ndarray  # (R,)
    consensus: np.ndarray  # (H, M)
    consensus_rank: float
    raw_rank: float
    pair_idx: tuple[torch.Tensor, torch.Tensor]  # positions of each homologous pair's human and mouse region


@torch.no_grad()
def embed_matrix(model: StoredModel, x: np.ndarray, device: torch.device) -> np.ndarray:
    """(N, G) raw expression -> (R, N, D) embeddings, in one batched forward pass."""
    net = model.module(device)
    inputs = model.model_inputs(torch.as_tensor(x, device=device), model.meta["transform_scaling"] == "train")
    return net.embed(inputs).cpu().numpy()


def embed_inputs(model: StoredModel, inputs: PartitionInputs, device: torch.device) -> Embeddings:
    """Embed with the model's trained replicates only: one that diverged before a finite validation loss
    holds its initial weights, whose embeddings would pull the consensus towards noise."""
    trained = model.trained
    left_out = [r for r in range(model.replicates) if r not in trained]
    model = model.trained_only()
    n_h = len(inputs.human.regions)
    regions = np.concatenate([inputs.human.means, inputs.mouse.means])
    cols = gene_columns(model.meta["genes"], inputs.genes)
    if not np.array_equal(cols, np.arange(regions.shape[1])):
        regions = regions[:, cols]
    emb = embed_matrix(model, regions, device)
    h_idx, m_idx = pair_indices(inputs.human.regions, inputs.mouse.regions, inputs.homology.human, inputs.homology.mouse)
    human, mouse = torch.from_numpy(emb[:, :n_h]).double(), torch.from_numpy(emb[:, n_h:]).double()
    corr = pearson(human, mouse)
    consensus = torch.nan_to_num(corr).mean(dim=0)
    return Embeddings(
        replicates=trained,
        left_out=left_out,
        human_regions=inputs.human.regions,
        mouse_regions=inputs.mouse.regions,
        human=emb[:, :n_h],
        mouse=emb[:, n_h:],
        correlation=corr.numpy(),
        ranks=homology_rank(corr, h_idx, m_idx).numpy(),
        consensus=consensus.numpy(),
        consensus_rank=float(homology_rank(consensus, h_idx, m_idx)),
        raw_rank=raw_rank(inputs.human.means, inputs.mouse.means, h_idx, m_idx),
        pair_idx=(h_idx, m_idx),
    )


def embedding_frame(values: np.ndarray, regions: list[str]) -> pd.DataFrame:
    """The reference's layout: one row per region (index `region_id`), columns '1'..'D'."""
    frame = pd.DataFrame(
        values, index=pd.Index(regions, name="region_id"), columns=[str(i) for i in range(1, values.shape[1] + 1)]
    )
    return frame


def correlation_frame(values: np.ndarray, emb: Embeddings) -> pd.DataFrame:
    return pd.DataFrame(values, index=pd.Index(emb.human_regions, name="human_region"), columns=emb.mouse_regions)


def _against_raw(consensus_rank: float, raw: float, n_human: int) -> dict[str, Any]:
    """What a consensus rank means: set beside raw expression's rank and chance's."""
    return {
        "homology_rank_consensus": consensus_rank,
        "raw_homology_rank": raw,
        "chance_homology_rank": (n_human + 1) / 2,
        "improvement_over_raw": (raw - consensus_rank) / raw,
        "beats_raw": bool(consensus_rank < raw),
    }


def embed_metrics(emb: Embeddings, checkpoint: str, summary: pd.DataFrame | None) -> dict[str, Any]:
    """Ranks and validation figures of the embedded replicates; `replicates_left_out` counts the others."""
    metrics: dict[str, Any] = {
        "checkpoint": checkpoint,
        "homology_rank": {str(r): float(v) for r, v in zip(emb.replicates, emb.ranks, strict=True)},
        "homology_rank_mean": float(np.mean(emb.ranks)),
        "replicates_left_out": len(emb.left_out),
        **_against_raw(emb.consensus_rank, emb.raw_rank, len(emb.human_regions)),
    }
    if summary is not None:
        embedded = summary[summary["replicate"].isin(emb.replicates)]
        metrics["best_valid_loss"] = float(embedded["best_valid_loss"].mean())
        metrics["best_valid_acc"] = float(embedded["best_valid_acc"].mean())
    return metrics


def pool_data_sets(
    consensus: list[np.ndarray], per_set: list[dict[str, Any]], last: Embeddings
) -> tuple[np.ndarray, dict[str, Any]]:
    """The answer of a whole job (the published one pools 100 data sets x 10 replicates): the mean of the
    data sets' consensus correlations, each the mean over its embedded replicates and weighed by their
    number, so every model weighs the same (a set with a replicate left out counts for one model less);
    its homology rank, beside the mean rank over every model. `last` gives the regions and pairs, which
    every data set of a job shares. The validation figures are pooled by the same weights."""
    models = [len(one["homology_rank"]) for one in per_set]
    pooled = np.average(consensus, axis=0, weights=models)
    ranks = [rank for one in per_set for rank in one["homology_rank"].values()]
    h_idx, m_idx = last.pair_idx
    metrics: dict[str, Any] = {
        "data_sets": len(per_set),
        "models": len(ranks),
        "homology_rank_mean": float(np.mean(ranks)),
        "replicates_left_out": sum(one["replicates_left_out"] for one in per_set),
        **_against_raw(float(homology_rank(torch.from_numpy(pooled), h_idx, m_idx)), last.raw_rank, len(last.human_regions)),
    }
    for key in ("best_valid_loss", "best_valid_acc"):
        values = [one[key] for one in per_set if key in one]
        if len(values) == len(per_set):
            metrics[key] = float(np.average(values, weights=models))
    return pooled, metrics


def write_embeddings(emb: Embeddings, layout: RunLayout, metrics: dict[str, Any]) -> list[str]:
    """Per embedded replicate: human/mouse embedding CSVs and the correlation; then consensus and
    metrics.json. Replicate folders of an earlier embedding that this one has not (a training with more
    replicates, a replicate left out) are removed: they belong to another model."""
    written = []
    for i, r in enumerate(emb.replicates):
        folder = layout.replicate_dir(r)
        written.append(write_csv(folder / "human_embedding.csv", embedding_frame(emb.human[i], emb.human_regions)))
        written.append(write_csv(folder / "mouse_embedding.csv", embedding_frame(emb.mouse[i], emb.mouse_regions)))
        written.append(write_csv(folder / "correlation.csv", correlation_frame(emb.correlation[i], emb)))
    written.append(write_csv(layout.consensus, correlation_frame(emb.consensus, emb)))
    written.append(write_json(layout.metrics, metrics))
    remove_others(layout.embed_dir, "replicate_*", {layout.replicate_dir(r) for r in emb.replicates})
    return [str(p) for p in written]
