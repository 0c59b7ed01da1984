"""The embedded default data plant a homology that a trained model finds and raw expression misses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import REPO
from transdnn.checkpoints import StoredModel
from transdnn.data import check_training_regions, load_partition_inputs, load_training_set
from transdnn.embed import embed_inputs
from transdnn.settings import load_settings, override
from transdnn.synth import SynthPaths, atlas_regions, synthesize
from transdnn.training import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    settings = load_settings(REPO / "params.yaml")
    root = tmp_path_factory.mktemp("synth")
    synthesize(settings.synth.model_copy(update={"out": root}), ("cortex", "subcortex"))
    return root


def _consensus(partition: str, root: Path, shuffle: bool, epochs: int) -> tuple[float, float, int]:
    settings = load_settings(REPO / "params.yaml")
    part = override(settings.partition(partition), "train", replicates=2, max_epochs=epochs, shuffle_labels=shuffle, device="cpu")
    paths = SynthPaths(root, partition)
    inputs = load_partition_inputs(paths.human, paths.mouse, paths.genes, paths.homology)
    ts = load_training_set(paths.train(0), inputs.genes)
    check_training_regions(ts, inputs.homology)
    result = train(ts, inputs, part, torch.device("cpu"))
    meta = {
        "genes": result.genes,
        "regions": result.regions,
        "hidden_units": part.model.hidden_units,
        "dropout": 0.1,
        "dropout_mode": "unit",
        "transform_scaling": "none",
    }
    stored = StoredModel(meta, result.checkpoints["best_valid"], result.scaler_mean, result.scaler_std, torch.zeros(2))
    emb = embed_inputs(stored, inputs, torch.device("cpu"))
    return emb.consensus_rank, emb.raw_rank, len(inputs.human.regions)


def test_real_shapes_and_region_names(synth_root: Path):
    paths = SynthPaths(synth_root, "cortex")
    inputs = load_partition_inputs(paths.human, paths.mouse, paths.genes, paths.homology)
    assert len(inputs.genes.genes) == 4542 and len(inputs.homology.human) == 41
    assert inputs.human.regions == sorted(atlas_regions("human_bn_cortex"))
    assert len(inputs.mouse.regions) == 39
    sub = SynthPaths(synth_root, "subcortex")
    sub_inputs = load_partition_inputs(sub.human, sub.mouse, sub.genes, sub.homology)
    assert len(sub_inputs.genes.genes) == 5063 and len(sub_inputs.human.regions) == 22 and len(sub_inputs.homology.human) == 9
    ts = load_training_set(paths.train(0), inputs.genes)
    assert ts.X.shape == (105 * 6 * 8, 4542)


@pytest.mark.parametrize("partition", ["cortex", "subcortex"])
def test_trained_model_beats_raw_expression_and_shuffled_control_does_not(partition: str, synth_root: Path):
    trained, raw, n_human = _consensus(partition, synth_root, shuffle=False, epochs=15)
    shuffled, _, _ = _consensus(partition, synth_root, shuffle=True, epochs=15)
    chance = (n_human + 1) / 2
    assert raw < chance, "raw expression carries some homology"
    assert trained < 0.75 * raw, f"trained {trained} vs raw {raw}"
    assert shuffled > 0.9 * raw, f"shuffled {shuffled} vs raw {raw}"
    assert shuffled > trained
