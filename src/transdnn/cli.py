"""The `transdnn` command: thin Typer layer that parses, calls the library, prints, and maps errors to exit 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from transdnn.choices import PARTITIONS, Checkpoint, CheckpointDtype, Partition, Precision
from transdnn.errors import TransdnnError

if TYPE_CHECKING:  # annotations only: the CLI imports the library lazily, per command
    import pandas as pd

    from transdnn.settings import PartitionSettings, Settings
    from transdnn.tracking import Tracker

T = TypeVar("T")

app = typer.Typer(
    help="Detached DNN region embeddings for mouse-human brain translation.",
    pretty_exceptions_show_locals=False,
    no_args_is_help=True,
)
registry_app = typer.Typer(help="Look models up in the MLflow model registry.", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


def _print_version(show: bool) -> None:
    """The versions a bug report needs, read from the installed metadata (nothing heavy is imported)."""
    if not show:
        return
    import platform
    from importlib.metadata import version

    import transdnn

    deps = ", ".join(f"{name} {version(name)}" for name in ("torch", "mlflow", "anndata", "dvc"))
    typer.echo(f"transdnn {transdnn.__version__} (Python {platform.python_version()}, {deps})")
    raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the versions and exit.")
    ] = False,
) -> None:
    """Options before the command."""


def _user_path(value: Path | None) -> Path | None:
    """Expand a leading `~` as the shell would have: it does not in `--out=~/x`, only in `--out ~/x`."""
    return None if value is None else value.expanduser()


def _path_option(*names: str, help: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, callback=_user_path)


ParamsOpt = Annotated[Path, _path_option("--params", "-p", help="Settings file (the single home of defaults).")]
DataOpt = Annotated[Path | None, _path_option("--data", help="Training h5ad ({region}_{sampleK}_{cell} ids).")]
HumanOpt = Annotated[Path | None, _path_option("--human", help="Human transform h5ad.")]
MouseOpt = Annotated[Path | None, _path_option("--mouse", help="Mouse transform h5ad.")]
GenesOpt = Annotated[Path | None, _path_option("--genes", help="Gene list CSV (column 'genes').")]
HomologyOpt = Annotated[Path | None, _path_option("--homology", help="Homology CSV (human_region, mouse_region).")]
OutOpt = Annotated[Path | None, _path_option("--out", help="Output folder of the partition.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
NoTrackOpt = Annotated[bool, typer.Option("--no-track", help="Do not record to MLflow.")]


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _run(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Call library code; its typed errors become one line on stderr and exit status 2."""
    try:
        return fn(*args, **kwargs)
    except TransdnnError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted", 130) from None


def _settings(params: Path) -> Settings:
    from transdnn.settings import load_settings

    return _run(load_settings, params)


def _partition(
    params: Path, partition: Partition, out: Path | None = None, **paths: Path | None
) -> tuple[Settings, PartitionSettings]:
    from transdnn.settings import override_paths

    settings = _settings(params)
    part = _run(override_paths, settings.partition(partition), train=paths.pop("data", None), out=out, **paths)
    return settings, part


def _configure(settings: Settings, params: Path) -> Path:
    """Point MLflow at the store params.yaml (or the environment) names; return the project folder."""
    from transdnn.tracking import configure

    project = params.resolve().parent
    _run(configure, settings.tracking, project)
    return project


def _tracker(settings: Settings, params: Path, create: bool = True) -> Tracker:
    """The store params.yaml names, opened only once a job's inputs have passed (`create=False`: one
    that does not exist yet is an error, not made)."""
    from transdnn.tracking import Tracker

    return Tracker(settings.tracking.experiment, _configure(settings, params), create, settings.tracking.system_metrics_s)


class _Progress:
    """A progress bar over replicate-epochs, drawn from the first epoch on: inputs that fail to load
    leave only the error line."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = typer.progressbar(length=total, label=label, file=None)  # drawn when entered
        self.total = total
        self.drawn = False

    def on_epoch(self, epoch: int, metrics: pd.DataFrame) -> None:
        if not self.drawn:
            self.bar.__enter__()
            self.drawn = True
        self.bar.update(len(metrics))

    def flush(self) -> None:
        return None

    def close(self, finished: bool) -> None:
        """A finished job fills the bar: replicates that stopped early and data sets trained before leave
        replicate-epochs that will never run. A failed one leaves it where the work stopped."""
        if self.drawn:
            if finished:
                self.bar.update(self.total - self.bar.pos)
            self.bar.__exit__(None, None, None)


@app.command()
def synth(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, _path_option("--out", help="Folder for the synthetic inputs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    samples_per_region: Annotated[int | None, typer.Option(help="Samples per human region in the training set.")] = None,
    cells_per_sample: Annotated[int | None, typer.Option(help="Cells per sample in the training set.")] = None,
) -> None:
    """Write the embedded default inputs (both partitions) at the real shapes."""
    from transdnn.settings import override
    from transdnn.synth import synthesize

    cfg = _run(
        override,
        _settings(params).synth,
        None,
        out=out,
        seed=seed,
        samples_per_region=samples_per_region,
        cells_per_sample=cells_per_sample,
    )
    for paths in _run(synthesize, cfg, PARTITIONS):
        typer.echo(f"{paths.partition}: wrote {paths.root / paths.partition}")


@app.command()
def validate(
    partition: Partition,
    params: ParamsOpt = Path("params.yaml"),
    data: DataOpt = None,
    human: HumanOpt = None,
    mouse: MouseOpt = None,
    genes: GenesOpt = None,
    homology: HomologyOpt = None,
) -> None:
    """Check a partition's inputs against the data contract and params.yaml, and print their shapes."""
    from transdnn.data import check_training_regions, load_inputs, load_training_set

    _, part = _partition(params, partition, data=data, human=human, mouse=mouse, genes=genes, homology=homology)
    inputs = _run(load_inputs, part.data)
    typer.echo(
        f"genes: {len(inputs.genes.genes)}  human regions: {len(inputs.human.regions)}  mouse regions: {len(inputs.mouse.regions)}  pairs: {len(inputs.homology.human)}"
    )
    for path in _run(lambda: part.data.train_paths):
        ts = _run(load_training_set, path, inputs.genes)
        _run(check_training_regions, ts, inputs.homology)
        _run(ts.units, part.model)
        typer.echo(f"{path.name}: rows {ts.X.shape[0]}  regions {len(ts.regions)}  samples {ts.n_samples}")


@app.command("train")
def train_cmd(
    partition: Partition,
    params: ParamsOpt = Path("params.yaml"),
    data: DataOpt = None,
    human: HumanOpt = None,
    mouse: MouseOpt = None,
    genes: GenesOpt = None,
    homology: HomologyOpt = None,
    replicates: Annotated[int | None, typer.Option(help="Replicates (models) per training set.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on epochs.")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed.")] = None,
    device: DeviceOpt = None,
    precision: Annotated[
        Precision | None, typer.Option(help="fp32 (the published numerics) or bf16 autocast (~1.7x faster on CPUs with bf16).")
    ] = None,
    checkpoint_dtype: Annotated[
        CheckpointDtype | None,
        typer.Option(help="How checkpoints store weights: float16 (default), float32, or int8 (half float16's bytes)."),
    ] = None,
    out: OutOpt = None,
    shuffle_labels: Annotated[
        bool | None, typer.Option("--shuffle-labels/--no-shuffle-labels", help="Random-classifier control.")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option(help="The DVC stage running this: tags the MLflow runs; removes the outputs of data sets no longer listed."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue a killed training from its last complete epoch; keep data sets finished from the same "
            "settings, files and code."
        ),
    ] = False,
    no_track: NoTrackOpt = False,
) -> None:
    """Train all replicates of a partition, save checkpoints, and record runs and models in MLflow."""
    from transdnn.hardware import training_device
    from transdnn.jobs import train_partition
    from transdnn.settings import override

    settings, part = _partition(params, partition, out=out, data=data, human=human, mouse=mouse, genes=genes, homology=homology)
    part = _run(
        override,
        part,
        "train",
        replicates=replicates,
        max_epochs=max_epochs,
        seed=seed,
        device=device,
        precision=precision,
        checkpoint_dtype=checkpoint_dtype,
        shuffle_labels=shuffle_labels,
    )
    dev = _run(training_device, part.train.device, part.train.precision)
    tracker = None if no_track else _tracker(settings, params)
    sets = len(_run(lambda: part.data.train_paths))
    progress = _Progress(part.train.replicates * part.train.max_epochs * sets, f"{partition} replicate-epochs")
    try:
        outcomes = _run(train_partition, partition, part, dev, tracker, progress, stage, resume)
    except BaseException:
        progress.close(finished=False)
        raise
    progress.close(finished=True)
    for o in outcomes:
        typer.echo(
            f"{partition}/{o.dataset}: {len(o.summary)} replicate{'s' * (len(o.summary) != 1)}, epochs {int(o.summary.epochs_run.min())}-{int(o.summary.epochs_run.max())}, "
            f"best valid loss {_figure(o.best_valid_loss_mean, '.4f')}, homology rank {_figure(o.chosen_rank_mean, '.2f')}"
            + (f", run {o.run_id}" if o.run_id else "")
            + (" (trained before; kept)" if o.trained_before else "")
            + (f" (the killed training's state was {o.restarted}: trained afresh)" if o.restarted else "")
        )
        if diverged := [int(r) for r in o.summary.replicate[o.summary.diverged.astype(bool)]]:
            typer.echo(
                f"warning: {partition}/{o.dataset}: replicate{'s' * (len(diverged) != 1)} {', '.join(map(str, diverged))} "
                "diverged (a non-finite validation loss; stopped there, keeping the best epochs before it; promote skips a "
                "replicate with none); lower train.learning_rate",
                err=True,
            )


@app.command()
def embed(
    partition: Partition,
    params: ParamsOpt = Path("params.yaml"),
    checkpoint: Annotated[Checkpoint | None, typer.Option(help="Which checkpoint to embed with.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Embed with a registry model instead, e.g. models:/transdnn-cortex@champion.")
    ] = None,
    human: HumanOpt = None,
    mouse: MouseOpt = None,
    genes: GenesOpt = None,
    homology: HomologyOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
    no_track: NoTrackOpt = False,
) -> None:
    """Write region embeddings, correlations, the consensus and metrics.json for a trained partition."""
    from transdnn.hardware import resolve_device
    from transdnn.jobs import embed_partition, embed_with_model
    from transdnn.settings import override

    settings, part = _partition(params, partition, out=out, data=data, human=human, mouse=mouse, genes=genes, homology=homology)
    part = _run(override, part, "train", device=device)
    dev = _run(resolve_device, part.train.device)
    if model:
        from transdnn.tracking import load_model

        _configure(settings, params)
        stored = _run(load_model, model)
        metrics, folder = _run(embed_with_model, stored, model, partition, part, dev)
        typer.echo(
            f"{partition}: {model} homology rank {metrics['homology_rank_mean']:.2f} (raw {metrics['raw_homology_rank']:.2f}) -> {folder}"
        )
        return
    kind = checkpoint or part.embed.checkpoint
    report = _run(embed_partition, partition, part, dev, kind, None if no_track else _tracker(settings, params))
    lines = [(f"{partition}/{name}", m) for name, m in report["data_sets"].items()]
    if len(lines) > 1:
        pooled = report["all_data_sets"]
        lines.append((f"{partition}, all {pooled['data_sets']} data sets ({pooled['models']} models)", pooled))
    for label, m in lines:
        typer.echo(
            f"{label}: homology rank mean {m['homology_rank_mean']:.2f}, consensus {m['homology_rank_consensus']:.2f}, "
            f"raw expression {m['raw_homology_rank']:.2f} (chance {m['chance_homology_rank']:.1f})"
        )
    for name, m in report["data_sets"].items():
        _warn_left_out(f"{partition}/{name}", m["replicates_left_out"], "the embeddings and the consensus")


def _figure(value: float | None, spec: str) -> str:
    """A mean over the trained replicates, or why there is none."""
    return "none (no trained replicate)" if value is None else format(value, spec)


def _warn_left_out(label: str, left_out: int, of: str) -> None:
    if left_out:
        typer.echo(
            f"warning: {label}: {left_out} replicate{'s' * (left_out != 1)} left out of {of}: diverged, no weights from an "
            "epoch with a finite validation loss in the checkpoint; lower train.learning_rate",
            err=True,
        )


@app.command("test")
def test_cmd(
    partition: Partition,
    test: Annotated[Path, _path_option("--test", help="Held-out labelled h5ad to test on.")],
    params: ParamsOpt = Path("params.yaml"),
    data: DataOpt = None,
    replicates: Annotated[int | None, typer.Option(help="Replicates.")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="Upper bound on epochs.")] = None,
    device: DeviceOpt = None,
    out: OutOpt = None,
) -> None:
    """Independent test: train on --data, then predict a held-out set (accuracy, confusion matrix)."""
    from transdnn.hardware import training_device
    from transdnn.jobs import test_partition
    from transdnn.settings import override

    _, part = _partition(params, partition, out=out, data=data)
    part = _run(override, part, "train", replicates=replicates, max_epochs=max_epochs, device=device)
    dev = _run(training_device, part.train.device, part.train.precision)
    report = _run(test_partition, partition, part, test, dev)
    for dataset, r in report.items():
        typer.echo(f"{partition}/{dataset}: independent test accuracy {r['accuracy_mean']:.4f}")
        _warn_left_out(f"{partition}/{dataset}", r["replicates_left_out"], "the test")


@app.command()
def promote(
    partition: Partition,
    params: ParamsOpt = Path("params.yaml"),
    run_id: Annotated[
        str | None, typer.Option(help="Training run to promote from (default: this workspace's last training).")
    ] = None,
    require_better: Annotated[
        bool | None,
        typer.Option(
            "--require-better/--always",
            help="Move the alias only to a replicate that beats the champion, or to this training's best regardless "
            "(default: promote.require_better).",
        ),
    ] = None,
) -> None:
    """Register a training's replicates and point `champion` at the best one, if it beats the champion (see --always)."""
    from transdnn.jobs import promote_partition
    from transdnn.registry import champion_uri

    settings, part = _partition(params, partition)
    tracker = _tracker(settings, params, create=False)
    better = settings.promote.require_better if require_better is None else require_better
    p = _run(lambda: promote_partition(partition, part, tracker.experiment_id, settings.promote.criterion, run_id, better))
    verb = "promoted" if p.moved else "kept"
    typer.echo(
        f"{partition}: {verb} version {p.version} (replicate {p.champion.replicate}, {p.champion.figures()}): {p.reason} -> {champion_uri(partition)}"
    )


@registry_app.command("show")
def registry_show(
    partition: Annotated[Partition | None, typer.Argument(help="One partition (default: all).")] = None,
    params: ParamsOpt = Path("params.yaml"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print aliases, versions, runs, replicates, metrics and URIs per partition."""
    from transdnn.registry import show

    _configure(_settings(params), params)
    rows = _run(show, [partition] if partition else list(PARTITIONS))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no registered champion yet: run `transdnn promote PARTITION`")
    for r in rows:
        figures = (
            "(its run is gone)"
            if r["replicate"] is None
            else f"{r['dataset']} replicate {r['replicate']} rank {r['chosen_homology_rank']:.4f} valid_loss {r['best_valid_loss']:.4f}"
        )
        typer.echo(f"{r['partition']:<10} {r['alias']:<9} v{r['version']:<4} run {r['run_id']} {figures}  {r['uri']}")


def main() -> None:
    app()
