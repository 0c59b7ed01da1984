"""The training outputs on disk: where they live, and how checkpoints are saved and safely loaded.

Checkpoints are plain tensor dicts read back with `torch.load(weights_only=True)`: no pickled objects
are ever executed on the load path. Weights are stored as `train.checkpoint_dtype` says: float32, float16,
or int8 with a float32 scale per replicate and unit (`encode_weights`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from transdnn.atomic import AlternatingFile, write_json, write_with
from transdnn.choices import Checkpoint, CheckpointDtype
from transdnn.errors import InputError, first_line
from transdnn.model import StackedMLP


@dataclass(frozen=True)
class RunLayout:
    """Output folders of one partition and training set.

    Training, history and embedding live in separate trees (`<out>/train/<dataset>`,
    `<out>/history/<dataset>`, `<out>/embed/<dataset>`) so each DVC stage owns whole folders.
    """

    out: Path
    dataset: str

    @classmethod
    def for_training_file(cls, out: Path, train_file: Path) -> RunLayout:
        return cls(Path(out), Path(train_file).stem)

    @classmethod
    def for_model_uri(cls, out: Path, uri: str) -> RunLayout:
        """Where `transdnn embed --model URI` writes: `<out>/registry/embed/<label>`, the label being the
        alias (`models:/name@champion` -> champion), `version_N` (`models:/name/N`), or else the URI made
        fit for a folder name, so embeddings of different models never overwrite each other."""
        path = uri.split(":/", 1)[-1].strip("/")
        name, at, alias = path.partition("@")
        if at:
            label = alias
        else:
            head, _, version = name.rpartition("/")
            label = f"version_{version}" if head and version.isdigit() else path
        return cls(Path(out) / "registry", re.sub(r"[^A-Za-z0-9._-]+", "_", label))

    @property
    def train_root(self) -> Path:
        return self.out / "train" / self.dataset

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_root / "checkpoints"

    def checkpoint(self, kind: Checkpoint) -> Path:
        return self.checkpoints_dir / f"{kind}.pt"

    @property
    def model_meta(self) -> Path:
        return self.checkpoints_dir / "model.json"

    @property
    def summary(self) -> Path:
        return self.train_root / "train_summary.csv"

    @property
    def state(self) -> AlternatingFile:
        """Full training state after the last complete epoch (removed when training finishes)."""
        return AlternatingFile(self.train_root / "state.pt")

    @property
    def run_record(self) -> Path:
        """The MLflow run id of the training in progress, written before the first epoch."""
        return self.train_root / "run.json"

    @property
    def train_info(self) -> Path:
        return self.train_root / "train.json"

    @property
    def history_dir(self) -> Path:
        return self.out / "history" / self.dataset

    def history(self, replicate: int) -> Path:
        return self.history_dir / f"replicate_{replicate}.csv"

    @property
    def embed_dir(self) -> Path:
        return self.out / "embed" / self.dataset

    def replicate_dir(self, replicate: int) -> Path:
        return self.embed_dir / f"replicate_{replicate}"

    @property
    def metrics(self) -> Path:
        return self.embed_dir / "metrics.json"

    @property
    def report_dir(self) -> Path:
        """The independent test's report on this data set's training."""
        return self.out / "report" / self.dataset

    @property
    def consensus(self) -> Path:
        """The consensus correlation over the data set's replicates; for the partition's layout (no data set
        name), over every model of every data set of the job."""
        return self.embed_dir / "consensus_correlation.csv"

    @property
    def embed_info(self) -> Path:
        """The embed stage's own accounting for this data set, as train.json is the training's."""
        return self.embed_dir / "embed.json"

    @property
    def promotion(self) -> Path:
        return self.out / "promotion.json"

    @property
    def curves(self) -> Path:
        """Per-epoch means over the partition's replicates (DVC's plots: one line per metric, whatever the
        number of data sets and replicates, so experiments overlay)."""
        return self.out / "curves.csv"

    @property
    def partition_metrics(self) -> Path:
        """The partition's metrics in one file (DVC's `metrics:`): over all its data sets, and each one's."""
        return self.out / "metrics.json"


@dataclass(frozen=True)
class StoredModel:
    """A checkpoint of R stacked replicates with everything needed to use it on raw expression."""

    meta: dict[str, Any]  # genes, regions, hidden_units, dropout, dropout_mode, transform_scaling, ...
    state: dict[str, torch.Tensor]  # parameter name -> (R, ...)
    scaler_mean: torch.Tensor  # (R, G)
    scaler_std: torch.Tensor  # (R, G)
    epochs: torch.Tensor  # (R,) epoch each replicate's weights come from; -1: none with a finite validation loss
    # int8 weight name -> (R, 1, units) scales; weights stored as floats have none
    scales: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def trained(self) -> list[int]:
        """The replicates whose weights an epoch with a finite validation loss gave: the others hold their
        initial weights (diverged before any such epoch) or non-finite ones (`last` of a diverged one)."""
        return [int(r) for r in torch.nonzero(self.epochs >= 0).flatten()]

    @property
    def replicates(self) -> int:
        return int(self.scaler_mean.shape[0])

    def select(self, replicates: list[int]) -> StoredModel:
        idx = torch.tensor(replicates)
        return StoredModel(
            self.meta,
            {k: v[idx] for k, v in self.state.items()},
            self.scaler_mean[idx],
            self.scaler_std[idx],
            self.epochs[idx],
            {k: v[idx] for k, v in self.scales.items()},
        )

    def trained_only(self) -> StoredModel:
        """This model less the replicates without trained weights (see `trained`): what embed and the
        independent test use."""
        trained = self.trained
        return self if len(trained) == self.replicates else self.select(trained)

    def module(self, device: torch.device) -> StackedMLP:
        m = self.meta
        net = StackedMLP(self.replicates, len(m["genes"]), m["hidden_units"], len(m["regions"]), m["dropout"], m["dropout_mode"])
        net.load_state_dict(self.weights())
        return net.to(device).eval()

    def weights(self) -> dict[str, torch.Tensor]:
        """The state as numbers: int8 weights times their scales, float ones as stored."""
        return {k: v.float() * self.scales[k] if k in self.scales else v for k, v in self.state.items()}

    def encoded(self, dtype: CheckpointDtype) -> StoredModel:
        """The same weights as a checkpoint in `dtype` would store them (see `encode_weights`)."""
        state, scales = encode_weights(self.weights(), dtype)
        return dataclasses.replace(self, state=state, scales=scales)

    def model_inputs(self, x: torch.Tensor, scale: bool) -> torch.Tensor:
        """(N, G) raw expression -> (R, N, G) inputs, optionally through each replicate's scaler."""
        x = x.expand(self.replicates, -1, -1)
        if scale:
            x = (x - self.scaler_mean[:, None, :].to(x.device)) / self.scaler_std[:, None, :].to(x.device)
        return x

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"state.{k}": v for k, v in self.state.items()},
            **{f"scale.{k}": v for k, v in self.scales.items()},
            "scaler_mean": self.scaler_mean,
            "scaler_std": self.scaler_std,
            "epochs": self.epochs,
        }


def encode_weights(
    weights: dict[str, torch.Tensor], dtype: CheckpointDtype
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Trained weights -> (state, scales) as a checkpoint stores them. int8 maps each replicate's and unit's
    largest |weight| to 127 (symmetric, round to nearest): half float16's bytes, which matters for 5,063-gene
    models times 2,000; it moves embedding correlations by up to ~3e-3 where float16 moves them by < 1e-4
    (docs/performance.md). Biases stay float32 under int8: a few hundred numbers per replicate."""
    if dtype != "int8":
        return {k: v.to(getattr(torch, dtype)) for k, v in weights.items()}, {}
    state, scales = {}, {}
    for k, v in weights.items():
        v = v.float()
        if v.dim() == 3 and k.startswith("weights."):
            scale = v.abs().amax(dim=1, keepdim=True) / 127
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero unit stays zero
            # a non-finite unit (`last` of a diverged replicate) keeps a non-finite scale: it loads non-finite
            steps = torch.nan_to_num(v / scale, nan=0.0).round_().clamp_(-127, 127)
            state[k], scales[k] = steps.to(torch.int8), scale
        else:
            state[k] = v
    return state, scales


def save_model(path: Path, meta_path: Path, model: StoredModel) -> None:
    write_with(path, lambda tmp: torch.save(model.to_tensors(), tmp))
    write_json(meta_path, model.meta)


def load_tensors(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a tensor dict; anything that needs pickle to run code is refused. `mmap=True` maps the file
    instead of reading it: the shapes at once, the values as they are touched."""
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found (expected a file written by `transdnn train`)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise InputError(f"{path}: refused to load checkpoint ({first_line(exc)}); expected plain tensors") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path}: checkpoint is not a dict of tensors (expected a transdnn checkpoint)")
    return obj


def stored_from_tensors(tensors: dict[str, torch.Tensor], meta: dict[str, Any], path: Path) -> StoredModel:
    try:
        state = {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}
        scales = {k.removeprefix("scale."): v for k, v in tensors.items() if k.startswith("scale.")}
        model = StoredModel(meta, state, tensors["scaler_mean"], tensors["scaler_std"], tensors["epochs"], scales)
    except KeyError as exc:
        raise InputError(f"{path}: checkpoint lacks {exc} (expected a transdnn checkpoint)") from None
    _check_described(model, path)
    return model


def _check_described(model: StoredModel, path: Path) -> None:
    """The weights must have the shapes their description (model.json) gives: an edited or mismatched one
    would otherwise fail deep inside torch. The described model is built on the meta device: no memory."""
    m = model.meta
    try:
        with torch.device("meta"):
            net = StackedMLP(
                model.replicates, len(m["genes"]), m["hidden_units"], len(m["regions"]), m["dropout"], m["dropout_mode"]
            )
    except KeyError as exc:
        raise InputError(f"{path}: its model description lacks field {exc} (expected the model.json of its training)") from None
    except (TypeError, ValueError) as exc:
        raise InputError(
            f"{path}: its model description describes no model ({exc}); expected the model.json of its training"
        ) from None
    described = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    described["scaler_mean"] = described["scaler_std"] = (model.replicates, len(m["genes"]))
    found = {
        name: tuple(t.shape)
        for name, t in {**model.state, "scaler_mean": model.scaler_mean, "scaler_std": model.scaler_std}.items()
    }
    for name in sorted(described.keys() | found.keys()):
        if described.get(name) != found.get(name):
            raise InputError(
                f"{path}: '{name}' has shape {found.get(name)} (expected {described.get(name)}, from the genes, hidden_units "
                "and regions of its model description)"
            )
    for name, weight in model.state.items():
        scale = model.scales.get(name)
        shape = None if scale is None else tuple(scale.shape)
        expected = (weight.shape[0], 1, weight.shape[-1]) if weight.dtype == torch.int8 else None
        if shape != expected:
            raise InputError(
                f"{path}: 'scale.{name}' has shape {shape} (expected {expected}: "
                "int8 weights carry one scale per replicate and unit, float ones none)"
            )


def require_checkpoint(layout: RunLayout, kind: Checkpoint) -> None:
    """Checkpoint `kind` of a training written under `layout` must have been written, and fit its model
    description (checked for every data set before a job writes anything; the weights are mapped, not read)."""
    path = _written(layout, kind)
    require_trained(stored_from_tensors(load_tensors(path, mmap=True), read_record(layout.model_meta), path), str(path))


def require_trained(model: StoredModel, where: str) -> None:
    """A model must hold at least one trained replicate: embeddings of initial or non-finite weights are
    noise, not an answer."""
    if not model.trained:
        raise InputError(
            f"{where}: no replicate has weights from an epoch with a finite validation loss (all {model.replicates} "
            "diverged; expected a training that did not diverge: lower train.learning_rate)"
        )


def _written(layout: RunLayout, kind: Checkpoint) -> Path:
    path = layout.checkpoint(kind)
    if not path.is_file():
        raise InputError(
            f"{path}: checkpoint '{kind}' was never written (expected a training with this --out that kept it: "
            "embed.checkpoint or train.extra_checkpoints)"
        )
    if not layout.model_meta.is_file():
        raise InputError(f"{layout.model_meta}: model description missing (expected a file written by `transdnn train`)")
    return path


def read_record(path: Path) -> dict[str, Any]:
    """A JSON record transdnn wrote (model.json, train.json, run.json); one edited or damaged since is
    refused in one line, not with a decoder's traceback."""
    try:
        record = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(
            f"{path}: unreadable record ({first_line(exc)}); expected the JSON object `transdnn train` wrote"
        ) from None
    if not isinstance(record, dict):
        raise InputError(f"{path}: a JSON {type(record).__name__}, not an object (expected the record `transdnn train` wrote)")
    return record


SUMMARY_FIELDS = ("replicate", "epochs_run", "best_valid_loss", "best_valid_acc", "diverged")  # what the CLI and embed read


def read_summary(path: Path) -> pd.DataFrame:
    """A training's per-replicate summary (train_summary.csv); one edited or damaged since is refused in
    one line, naming the field."""
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError) as exc:  # pandas' EmptyDataError and ParserError are ValueErrors
        raise InputError(f"{path}: unreadable summary ({first_line(exc)}); expected the CSV `transdnn train` wrote") from None
    for field in SUMMARY_FIELDS:
        if field not in frame.columns or frame.empty or not pd.api.types.is_numeric_dtype(frame[field]):
            raise InputError(f"{path}: field '{field}' missing or not numeric (expected the CSV `transdnn train` wrote)")
    return frame


def load_model(layout: RunLayout, kind: Checkpoint) -> StoredModel:
    """Load checkpoint `kind` of a training run written under `layout`."""
    path = _written(layout, kind)
    return stored_from_tensors(load_tensors(path), read_record(layout.model_meta), path)
