"""Typed settings: params.yaml is the single home of every default; CLI options override it."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from transdnn.choices import CHECKPOINTS, PARTITIONS, Checkpoint, CheckpointDtype, DropoutMode, Precision
from transdnn.errors import ConfigError, InputError, first_line


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataPaths(_Strict):
    """The five inputs of one partition, in the reference layout (several training sets allowed)."""

    train_dir: Path
    train: list[str] = Field(min_length=1)
    human: Path
    mouse: Path
    genes: Path
    homology: Path
    test: Path | None = None

    @field_validator("train")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        """Each training set writes to folders named by its file's stem: two alike would overwrite each other."""
        twice = _stems_twice([Path(name) for name in value])
        if twice:
            raise ValueError(f"data set name(s) {', '.join(twice)} listed twice; expected training files of distinct names")
        return value

    @property
    def train_paths(self) -> list[Path]:
        """The training sets: names in `train`, found in `train_dir` (DVC tracks that folder).

        A name with `*`, `?` or `[` is a pattern for the files it matches, in natural order (`_2` before
        `_10`), so the published 100 sets are one line, and a file added to the folder joins the job.
        """
        paths: list[Path] = []
        for name in self.train:
            if not _PATTERN.search(name):
                found = [self.train_dir / name]
            else:
                found = sorted((p for p in self.train_dir.glob(name) if p.is_file()), key=lambda p: natural_key(p.name))
                if not found:
                    raise InputError(
                        f"{self.train_dir}: no file matches data.train pattern {name!r} (expected .h5ad files there)"
                    )
            paths += [p for p in found if p not in paths]
        twice = _stems_twice(paths)
        if twice:
            raise InputError(
                f"{self.train_dir}: data.train gives data set name(s) {', '.join(twice)} twice "
                "(expected training files of distinct names)"
            )
        return paths


_PATTERN = re.compile(r"[*?\[]")


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders the digit runs of a name by value: `Integrated_dataset_2` before `_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _stems_twice(paths: list[Path]) -> list[str]:
    stems = [path.stem for path in paths]
    return sorted({stem for stem in stems if stems.count(stem) > 1})


class ModelSettings(_Strict):
    """Architecture. Input/output sizes come from the data; set them only to have them checked."""

    input_units: int | None = Field(default=None, gt=0)
    output_units: int | None = Field(default=None, gt=0)
    hidden_units: list[int] = Field(min_length=1)
    dropout: float = Field(ge=0, lt=1)
    dropout_mode: DropoutMode

    @field_validator("hidden_units")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if any(v <= 0 for v in value):
            raise ValueError("every hidden layer needs a positive width")
        return value


class TrainSettings(_Strict):
    replicates: int = Field(gt=0)
    max_epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    lr_step: int = Field(gt=0)
    lr_gamma: float = Field(gt=0, le=1)
    patience: int = Field(gt=0)
    valid_ratio: float = Field(gt=0, lt=1)
    shuffle_labels: bool
    seed: int = Field(ge=0)
    device: str
    precision: Precision
    transform_scaling: Literal["none", "train"]
    state_every_s: float | None = Field(ge=0)
    extra_checkpoints: list[Checkpoint]
    checkpoint_dtype: CheckpointDtype


class EmbedSettings(_Strict):
    checkpoint: Checkpoint


class PartitionSettings(_Strict):
    """Everything one detached model needs: its inputs, architecture, training and embedding."""

    data: DataPaths
    model: ModelSettings
    train: TrainSettings
    embed: EmbedSettings
    out: Path

    @property
    def checkpoint_kinds(self) -> tuple[Checkpoint, ...]:
        """The checkpoints training writes: the one embedding uses, plus any extra ones asked for."""
        wanted = {self.embed.checkpoint, *self.train.extra_checkpoints}
        return tuple(k for k in CHECKPOINTS if k in wanted)


class SynthSettings(_Strict):
    out: Path
    seed: int = Field(ge=0)
    samples_per_region: int = Field(ge=2)
    cells_per_sample: int = Field(gt=0)
    other_rows: int = Field(ge=0)
    transform_samples_per_region: int = Field(gt=0)
    datasets: int = Field(gt=0)


class TrackingSettings(_Strict):
    uri: str | None = None
    experiment: str
    system_metrics_s: float | None = Field(default=None, gt=0)  # absent from an older params.yaml: off


class PromoteSettings(_Strict):
    criterion: Literal["homology_rank", "valid_loss"]
    require_better: bool


class Settings(_Strict):
    tracking: TrackingSettings
    synth: SynthSettings
    promote: PromoteSettings
    cortex: PartitionSettings
    subcortex: PartitionSettings

    def partition(self, name: str) -> PartitionSettings:
        return getattr(self, name)


def _resolve_paths(raw: dict[str, Any], root: Path, source: Path) -> dict[str, Any]:
    """Make every relative path in params.yaml relative to the file's own folder. A path starting with
    `~` is refused: DVC, which reads the same paths as stage dependencies, takes it literally."""

    def fix(field: str, value: Any) -> Any:
        if str(value).startswith("~"):
            raise ConfigError(
                f"{source}: field '{field}': {value!r} starts with '~', which DVC does not expand "
                "(expected an absolute path, or one relative to params.yaml)"
            )
        return str(value if Path(value).is_absolute() else root / value)

    out = dict(raw)
    if isinstance(out.get("synth"), dict) and "out" in out["synth"]:
        out["synth"] = {**out["synth"], "out": fix("synth.out", out["synth"]["out"])}
    for name in PARTITIONS:
        part = out.get(name)
        if not isinstance(part, dict):
            continue
        part = dict(part)
        if "out" in part:
            part["out"] = fix(f"{name}.out", part["out"])
        data = part.get("data")
        if isinstance(data, dict):
            data = dict(data)
            for key, value in data.items():
                if key != "train" and isinstance(value, str):
                    data[key] = fix(f"{name}.data.{key}", value)
            part["data"] = data
        out[name] = part
    return out


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The settings a section of params.yaml takes (`loc` names the section); [] where it is no section."""
    model: Any = Settings
    for key in loc:
        fields = model.model_fields if isinstance(model, type) and issubclass(model, BaseModel) else {}
        if str(key) not in fields:
            return []
        model = fields[str(key)].annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _first_error(path: Path, err: ValidationError) -> ConfigError:
    """One line for the error a person fixes first. A misspelt key is both unknown and, under its right
    name, missing: the unknown one is named, with the key it is closest to."""
    errors = err.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    field = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        section, key = first["loc"][:-1], str(first["loc"][-1])
        keys = _keys_at(section)
        missing = [str(e["loc"][-1]) for e in errors if e["type"] == "missing" and e["loc"][:-1] == section]
        close = difflib.get_close_matches(key, missing or keys, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        expected = f"one of {', '.join(keys)}" if keys else "no key here"
        return ConfigError(f"{path}: field '{field}': not a setting (expected {expected}{hint})")
    if first["type"] == "missing":
        return ConfigError(f"{path}: field '{field}': missing (expected a value for it in params.yaml)")
    return ConfigError(f"{path}: field '{field}': {first['msg']} (got {first.get('input')!r})")


def load_settings(path: str | Path = "params.yaml") -> Settings:
    """Read and validate params.yaml; relative paths are taken from the file's folder."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a settings file (expected a params.yaml)")
    if not path.is_file():
        raise ConfigError(
            f"{path.absolute()}: settings file not found (expected a params.yaml: run transdnn in the project's folder, "
            "or give --params PATH)"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({first_line(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Settings.model_validate(_resolve_paths(raw, path.resolve().parent, path))
    except ValidationError as err:
        raise _first_error(path, err) from None


Section = TypeVar("Section", bound=BaseModel)


def override(settings: Section, section: str | None, **values: Any) -> Section:
    """Return `settings` with the non-None `values` (command-line options) replacing fields of `section`
    (None: of `settings` itself), re-validated: a value out of bounds is named in one line."""
    updates = {k: v for k, v in values.items() if v is not None}
    if not updates:
        return settings
    dumped = settings.model_dump()
    if section is None:
        dumped.update(updates)
    else:
        dumped[section] = {**dumped[section], **updates}
    try:
        return type(settings).model_validate(dumped)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"option '{field}': {first['msg']} (got {first.get('input')!r})") from None


def override_paths(
    part: PartitionSettings, train: Path | None = None, out: Path | None = None, **paths: Any
) -> PartitionSettings:
    """Replace input paths (one training set, the output folder) given on the command line."""
    if train is not None:
        paths.update(train_dir=Path(train).parent, train=[Path(train).name])
    part = override(part, "data", **paths)
    return part if out is None else part.model_copy(update={"out": Path(out)})
