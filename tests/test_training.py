"""Training loop semantics on tiny real files: seeds, early stopping, validation coverage, checkpoints."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TinyData
from transdnn.atomic import AlternatingFile
from transdnn.checkpoints import StoredModel
from transdnn.data import GeneList, load_partition_inputs, load_training_set
from transdnn.embed import embed_matrix
from transdnn.errors import InputError
from transdnn.settings import load_settings, override
from transdnn.training import Trainer, load_state, train


def _setup(params: Path, tiny: TinyData, **train_overrides):
    part = override(load_settings(params).cortex, "train", **train_overrides)
    inputs = load_partition_inputs(tiny.human, tiny.mouse, tiny.genes, tiny.homology)
    return part, inputs, load_training_set(tiny.train, inputs.genes)


def test_same_seed_same_weights_and_history(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny)
    a = train(ts, inputs, part, torch.device("cpu"))
    b = train(ts, inputs, part, torch.device("cpu"))
    for kind in a.checkpoints:
        for name, t in a.checkpoints[kind].items():
            assert torch.equal(t, b.checkpoints[kind][name]), (kind, name)
    assert a.history.equals(b.history)
    c = train(ts, inputs, override(part, "train", seed=7), torch.device("cpu"))
    assert not torch.equal(a.checkpoints["best_valid"]["weights.0"], c.checkpoints["best_valid"]["weights.0"])


def test_replicates_differ_and_every_validation_row_is_scored(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny, replicates=3)
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    n_valid = trainer.valid_mask.sum(dim=1)
    # 4 samples/region -> max(1, round(0.4)) = 1 sample of 12 cells per region, 6 regions
    assert n_valid.tolist() == [72, 72, 72]
    for r in range(3):
        valid_rows = trainer.valid_idx[r][trainer.valid_mask[r]].numpy()
        train_rows = trainer.train_idx[r].numpy()
        assert not set(ts.row_sample[valid_rows]) & set(ts.row_sample[train_rows])
    assert not torch.equal(trainer.model.weights[0][0], trainer.model.weights[0][1])


@pytest.mark.parametrize("scaling", ["none", "train"])
def test_embed_scales_the_transform_sets_as_training_did(scaling: str, params: Path, tiny: TinyData):
    """The per-epoch homology rank (Trainer) and `transdnn embed` (a StoredModel) must feed the region
    means through the same `transform_scaling`, or the chosen checkpoints rank one thing and embed another."""
    part, inputs, ts = _setup(params, tiny, transform_scaling=scaling)
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    for _ in range(2):
        trainer.step_epoch()
    meta = {
        "genes": ts.genes,
        "regions": ts.regions,
        "hidden_units": part.model.hidden_units,
        "dropout": part.model.dropout,
        "dropout_mode": part.model.dropout_mode,
    }
    weights = dict(trainer.last_weights())
    epochs = torch.full((part.train.replicates,), 1)
    regions = np.concatenate([inputs.human.means, inputs.mouse.means])

    def embedded(how: str) -> np.ndarray:
        stored = StoredModel({**meta, "transform_scaling": how}, weights, trainer.mean, trainer.std, epochs)
        return embed_matrix(stored, regions, torch.device("cpu"))

    expected = trainer.embeddings().numpy()
    assert np.allclose(embedded(scaling), expected, atol=1e-5)
    assert not np.allclose(embedded("none" if scaling == "train" else "train"), expected, atol=1e-3)


def test_early_stopping_fires_after_patience_without_improvement(params: Path, tiny: TinyData):
    # a learning rate this high diverges: validation loss stops improving and patience ends training
    part, inputs, ts = _setup(params, tiny, learning_rate=5.0, max_epochs=40, patience=2)
    result = train(ts, inputs, part, torch.device("cpu"))
    assert result.summary["early_stopped"].all()
    assert (result.summary["epochs_run"] < 40).all()
    # the best-validation checkpoint always exists (the tracker starts at +inf)
    assert (result.summary["best_valid_epoch"] >= 0).all()
    for r, row in result.summary.iterrows():
        hist = result.history[result.history.replicate == r]
        assert len(hist) == row.epochs_run
        assert row.best_valid_loss == pytest.approx(hist.valid_loss.min(), rel=1e-6)


def test_a_diverged_replicate_stops_at_once_and_sets_no_best(params: Path, tiny: TinyData):
    """Non-finite weights (what too large a learning rate leaves) never recover: the replicate stops in the
    epoch its validation loss turns non-finite, no best is taken from it, and the summary says so. The
    other replicate trains on, untouched."""
    part, inputs, ts = _setup(params, tiny, max_epochs=8, patience=3, replicates=2)
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    with torch.no_grad():
        trainer.model.weights[1][1].fill_(float("nan"))
    while not trainer.done:
        trainer.step_epoch()
    result = trainer.result()
    summary = result.summary
    assert summary["diverged"].tolist() == [False, True]
    epochs = {kind: result.checkpoint_epochs[kind].tolist() for kind in ("best_valid", "best_rank", "last")}
    assert epochs == {"best_valid": [epochs["best_valid"][0], -1], "best_rank": [epochs["best_rank"][0], -1], "last": [7, -1]}, (
        "no checkpoint of the diverged replicate holds an epoch's trained weights"
    )
    assert summary["epochs_run"].tolist() == [8, 1] and summary["early_stopped"].tolist() == [False, False]
    assert summary.loc[1, ["best_valid_epoch", "best_rank_epoch"]].tolist() == [-1, -1], "NaN weights are no best"
    assert summary.loc[0, "best_valid_epoch"] >= 0 and np.isfinite(summary.loc[0, "best_valid_loss"])


def test_stopped_replicates_leave_the_model_and_keep_their_last_weights(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny, learning_rate=5.0, max_epochs=40, patience=1, replicates=2)
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    while not trainer.done:
        trainer.step_epoch()
        if not bool(trainer.active.all()) and bool(trainer.active.any()):
            r = int((~trainer.active).nonzero()[0])
            at_stop = trainer.last_weights()["weights.0"][r].clone()
            assert trainer.live.tolist() == [1 - r]
            assert trainer.model.weights[0].shape[0] == 1, "the stopped replicate is no longer computed"
            trainer.step_epoch()
            assert torch.equal(trainer.last_weights()["weights.0"][r], at_stop)
            return
    pytest.fail("the high learning rate should stop one replicate before the other")


def test_retiring_a_replicate_leaves_the_others_arithmetic_alone(params: Path, tiny: TinyData):
    """Without dropout (the only draw shared by replicates), a replicate trains the same whether or not
    another one left the model: its weights, optimiser state and inputs were sliced, not mixed up."""
    part = override(_setup(params, tiny, replicates=3)[0], "model", dropout=0.0)
    _, inputs, ts = _setup(params, tiny)
    full, compact = (Trainer(ts, inputs, part, torch.device("cpu")) for _ in range(2))
    for trainer in (full, compact):
        trainer.step_epoch()
        trainer.step_epoch()
    leaving = torch.tensor([False, True, False])
    compact._retire(leaving)
    compact.active &= ~leaving
    assert compact.live.tolist() == [0, 2]
    assert torch.equal(compact.last_weights()["weights.0"][1], full.model.weights[0][1])
    full_metrics, compact_metrics = full.step_epoch(), compact.step_epoch()
    for a, b in zip(full.model.parameters(), compact.model.parameters(), strict=True):
        assert torch.allclose(a[[0, 2]], b, rtol=1e-5, atol=1e-7)
    kept = full_metrics[full_metrics.replicate != 1].reset_index(drop=True)
    assert kept.replicate.tolist() == compact_metrics.replicate.tolist() == [0, 2]
    assert np.allclose(kept.valid_loss, compact_metrics.valid_loss, rtol=1e-5)


@pytest.mark.parametrize("scaling", ["none", "train"])
def test_cached_validation_inputs_score_and_embed_like_separate_passes(scaling: str, params: Path, tiny: TinyData):
    """The one forward pass over the cached validation rows and the region means gives the chunked
    validation's scores and the embeddings the homology rank would compute on its own, also after a
    replicate has left the model."""
    part, inputs, ts = _setup(params, tiny, transform_scaling=scaling, replicates=3)
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    trainer.step_epoch()
    for leaving in (None, torch.tensor([False, True, False])):
        if leaving is not None:
            trainer._retire(leaving)
            trainer.active &= ~leaving
        assert trainer.scored_inputs is not None, "a small validation set is gathered and scaled once"
        loss, acc, regions = trainer._valid_pass()
        cached, trainer.scored_inputs = trainer.scored_inputs, None
        chunked_loss, chunked_acc, no_regions = trainer._valid_pass()
        trainer.scored_inputs = cached
        assert no_regions is None
        assert torch.allclose(loss, chunked_loss, rtol=1e-6) and torch.equal(acc, chunked_acc)
        assert regions is not None and regions.shape == (
            len(trainer.live),
            len(trainer.region_inputs),
            part.model.hidden_units[-1],
        )
        assert torch.allclose(regions, trainer.embeddings(), rtol=1e-5, atol=1e-6)
        assert torch.equal(trainer._rank(regions), trainer._rank(None))


def test_only_the_checkpoints_asked_for_are_kept(params: Path, tiny: TinyData):
    """By default only embed.checkpoint is kept; "last" is the live model, with stopped replicates as they stopped."""
    part, inputs, ts = _setup(params, tiny, learning_rate=5.0, max_epochs=40, patience=1, replicates=3)
    default = train(ts, inputs, part, torch.device("cpu"))
    assert list(default.checkpoints) == ["best_valid"]
    part = override(part, "train", extra_checkpoints=["last", "best_rank"])
    trainer = Trainer(ts, inputs, part, torch.device("cpu"))
    assert list(trainer.snapshots) == ["best_valid", "best_rank"], "no per-epoch copy is made for last"
    at_stop = {}
    while not trainer.done:
        before = trainer.active.clone()
        trainer.step_epoch()
        for r in (before & ~trainer.active).nonzero().flatten().tolist():
            at_stop[r] = trainer.last_weights()["weights.0"][r].clone()
    result = trainer.result()
    assert list(result.checkpoints) == ["best_valid", "best_rank", "last"]
    assert at_stop, "the high learning rate stops replicates early"
    for r, weights in at_stop.items():
        assert torch.equal(result.checkpoints["last"]["weights.0"][r], weights), r
    assert torch.equal(result.checkpoints["best_valid"]["weights.0"], default.checkpoints["best_valid"]["weights.0"])


def test_shuffled_labels_do_not_learn(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny, max_epochs=15)
    real = train(ts, inputs, part, torch.device("cpu"))
    shuffled = train(ts, inputs, override(part, "train", shuffle_labels=True), torch.device("cpu"))
    assert real.summary.best_valid_acc.mean() > 0.9
    assert shuffled.summary.best_valid_acc.mean() < 0.5


def test_validation_smaller_than_a_batch_is_fine(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny, batch_size=256, max_epochs=2)
    result = train(ts, inputs, part, torch.device("cpu"))
    assert np.isfinite(result.history.valid_loss).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_closely(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny)
    cpu = train(ts, inputs, part, torch.device("cpu"))
    gpu = train(ts, inputs, part, torch.device("cuda"))
    assert np.allclose(cpu.history.valid_loss, gpu.history.valid_loss, rtol=1e-3, atol=1e-3)


def test_bf16_autocast_tracks_fp32_closely(params: Path, tiny: TinyData):
    """The opt-in bf16 path (the same code CUDA runs, under autocast) learns what fp32 learns."""
    part, inputs, ts = _setup(params, tiny, max_epochs=6)
    fp32 = train(ts, inputs, part, torch.device("cpu"))
    bf16 = train(ts, inputs, override(part, "train", precision="bf16"), torch.device("cpu"))
    assert all(t.dtype == torch.float32 for t in bf16.checkpoints["best_valid"].values()), "weights stay fp32"
    assert np.allclose(fp32.history.valid_loss, bf16.history.valid_loss, rtol=0.05, atol=0.02)
    assert abs(fp32.history.homology_rank.iloc[-1] - bf16.history.homology_rank.iloc[-1]) <= 1.0


def test_epoch_time_is_accounted_for(params: Path, tiny: TinyData):
    part, inputs, ts = _setup(params, tiny, max_epochs=3)
    seconds = train(ts, inputs, part, torch.device("cpu")).seconds
    assert seconds["epochs"] == 3
    assert seconds["train_pass"] > 0 and seconds["validation"] > 0 and seconds["homology_rank"] > 0
    assert seconds["resume_state"] == 0, "no state file was asked for"


def test_resume_states_follow_the_time_interval(params: Path, tiny: TinyData, tmp_path: Path):
    part, inputs, ts = _setup(params, tiny, max_epochs=4)
    writes = []

    class CountingFile(AlternatingFile):
        def write(self, save):
            writes.append(1)
            return super().write(save)

    for every, expected in ((0, 3), (3600, 0), (None, 0)):
        writes.clear()
        timed = part.model_copy(update={"train": part.train.model_copy(update={"state_every_s": every})})
        train(ts, inputs, timed, torch.device("cpu"), state=CountingFile(tmp_path / "s.pt"))
        assert len(writes) == expected, every


def test_resume_state_missing_a_kept_checkpoint_is_refused(params: Path, tiny: TinyData, tmp_path: Path):
    part, inputs, ts = _setup(params, tiny, max_epochs=3)
    state = AlternatingFile(tmp_path / "s.pt")
    with pytest.raises(KeyboardInterrupt):
        train(ts, inputs, part, torch.device("cpu"), _InterruptAt(0), state)
    assert load_state(state.current(), ts, part)["epoch"] == 1
    wider = override(part, "train", extra_checkpoints=["best_rank"])
    with pytest.raises(InputError, match="resume state keeps checkpoints"):
        load_state(state.current(), ts, wider)


def test_resume_after_replicates_stopped_continues_bit_for_bit(params: Path, tiny: TinyData, tmp_path: Path):
    part, inputs, ts = _setup(
        params, tiny, learning_rate=5.0, max_epochs=40, patience=1, replicates=3, extra_checkpoints=["best_rank", "last"]
    )
    straight = train(ts, inputs, part, torch.device("cpu"))
    first_stop = int(straight.summary.epochs_run.min()) - 1
    assert first_stop < int(straight.summary.epochs_run.max()) - 2, "replicates should stop at different epochs"
    state = AlternatingFile(tmp_path / "s.pt")
    with pytest.raises(KeyboardInterrupt):
        train(ts, inputs, part, torch.device("cpu"), _InterruptAt(first_stop + 1), state)
    saved = load_state(state.current(), ts, part)
    assert len(saved["live"]) < 3, "the state was written after a replicate had stopped"
    resumed = train(ts, inputs, part, torch.device("cpu"), resume_from=saved)
    for kind, weights in straight.checkpoints.items():
        for name, t in weights.items():
            assert torch.equal(t, resumed.checkpoints[kind][name]), (kind, name)
    pd.testing.assert_frame_equal(straight.history, resumed.history, check_dtype=False, rtol=0, atol=0)


def test_resume_state_without_the_live_set_is_refused(params: Path, tiny: TinyData, tmp_path: Path):
    """A state from before stopped replicates left the model cannot be continued by this loop."""
    part, inputs, ts = _setup(params, tiny, max_epochs=3)
    state = AlternatingFile(tmp_path / "s.pt")
    with pytest.raises(KeyboardInterrupt):
        train(ts, inputs, part, torch.device("cpu"), _InterruptAt(0), state)
    old = torch.load(state.current(), weights_only=True)
    del old["live"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(InputError, match="lacks 'live'"):
        load_state(tmp_path / "old.pt", ts, part)


def test_resume_state_of_another_gene_order_is_refused(params: Path, tiny: TinyData, tmp_path: Path):
    """Same shapes, genes in another order: continuing would feed each input weight another gene."""
    part, inputs, ts = _setup(params, tiny, max_epochs=3)
    state = AlternatingFile(tmp_path / "s.pt")
    with pytest.raises(KeyboardInterrupt):
        train(ts, inputs, part, torch.device("cpu"), _InterruptAt(0), state)
    load_state(state.current(), ts, part)  # the training that wrote it resumes
    reordered = load_training_set(tiny.train, GeneList(tiny.genes, ts.genes[::-1]))
    with pytest.raises(InputError, match="another gene list or gene order"):
        load_state(state.current(), reordered, part)
    old = torch.load(state.current(), weights_only=True)
    del old["genes"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(InputError, match="lacks its gene list"):
        load_state(tmp_path / "old.pt", ts, part)


class _InterruptAt:
    """A sink that presses Ctrl-C during one epoch's report: training keeps that epoch and stops."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch(self, epoch, metrics):
        if epoch == self.epoch:
            signal.raise_signal(signal.SIGINT)

    def flush(self):
        return None
