"""Training loop: all replicates of one partition trained together on in-memory tensors.

Reference semantics (AdamW, StepLR, batch 256 with the last partial training batch dropped, early
stopping on validation loss, per-epoch homology rank, best-loss / best-rank / last checkpoints), without
its defects:
every validation row is scored, the best trackers start at +inf, dropout drops units, runs are seeded.
What happened is reported through a `TrainingSink`; the loop itself never touches tracking.
"""

from __future__ import annotations

import pickle
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from transdnn.atomic import AlternatingFile
from transdnn.choices import CHECKPOINTS, Checkpoint
from transdnn.data import PartitionInputs, TrainingSet
from transdnn.errors import InputError, first_line
from transdnn.hardware import reuse_freed_memory
from transdnn.homology import homology_rank, pair_indices, pearson
from transdnn.model import StackedMLP, seeds_for
from transdnn.settings import PartitionSettings
from transdnn.split import fit_scalers, split_rows, split_samples

EPOCH_METRICS = ("train_loss", "train_acc", "valid_loss", "valid_acc", "homology_rank", "lr")
VALID_CHUNK = 2048  # validation rows per replicate scored in one forward pass


class TrainingSink(Protocol):
    """Receives what the loop did; tracking and progress bars implement it, tests pass `NullSink`."""

    def on_epoch(self, epoch: int, metrics: pd.DataFrame) -> None:
        """`metrics`: one row per replicate still training, columns `replicate` + EPOCH_METRICS."""

    def flush(self) -> None:
        """Make everything reported so far durable; called before each resume state is written, so a
        resumed run replays exactly the epochs whose reports may have been lost."""


class NullSink:
    def on_epoch(self, epoch: int, metrics: pd.DataFrame) -> None:
        return None

    def flush(self) -> None:
        return None


@dataclass
class TrainResult:
    """Everything training produced: stacked checkpoints, scaler statistics, history and summary."""

    regions: list[str]
    genes: list[str]
    checkpoints: dict[Checkpoint, dict[str, torch.Tensor]]  # kept kind -> parameter name -> (R, ...) tensor
    checkpoint_epochs: dict[Checkpoint, np.ndarray]  # kind -> epoch per replicate (-1: no finite-loss epoch's weights)
    scaler_mean: torch.Tensor  # (R, G)
    scaler_std: torch.Tensor  # (R, G)
    history: pd.DataFrame  # one row per replicate-epoch
    summary: pd.DataFrame  # one row per replicate
    seconds: dict[str, float]  # wall time per part of the epochs this process ran (see Trainer.seconds)


@dataclass
class _Split:
    train_idx: list[np.ndarray]
    valid_idx: list[np.ndarray]


def _splits(train: TrainingSet, ratio: float, seeds: list[int]) -> _Split:
    tr, va = [], []
    for seed in seeds:
        valid_samples = split_samples(train.sample_region, ratio, np.random.default_rng(seed))
        t, v = split_rows(train.row_sample, valid_samples)
        tr.append(t)
        va.append(v)
    return _Split(tr, va)


def _padded(indices: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ragged index lists into (R, max_len) with a validity mask."""
    width = max(len(i) for i in indices)
    out = np.zeros((len(indices), width), dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=bool)
    for r, idx in enumerate(indices):
        out[r, : len(idx)] = idx
        mask[r, : len(idx)] = True
    return torch.from_numpy(out).to(device), torch.from_numpy(mask).to(device)


class Trainer:
    """Owns the state of one partition's training: model, optimiser, scheduler, trackers, snapshots."""

    def __init__(self, train: TrainingSet, inputs: PartitionInputs, settings: PartitionSettings, device: torch.device) -> None:
        self.cfg = settings.train
        self.kinds = settings.checkpoint_kinds
        self.device = device
        n_in, n_out = train.units(settings.model)
        self.train_set = train
        R = self.cfg.replicates
        self.seeds = seeds_for(self.cfg.seed, R, train.path.stem)
        self.X = torch.from_numpy(train.X).to(device)
        split = _splits(train, self.cfg.valid_ratio, self.seeds)
        self.train_idx = [torch.from_numpy(t) for t in split.train_idx]
        self.valid_idx, self.valid_mask = _padded(split.valid_idx, device)
        masks = torch.zeros(R, len(train.labels), dtype=torch.bool)
        for r, t in enumerate(split.train_idx):
            masks[r, t] = True
        self.mean, self.std = fit_scalers(self.X, masks.to(device))
        self.inv_std = 1 / self.std
        self.shift = -self.mean * self.inv_std  # scaling is one fused multiply-add: x * inv_std + shift
        # The replicates still training, in the model's order: a replicate that stops early leaves the
        # model (and its optimiser state and inputs), so the epochs after it cost only the others' work.
        self.live = torch.arange(R, device=device)
        self._buffer: torch.Tensor | None = None
        self._prepare_homology(inputs)
        # A validation set that fits in one chunk is gathered and scaled once (~10 % of every validation
        # pass saved), with the transform sets' region means behind it: one forward pass then scores
        # validation and embeds the regions for the homology rank, reading the weights once, not twice.
        self.scored_inputs: torch.Tensor | None = None
        width = self.valid_idx.shape[1]
        if width <= VALID_CHUNK:
            self.scored_inputs = torch.empty(R, width + len(self.region_inputs), n_in, device=device)
            self._scaled(self.valid_idx, self.scored_inputs[:, :width])
            self.scored_inputs[:, width:] = self.transform_inputs()
        labels = torch.from_numpy(train.labels)
        Y = labels.repeat(R, 1)
        if self.cfg.shuffle_labels:
            for r, t in enumerate(split.train_idx):
                gen = torch.Generator().manual_seed(self.seeds[r] + 2)
                Y[r, t] = labels[t][torch.randperm(len(t), generator=gen)]
        self.Y = Y.to(device)
        self.gens = [torch.Generator().manual_seed(s + 1) for s in self.seeds]
        torch.manual_seed(self.cfg.seed)  # dropout draws
        self.model = StackedMLP(R, n_in, settings.model.hidden_units, n_out, settings.model.dropout, settings.model.dropout_mode)
        self.model.reset_parameters(self.seeds)
        self.model.to(device)
        self.retired: dict[str, torch.Tensor] | None = None  # (R, ...) last weights of stopped replicates
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay, fused=True
        )
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.cfg.lr_step, gamma=self.cfg.lr_gamma)
        self.active = torch.ones(R, dtype=torch.bool, device=device)
        self.best = {
            "valid_loss": torch.full((R,), torch.inf, dtype=torch.float64),
            "homology_rank": torch.full((R,), torch.inf, dtype=torch.float64),
        }
        self.best_epoch = {kind: np.full(R, -1) for kind in CHECKPOINTS}
        self.stale = np.zeros(R, dtype=np.int64)
        self.epochs_run = np.zeros(R, dtype=np.int64)
        self.snapshots = {kind: self._copy_of_model() for kind in _snapshot_kinds(settings)}
        self.epoch = 0
        self.rows: list[pd.DataFrame] = []
        self.autocast = self.cfg.precision == "bf16"
        # Where the epochs' time goes: the training pass, and the per-epoch work beyond it.
        self.seconds = dict.fromkeys(
            ("train_pass", "validation", "homology_rank", "bookkeeping", "tracking", "resume_state"), 0.0
        )
        self.seconds["epochs"] = 0

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the wall time of a block to `seconds[part]` (device work included: CUDA is synchronised)."""
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[part] += time.perf_counter() - start

    def _prepare_homology(self, inputs: PartitionInputs) -> None:
        self.human_regions = inputs.human.regions
        self.mouse_regions = inputs.mouse.regions
        self.h_idx, self.m_idx = pair_indices(
            inputs.human.regions, inputs.mouse.regions, inputs.homology.human, inputs.homology.mouse
        )
        self.region_inputs = torch.from_numpy(np.concatenate([inputs.human.means, inputs.mouse.means])).to(self.device)

    def _amp(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _scaled(self, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Gather (R, N) rows into `out` (default: a reused buffer) and scale them in place: no fresh large
        allocations per step (on CPU, fresh multi-MB tensors cost page faults that rival the matmuls).
        Each replicate's rows are gathered apart, so `out` may be a slice of a larger tensor."""
        if out is None:
            size = idx.numel() * self.X.shape[1]
            if self._buffer is None or self._buffer.numel() < size:
                self._buffer = torch.empty(size, device=self.device)
            out = self._buffer[:size].view(*idx.shape, self.X.shape[1])
        for rows, block in zip(idx, out, strict=True):
            torch.index_select(self.X, 0, rows, out=block)
        return torch.addcmul(self.shift[:, None, :], out, self.inv_std[:, None, :], out=out)

    def transform_inputs(self) -> torch.Tensor:
        """Region-averaged transform sets as model input (one copy per live replicate); the training
        scaler applies only if asked."""
        x = self.region_inputs.expand(len(self.live), -1, -1)
        if self.cfg.transform_scaling == "train":
            x = (x - self.mean[self.live, None, :]) / self.std[self.live, None, :]
        return x

    def _batches(self) -> torch.Tensor:
        """(steps, live replicates, B) row indices: a fresh shuffle per replicate; the last partial batch
        is dropped.

        Replicates whose split left fewer full batches than the largest one top up from a second shuffle,
        so all replicates step together.
        """
        B = self.cfg.batch_size
        live = self.live.tolist()
        steps = max(1, max(len(self.train_idx[r]) // B for r in live))
        cols = []
        for t, gen in ((self.train_idx[r], self.gens[r]) for r in live):
            order = t[torch.randperm(len(t), generator=gen)]
            while len(order) < steps * B:
                order = torch.cat([order, t[torch.randperm(len(t), generator=gen)]])
            cols.append(order[: steps * B].view(steps, B))
        return torch.stack(cols, dim=1).to(self.device)

    def _train_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One epoch of every live replicate: (L,) mean loss and accuracy."""
        self.model.train()
        batches = self._batches()
        loss_sum = torch.zeros(len(self.live), device=self.device)
        correct = torch.zeros(len(self.live), device=self.device)
        rows = self.live[:, None]
        for idx in batches:
            with self._amp():
                logits, _ = self.model(self._scaled(idx))
            target = self.Y[rows, idx]
            losses = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").mean(dim=1)
            self.optimizer.zero_grad(set_to_none=True)  # fresh gradients are taken over, not added (see reuse_freed_memory)
            losses.sum().backward()
            self.optimizer.step()
            loss_sum += losses.detach()
            correct += (logits.detach().argmax(-1) == target).sum(dim=1)
        return loss_sum / len(batches), correct / (len(batches) * self.cfg.batch_size)

    def _copy_of_model(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters()}

    def _retire(self, stopping: torch.Tensor) -> None:
        """Keep the last weights of the replicates that stop now, then drop them from the model, the
        optimiser state and the per-replicate inputs. The others' arithmetic is unchanged (replicates
        share no tensor); only the global dropout draws, made for fewer replicates, follow a new course."""
        leaving = stopping[self.live]
        if not bool(leaving.any()):
            return
        params = dict(self.model.named_parameters())
        if self.retired is None:
            self.retired = {n: p.new_zeros((self.cfg.replicates, *p.shape[1:])) for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                self.retired[n][self.live[leaving]] = p[leaving]
        keep = (~leaving).nonzero().flatten()
        if len(keep) == 0:
            return  # the last replicates stopped: training is over, the model stays as it ended
        for p in params.values():
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape:
                    state[key] = value[keep]
            p.grad = None
            p.data = p.data[keep]
        self.model.replicates = len(keep)
        self.live = self.live[keep]
        self.inv_std, self.shift = self.inv_std[keep], self.shift[keep]
        if self.scored_inputs is not None:
            self.scored_inputs = self.scored_inputs[keep]

    def last_weights(self) -> dict[str, torch.Tensor]:
        """(R, ...) weights as each replicate ended its last epoch: live ones from the model, stopped
        ones as they stopped."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        if self.retired is None:
            return params
        for n, p in params.items():
            self.retired[n][self.live] = p
        return self.retired

    @torch.no_grad()
    def _valid_pass(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Score every validation row of every live replicate (no drop_last): (L,) loss and accuracy, and
        the regions' embeddings when they rode along (see `scored_inputs`)."""
        self.model.eval()
        loss_sum = torch.zeros(len(self.live), device=self.device, dtype=torch.float64)
        correct = torch.zeros(len(self.live), device=self.device, dtype=torch.float64)
        rows = self.live[:, None]
        valid_idx, valid_mask = self.valid_idx[self.live], self.valid_mask[self.live]
        width = valid_idx.shape[1]
        regions = None
        for start in range(0, width, VALID_CHUNK):
            idx = valid_idx[:, start : start + VALID_CHUNK]
            mask = valid_mask[:, start : start + VALID_CHUNK]
            with self._amp():
                if self.scored_inputs is None:
                    logits, _ = self.model(self._scaled(idx))
                else:
                    logits, embedding = self.model(self.scored_inputs)
                    logits, regions = logits[:, :width], embedding[:, width:].float()
            target = self.Y[rows, idx]
            losses = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            loss_sum += (losses * mask).sum(dim=1)
            correct += ((logits.argmax(-1) == target) & mask).sum(dim=1)
        n = valid_mask.sum(dim=1)
        return (loss_sum / n).float(), (correct / n).float(), regions

    @torch.no_grad()
    def embeddings(self) -> torch.Tensor:
        """(L, human + mouse regions, H) embeddings of the live replicates in one batched forward pass."""
        self.model.eval()
        with self._amp():
            return self.model.embed(self.transform_inputs()).float()

    @torch.no_grad()
    def _rank(self, emb: torch.Tensor | None) -> torch.Tensor:
        """(L,) homology rank of the regions' embeddings (computed here unless validation made them)."""
        emb = self.embeddings() if emb is None else emb
        n_h = len(self.human_regions)
        corr = pearson(emb[:, :n_h].double(), emb[:, n_h:].double())
        return homology_rank(corr, self.h_idx, self.m_idx)

    def _snapshot(self, kind: Checkpoint, where: torch.Tensor) -> None:
        """Copy the live model's weights into snapshot `kind` for the replicates marked in (R,) `where`."""
        if kind not in self.snapshots:
            return
        snap = self.snapshots[kind]
        position = {r: k for k, r in enumerate(self.live.tolist())}
        rows = [(r, position[r]) for r in where.nonzero().flatten().tolist()]
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                for r, k in rows:  # slice copies: no temporary of the whole stack
                    snap[name][r].copy_(p[k])

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.max_epochs or not bool(self.active.any())

    def step_epoch(self) -> pd.DataFrame:
        """Run one epoch for every active replicate; return its metrics (one row per active replicate)."""
        lr = self.optimizer.param_groups[0]["lr"]
        with self.timed("train_pass"):
            train_loss, train_acc = self._train_pass()
        with self.timed("validation"):
            valid_loss, valid_acc, region_embedding = self._valid_pass()
        with self.timed("homology_rank"):
            rank = self._rank(region_embedding)
        with self.timed("bookkeeping"):
            metrics = self._bookkeeping(lr, train_loss, train_acc, valid_loss, valid_acc, rank)
        self.seconds["epochs"] += 1
        return metrics

    def _bookkeeping(
        self,
        lr: float,
        train_loss: torch.Tensor,
        train_acc: torch.Tensor,
        valid_loss: torch.Tensor,
        valid_acc: torch.Tensor,
        rank: torch.Tensor,
    ) -> pd.DataFrame:
        """Best trackers, checkpoint snapshots, early stopping and the scheduler, after an epoch.

        The epoch's (L,) figures are for the live replicates, which are exactly the active ones."""
        active = self.active.cpu()
        live = self.live.cpu()
        vl = torch.full((self.cfg.replicates,), torch.nan, dtype=torch.float64).index_copy_(0, live, valid_loss.double().cpu())
        rk = torch.full((self.cfg.replicates,), torch.nan, dtype=torch.float64).index_copy_(0, live, rank.double().cpu())
        # A non-finite validation loss means non-finite weights: the replicate diverged, and no later epoch
        # can recover it. It stops here, and its rank (of NaN embeddings) is no best.
        finite = torch.isfinite(vl)
        better_loss = active & finite & (vl <= self.best["valid_loss"])
        better_rank = active & finite & (rk <= self.best["homology_rank"])
        self.best["valid_loss"] = torch.where(better_loss, vl, self.best["valid_loss"])
        self.best["homology_rank"] = torch.where(better_rank, rk, self.best["homology_rank"])
        self._snapshot("best_valid", better_loss)
        self._snapshot("best_rank", better_rank)
        a = active.numpy()
        self.best_epoch["best_valid"][better_loss.numpy()] = self.epoch
        self.best_epoch["best_rank"][better_rank.numpy()] = self.epoch
        diverged = a & ~finite.numpy()
        self.best_epoch["last"][a] = self.epoch
        self.best_epoch["last"][diverged] = -1  # a diverged replicate's last weights are no epoch's
        self.epochs_run[a] += 1
        self.stale[better_loss.numpy()] = 0
        self.stale[a & ~better_loss.numpy()] += 1
        metrics = pd.DataFrame(
            {
                "epoch": self.epoch,
                "replicate": live.numpy(),
                "train_loss": train_loss.cpu().numpy(),
                "train_acc": train_acc.cpu().numpy(),
                "valid_loss": valid_loss.cpu().numpy(),
                "valid_acc": valid_acc.cpu().numpy(),
                "homology_rank": rank.double().cpu().numpy(),
                "lr": lr,
            }
        )
        self.rows.append(metrics)
        halted = (self.stale >= self.cfg.patience) | diverged
        stopping = torch.from_numpy(halted).to(self.device) & self.active
        self._retire(stopping)
        self.active &= ~stopping
        self.scheduler.step()
        self.epoch += 1
        return metrics

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit after a kill: weights (all replicates', as each
        ended its last epoch), the live replicates and their optimiser state, scheduler, RNG states,
        early-stopping counters, best snapshots, history. Plain tensors and numbers only, so it loads
        with `weights_only=True`."""
        history = (
            pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame(columns=["epoch", "replicate", *EPOCH_METRICS])
        )
        return {
            "epoch": self.epoch,
            "genes": list(self.train_set.genes),  # the input columns' order, which the weights depend on
            "model": {n: p.cpu() for n, p in self.last_weights().items()},
            "live": self.live.cpu(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng_global": torch.get_rng_state(),
            "rng_replicates": torch.stack([g.get_state() for g in self.gens]),
            "active": self.active.cpu(),
            "best_valid_loss": self.best["valid_loss"],
            "best_homology_rank": self.best["homology_rank"],
            "best_epoch": {k: torch.from_numpy(v) for k, v in self.best_epoch.items()},
            "stale": torch.from_numpy(self.stale),
            "epochs_run": torch.from_numpy(self.epochs_run),
            "snapshots": {k: {n: t.cpu() for n, t in snap.items()} for k, snap in self.snapshots.items()},
            "history": torch.from_numpy(history[["epoch", "replicate", *EPOCH_METRICS]].to_numpy(dtype=np.float64)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: all replicates' weights are loaded, then the stopped ones retire
        as they did, so the live model and its optimiser state take the shapes they were saved with."""
        self.epoch = int(state["epoch"])
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(state["model"][n])
                for kind, snap in self.snapshots.items():
                    snap[n].copy_(state["snapshots"][kind][n])
        stopped = torch.ones(self.cfg.replicates, dtype=torch.bool)
        stopped[state["live"]] = False
        self._retire(stopped.to(self.device))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_global"])
        for g, s in zip(self.gens, state["rng_replicates"], strict=True):
            g.set_state(s.clone())  # a row of a stacked tensor is a view; set_state needs its own storage
        self.active = state["active"].to(self.device)
        self.best = {"valid_loss": state["best_valid_loss"], "homology_rank": state["best_homology_rank"]}
        self.best_epoch = {k: v.numpy().copy() for k, v in state["best_epoch"].items()}
        self.stale = state["stale"].numpy().copy()
        self.epochs_run = state["epochs_run"].numpy().copy()
        hist = pd.DataFrame(state["history"].numpy(), columns=["epoch", "replicate", *EPOCH_METRICS])
        hist[["epoch", "replicate"]] = hist[["epoch", "replicate"]].astype(int)
        self.rows = [hist] if len(hist) else []

    def _weights_of(self, kind: Checkpoint) -> dict[str, torch.Tensor]:
        return self.last_weights() if kind == "last" else self.snapshots[kind]

    def result(self) -> TrainResult:
        history = pd.concat(self.rows, ignore_index=True)
        chosen = {kind: self.best_epoch[kind] for kind in CHECKPOINTS}
        summary = pd.DataFrame(
            {
                "replicate": np.arange(self.cfg.replicates),
                "seed": self.seeds,
                "best_valid_loss": self.best["valid_loss"].numpy(),
                "best_homology_rank": self.best["homology_rank"].numpy(),
                "best_valid_epoch": chosen["best_valid"],
                "best_rank_epoch": chosen["best_rank"],
                "epochs_run": self.epochs_run,
                "early_stopped": self.stale >= self.cfg.patience,
                "n_train_rows": [len(t) for t in self.train_idx],
                "n_valid_rows": self.valid_mask.sum(dim=1).cpu().numpy(),
            }
        )
        valid_acc_at_best = history.merge(
            summary[["replicate", "best_valid_epoch"]].rename(columns={"best_valid_epoch": "epoch"}), on=["replicate", "epoch"]
        ).set_index("replicate")["valid_acc"]
        summary["best_valid_acc"] = summary["replicate"].map(valid_acc_at_best)
        last = history.sort_values("epoch").groupby("replicate").tail(1).set_index("replicate")["valid_loss"]
        summary["diverged"] = ~np.isfinite(summary["replicate"].map(last).to_numpy(dtype=np.float64))
        return TrainResult(
            regions=self.train_set.regions,
            genes=self.train_set.genes,
            checkpoints={kind: {n: t.detach().cpu() for n, t in self._weights_of(kind).items()} for kind in self.kinds},
            checkpoint_epochs=chosen,
            scaler_mean=self.mean.cpu(),
            scaler_std=self.std.cpu(),
            history=history,
            summary=summary,
            seconds=dict(self.seconds),
        )


def _snapshot_kinds(settings: PartitionSettings) -> tuple[Checkpoint, ...]:
    """The kept checkpoints that need a copy of their own during training ("last" is the live model)."""
    return tuple(kind for kind in settings.checkpoint_kinds if kind != "last")


def train(
    train_set: TrainingSet,
    inputs: PartitionInputs,
    settings: PartitionSettings,
    device: torch.device,
    sink: TrainingSink | None = None,
    state: AlternatingFile | None = None,
    resume_from: dict[str, Any] | None = None,
) -> TrainResult:
    """Train all replicates of one partition on one training set.

    With `state`, the full training state is written there atomically once `state_every_s` seconds of
    training have passed since the last one (a kill loses at most that much work);
    `resume_from` (a state read back by `load_state`) continues from one: the replayed epochs are
    deterministic, so a killed run finishes with the weights of an uninterrupted one.
    """
    sink = sink or NullSink()
    trainer = Trainer(train_set, inputs, settings, device)
    if resume_from is not None:
        trainer.load_state_dict(resume_from)

    def save() -> None:
        if state is not None:
            with trainer.timed("tracking"):
                sink.flush()
            with trainer.timed("resume_state"), _without_crc32():
                state.write(lambda fh: torch.save(trainer.state_dict(), fh))

    every = settings.train.state_every_s
    last_state = time.monotonic()
    with _stop_after_epoch_on_sigint() as stop, reuse_freed_memory(device):
        while not trainer.done:
            metrics = trainer.step_epoch()
            with trainer.timed("tracking"):
                sink.on_epoch(trainer.epoch - 1, metrics)
            if stop.requested:
                save()  # Ctrl-C: keep the last complete epoch, then stop
                raise KeyboardInterrupt
            if every is not None and not trainer.done and time.monotonic() - last_state >= every:
                save()
                last_state = time.monotonic()
    return trainer.result()


@contextmanager
def _without_crc32() -> Iterator[None]:
    """The resume state is private and short-lived: skip torch.save's CRC32, 90 % of the time it takes to
    save 450 MB (torch.load reads the file without it; a truncated file still fails to load)."""
    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


class _StopFlag:
    requested = False


@contextmanager
def _stop_after_epoch_on_sigint() -> Iterator[_StopFlag]:
    """The first Ctrl-C finishes the current epoch and stops; a second one interrupts at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def load_state(path: Path, train_set: TrainingSet, settings: PartitionSettings) -> dict[str, Any]:
    """A resume state, loaded without executing any pickled code and checked against the training it
    should continue, so a wrong or damaged file is rejected before anything is written."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: unusable resume state ({first_line(exc)}); expected one written by `transdnn train`") from None
    expected = (settings.train.replicates, train_set.X.shape[1], settings.model.hidden_units[0])
    found = tuple(state["model"]["weights.0"].shape) if isinstance(state, dict) and "model" in state else None
    if found != expected:
        raise InputError(
            f"{path}: resume state is for (replicates, genes, hidden) = {found}, expected {expected} from params and data; "
            "resume only the training that wrote it"
        )
    if "live" not in state:
        raise InputError(
            f"{path}: resume state lacks 'live' (written by an older transdnn, which kept stopped replicates in the model); "
            "expected one written by this version: train afresh without --resume"
        )
    if "genes" not in state:
        raise InputError(
            f"{path}: resume state lacks its gene list (written by an older transdnn); expected one written by this "
            "version: train afresh without --resume"
        )
    if state["genes"] != train_set.genes:
        raise InputError(
            f"{path}: resume state was trained on another gene list or gene order than {settings.data.genes} gives "
            "(expected the gene list it was written with; resume only the training that wrote it)"
        )
    kept = set(state.get("snapshots", {}))
    needed = set(_snapshot_kinds(settings))
    if not needed <= kept:
        raise InputError(
            f"{path}: resume state keeps checkpoints {sorted(kept)}, params ask for {sorted(needed)}; "
            "resume with the train.extra_checkpoints and embed.checkpoint it was written with"
        )
    return state
