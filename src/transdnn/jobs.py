"""Workflows the CLI and DVC run: load -> train -> save -> track, and embed / test over saved outputs.

Tracking is optional (`tracker=None` runs without MLflow): the loop reports through its sink either way.
"""

from __future__ import annotations

import filecmp
import functools
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from transdnn.atomic import check_output_folder, output_folder, remove_others, write_csv, write_json
from transdnn.checkpoints import (
    RunLayout,
    StoredModel,
    load_model,
    read_record,
    read_summary,
    require_checkpoint,
    require_trained,
    save_model,
)
from transdnn.choices import Checkpoint, CheckpointDtype
from transdnn.data import (
    PartitionInputs,
    TrainingSet,
    check_training_file,
    load_inputs,
    load_training_set,
    read_gene_list,
)
from transdnn.embed import correlation_frame, embed_inputs, embed_metrics, pool_data_sets, write_embeddings
from transdnn.errors import InputError
from transdnn.hardware import within_memory
from transdnn.lineage import RANKED_ON, RunSpec
from transdnn.model import seeds_for
from transdnn.settings import PartitionSettings
from transdnn.training import EPOCH_METRICS, TrainingSink, TrainResult, load_state, train

EXAMPLE_ROWS = 3


class _Fanout:
    def __init__(self, *sinks: TrainingSink | None) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def on_epoch(self, epoch: int, metrics: pd.DataFrame) -> None:
        for s in self.sinks:
            s.on_epoch(epoch, metrics)

    def flush(self) -> None:
        for s in self.sinks:
            s.flush()


@dataclass(frozen=True)
class TrainOutcome:
    partition: str
    dataset: str
    layout: RunLayout
    run_id: str | None
    summary: pd.DataFrame
    chosen_ranks: np.ndarray
    trained_before: bool = False  # --resume found it finished from the same settings, files and code
    restarted: str | None = None  # why --resume trained a killed training afresh ("of other settings, ...")

    @property
    def chosen_rank_mean(self) -> float | None:
        """The mean homology rank of the replicates with trained weights in the chosen checkpoint; None: none has."""
        return _finite_mean(self.chosen_ranks)

    @property
    def best_valid_loss_mean(self) -> float | None:
        """The mean best validation loss of the replicates that had a finite one (one diverged replicate
        would make the mean infinite); None: none had."""
        return _finite_mean(self.summary["best_valid_loss"].to_numpy(dtype=np.float64))


def _finite_mean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if len(finite) else None


# Modules that parse the command line, name errors, record or draw a training's outputs elsewhere (MLflow),
# or serve other commands: a new version of them leaves every file a training writes as it was.
RECORDING_MODULES = frozenset(
    {"cli.py", "errors.py", "evaluate.py", "lineage.py", "mlflow_model.py", "plots.py", "registry.py", "synth.py", "tracking.py"}
)


@functools.cache
def code_digest(package: Path = Path(__file__).parent) -> str:
    """Digest of the transdnn source that makes a training's outputs: a changed module among it changes
    what a training is made from, so an output of the old code is never kept. The recording modules are
    left out, so a new CLI, figure or MLflow logging does not retrain a 2,000-model job."""
    digest = hashlib.sha256()
    for source in sorted(package.rglob("*.py")):
        if source.relative_to(package).as_posix() not in RECORDING_MODULES:
            digest.update(str(source.relative_to(package)).encode() + b"\0" + source.read_bytes())
    return digest.hexdigest()


def _made_from(part: PartitionSettings, path: Path) -> str:
    """Digest of what a training is made from: transdnn's code, every setting but the list of data sets
    (adding one keeps the others), and the size and modification time of each input file (like make:
    touched is changed)."""
    files = [path, part.data.human, part.data.mouse, part.data.genes, part.data.homology]
    stamps = {str(f): [(st := f.stat()).st_size, st.st_mtime_ns] for f in files}
    params = part.model_dump(mode="json", exclude={"data": {"train"}})
    blob = json.dumps({"params": params, "files": stamps, "code": code_digest()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _files_digest(paths: list[Path]) -> str:
    """Digest of the files' bytes, in order: what train.json holds of the history it wrote."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _trained_before(
    partition: str, part: PartitionSettings, path: Path, layout: RunLayout, tracker: Any | None
) -> TrainOutcome | None:
    """The outcome of a data set that finished earlier from the same settings, files and code, with all
    its outputs in place and, when tracked, its finished run in this store and experiment; else None.

    The history must be the one that training wrote (train.json holds its digest): the training and
    history folders are separate DVC outputs, and one can be checked out, pulled or edited without the
    other."""
    history = [layout.history(r) for r in range(part.train.replicates)]
    if not all(f.is_file() for f in [layout.train_info, layout.summary, layout.checkpoint(part.embed.checkpoint), *history]):
        return None
    try:
        made_from = _made_from(part, path)
        info = read_record(layout.train_info)
        summary = read_summary(layout.summary)
    except (OSError, InputError):  # a missing input (the loader names it) or a damaged record: train it again
        return None
    if info.get("made_from") != made_from or info.get("history") != _files_digest(history) or "chosen_homology_rank" not in info:
        return None
    if tracker is not None and not (info.get("run_id") and tracker.finished(info["run_id"])):
        return None  # untracked before, or its run is not in this store: train it into this one
    ranks = np.asarray(info["chosen_homology_rank"], dtype=np.float64)  # null: NaN
    return TrainOutcome(partition, layout.dataset, layout, info["run_id"], summary, ranks, True)


def _restart_reason(record: dict[str, Any], made_from: str, tracker: Any | None) -> str | None:
    """Why a killed training is not continued, or None: one of other settings, files or code, or one whose
    MLflow run this store no longer holds (deleted, or recorded in another store) is trained afresh. A
    record without "made_from" was written before transdnn kept it: that one is resumed as asked."""
    if record.get("made_from", made_from) != made_from:
        return "of other settings, files or code"
    run_id = record.get("run_id")
    if tracker is not None and run_id and not tracker.resumable(run_id):
        return f"recorded in MLflow run {run_id}, which this store no longer holds (deleted, or another store)"
    return None


def _run_record(layout: RunLayout) -> dict[str, Any]:
    """A killed training's run.json; a damaged one cannot say what the training was made from, so the
    training starts afresh rather than continue."""
    try:
        return read_record(layout.run_record)
    except InputError:
        return {"made_from": None}


def _trained(layout: RunLayout) -> tuple[Path, ...]:
    """The folders a data set's training owns."""
    return (layout.train_root, layout.history_dir)


def _embedded(layout: RunLayout) -> tuple[Path, ...]:
    """The folder a data set's embedding owns."""
    return (layout.embed_dir,)


def _reported(layout: RunLayout) -> tuple[Path, ...]:
    """The folder an independent test's report on a data set owns."""
    return (layout.report_dir,)


def _clear(layout: RunLayout, owned: Callable[[RunLayout], tuple[Path, ...]] = _trained) -> None:
    """Remove a data set's folders (by default its training's), so a new training leaves no file of an
    older one (a checkpoint kind or a replicate's history that the new settings no longer make)."""
    for folder in owned(layout):
        if folder.is_dir():
            shutil.rmtree(folder)


def _drop_unlisted(out: Path, layouts: list[RunLayout], owned: Callable[[RunLayout], tuple[Path, ...]] = _trained) -> None:
    """Remove the outputs of data sets no longer listed: the DVC train stage owns `<out>/train` and
    `<out>/history`, and keeps them between runs to keep the data sets trained before; an embed or test
    job run by hand leaves no embedding or report of a set it no longer has beside those of the others."""
    base = RunLayout(out, "")
    found = {p.name for root in owned(base) if root.is_dir() for p in root.iterdir() if p.is_dir()}
    for name in sorted(found - {layout.dataset for layout in layouts}):
        _clear(RunLayout(out, name), owned)


def mean_curves(histories: list[pd.DataFrame]) -> pd.DataFrame:
    """Per epoch, each metric's mean over the replicate histories that reached it, and their number."""
    grouped = pd.concat(histories, ignore_index=True).groupby("epoch")
    curves = grouped[list(EPOCH_METRICS)].mean()
    curves["replicates"] = grouped.size()
    return curves.reset_index()


def _meta(partition: str, part: PartitionSettings, result: TrainResult, dataset: str) -> dict[str, Any]:
    return {
        "partition": partition,
        "dataset": dataset,
        "genes": result.genes,
        "regions": result.regions,
        "hidden_units": part.model.hidden_units,
        "dropout": part.model.dropout,
        "dropout_mode": part.model.dropout_mode,
        "transform_scaling": part.train.transform_scaling,
        "seeds": [int(s) for s in result.summary["seed"]],
    }


def _stored(result: TrainResult, meta: dict[str, Any], kind: Checkpoint, dtype: CheckpointDtype) -> StoredModel:
    """Checkpoint `kind` as it is written: weights in `dtype`, scalers in float32. Everything after training
    (the chosen ranks, embed, the logged models) uses these stored weights."""
    epochs = torch.from_numpy(result.checkpoint_epochs[kind])
    return StoredModel(meta, result.checkpoints[kind], result.scaler_mean, result.scaler_std, epochs).encoded(dtype)


def _save_training(result: TrainResult, layout: RunLayout, stored: dict[Checkpoint, StoredModel]) -> list[Path]:
    for kind, model in stored.items():
        save_model(layout.checkpoint(kind), layout.model_meta, model)
    files = []
    for r, frame in result.history.groupby("replicate"):
        files.append(write_csv(layout.history(int(r)), frame.drop(columns="replicate"), index=False))
    write_csv(layout.summary, result.summary, index=False)
    return files


def train_partition(
    partition: str,
    part: PartitionSettings,
    device: torch.device,
    tracker: Any | None = None,
    progress: TrainingSink | None = None,
    stage: str | None = None,
    resume: bool = False,
    check: Callable[[TrainingSet], None] | None = None,
) -> list[TrainOutcome]:
    """Train every training set of a partition; write checkpoints, history and train.json for each.

    `resume=True` continues a killed training from its per-epoch state (same MLflow runs) and skips the
    data sets that finished before from the same settings, files and code: a killed 100-set job redoes at
    most the data set it was in, and adding a data set trains only that one. A killed training of other
    settings, files or code is trained afresh. `stage` (the DVC stage running this) also removes the
    outputs of data sets no longer listed. `check` vets each training set once it is loaded, before
    anything is written."""
    inputs = load_inputs(part.data)
    layouts = {path: RunLayout.for_training_file(part.out, path) for path in part.data.train_paths}
    trained = {path: _trained_before(partition, part, path, layouts[path], tracker) if resume else None for path in layouts}
    for path, done in trained.items():
        if done is None:  # every set to train, checked before the first trains: a bad one fails in seconds
            check_training_file(path, inputs.genes, inputs.homology, part.model)
    check_output_folder(part.out)  # before the store is opened, not only once the folder is locked
    if tracker is not None:
        tracker.connect()  # the inputs are sound: now the store must answer, before any output is touched
    with output_folder(part.out, f"train {partition}"):
        if stage:
            _drop_unlisted(part.out, list(layouts.values()))
        outcomes = []
        for path, layout in layouts.items():
            done = trained[path]
            if done is None:  # one set at a time: its matrix and model are freed before the next set loads
                with within_memory(path, device):
                    done = _train_data_set(partition, part, path, layout, inputs, device, tracker, progress, stage, resume, check)
            outcomes.append(done)
        histories = [pd.read_csv(layout.history(r)) for layout in layouts.values() for r in range(part.train.replicates)]
        write_csv(RunLayout(part.out, "").curves, mean_curves(histories), index=False)
    return outcomes


def _train_data_set(
    partition: str,
    part: PartitionSettings,
    path: Path,
    layout: RunLayout,
    inputs: PartitionInputs,
    device: torch.device,
    tracker: Any | None,
    progress: TrainingSink | None,
    stage: str | None,
    resume: bool,
    check: Callable[[TrainingSet], None] | None,
) -> TrainOutcome:
    """Load, train, save and track one data set of a job (see `train_partition`)."""
    started = time.perf_counter()
    train_set = load_training_set(path, inputs.genes)
    train_set.units(part.model)  # checked before anything is written
    if check is not None:
        check(train_set)
    made_from = _made_from(part, path)
    spec = RunSpec(
        partition=partition,
        dataset=layout.dataset,
        params=part.model_dump(mode="json"),
        info={
            "rows": train_set.X.shape[0],
            "genes": train_set.X.shape[1],
            "regions": len(train_set.regions),
            "samples": train_set.n_samples,
            "device": str(device),
            "cpu_threads": torch.get_num_threads(),  # fitted to the process's CPU quota (fit_cpu_threads)
        },
        seeds=seeds_for(part.train.seed, part.train.replicates, layout.dataset),
        inputs={"train": path, **{name: getattr(part.data, name) for name in RANKED_ON}},
        stage=stage,
    )
    current = layout.state.current() if resume else None
    record = _run_record(layout) if current is not None and layout.run_record.is_file() else {}
    restarted = _restart_reason(record, made_from, tracker) if current is not None else None
    resume_from = load_state(current, train_set, part) if current is not None and restarted is None else None
    resume_id = record.get("run_id") if resume_from is not None else None
    ctx = tracker.training(spec, resume_id) if tracker else nullcontext()
    with ctx as run:  # the older training's outputs go only once the store has opened this one's run
        if resume_from is None:
            _clear(layout)
        if run is not None or resume_from is None:  # an untracked resume keeps the killed run's record
            write_json(layout.run_record, {"run_id": run.parent_id if run else None, "made_from": made_from})
        result = train(train_set, inputs, part, device, _Fanout(run, progress), layout.state, resume_from)
        saving = time.perf_counter()
        meta = _meta(partition, part, result, layout.dataset)
        stored = {kind: _stored(result, meta, kind, part.train.checkpoint_dtype) for kind in result.checkpoints}
        history_files = _save_training(result, layout, stored)
        chosen_model = stored[part.embed.checkpoint]
        chosen = _chosen_ranks(chosen_model, inputs, device)
        tracking = time.perf_counter()
        if run is not None:
            _track_training(run, result, meta, history_files, chosen, chosen_model, train_set.X[:EXAMPLE_ROWS])
        finished = time.perf_counter()
        write_json(
            layout.train_info,
            {
                "partition": partition,
                "dataset": layout.dataset,
                "run_id": run.parent_id if run else None,
                "checkpoint": part.embed.checkpoint,
                "chosen_homology_rank": [None if np.isnan(x) else float(x) for x in chosen],
                "made_from": made_from,
                "history": _files_digest(history_files),
                "epochs_run": [int(x) for x in result.summary["epochs_run"]],
                "seconds": result.seconds,
                # after the epochs: writing checkpoints and history and ranking the chosen one; logging
                # the run's summary, plots and one model per replicate to MLflow
                "after_training_seconds": {"save": tracking - saving, "track": finished - tracking},
                # this data set's wall time in the process (loading, training, saving, tracking):
                # what each further data set of a multi-set job costs, without start-up
                "data_set_seconds": time.perf_counter() - started,
            },
        )
        layout.state.remove()  # finished: the resume state is no longer needed
    run_id = run.parent_id if run else None
    return TrainOutcome(partition, layout.dataset, layout, run_id, result.summary, chosen, restarted=restarted)


def _chosen_ranks(model: StoredModel, inputs: PartitionInputs, device: torch.device) -> np.ndarray:
    """Each replicate's homology rank with its chosen checkpoint; NaN for one without trained weights
    there (diverged), which embed leaves out and promote skips."""
    ranks = np.full(model.replicates, np.nan)
    if model.trained:
        emb = embed_inputs(model, inputs, device)
        ranks[emb.replicates] = emb.ranks
    return ranks


def _track_training(
    run: Any,
    result: TrainResult,
    meta: dict[str, Any],
    history_files: list[Path],
    chosen: np.ndarray,
    stored: StoredModel,
    example: np.ndarray,
) -> None:
    from transdnn.plots import curves

    with tempfile.TemporaryDirectory() as tmp:
        png = curves(
            result.history, Path(tmp) / "curves.png", f"{meta['partition']} {meta['dataset']}: {len(history_files)} replicates"
        )
        run.log_summary(result.summary, chosen, history_files)
        run.log_parent_metrics({f"seconds_{part}": value for part, value in result.seconds.items()})
        run.log_artifacts(None, [png], "plots")
        files = []
        for r in range(stored.replicates):
            folder = Path(tmp) / f"r{r}"
            save_model(folder / "weights.pt", folder / "meta.json", stored.select([r]))
            files.append((folder / "weights.pt", folder / "meta.json"))
        run.log_models(files, result.genes, example, Path(tmp))


def embed_partition(
    partition: str, part: PartitionSettings, device: torch.device, checkpoint: Checkpoint, tracker: Any | None = None
) -> dict[str, dict[str, Any]]:
    """Embed the transform sets with each training set's chosen checkpoint; write CSVs, the consensus over
    all data sets, and metrics.json, which is returned: `all_data_sets` (the job's pooled answer) and
    `data_sets` (each set's)."""
    inputs = load_inputs(part.data)
    check_output_folder(part.out)  # before the store is opened, not only once the folder is locked
    layouts = [RunLayout.for_training_file(part.out, path) for path in part.data.train_paths]
    for layout in layouts:  # a 100-set job missing one set's checkpoint fails before the first set, not after
        require_checkpoint(layout, checkpoint)
    summaries = [read_summary(layout.summary) if layout.summary.is_file() else None for layout in layouts]
    if tracker is not None:
        tracker.connect()
    with output_folder(part.out, f"embed {partition}"), tempfile.TemporaryDirectory() as figures:
        # Every training's run is looked up before anything is written: a store that lacks one (swapped or
        # lost since the training) stops the job with no embedding of any data set half-recorded.
        runs = [_training_run(tracker, layout) for layout in layouts]
        all_metrics, consensus, heatmap = {}, [], None
        for layout, run, summary in zip(layouts, runs, summaries, strict=True):
            started = time.perf_counter()
            stored = load_model(layout, checkpoint)
            emb = embed_inputs(stored, inputs, device)
            metrics = embed_metrics(emb, checkpoint, summary)
            write_embeddings(emb, layout, metrics)
            tracking = time.perf_counter()
            if run is not None:
                heatmap = _track_embedding(run, layout, emb, inputs, metrics, Path(figures) / layout.dataset)
            finished = time.perf_counter()
            # what each further data set of a multi-set job costs this stage (the inputs are loaded once per
            # job), measured in the process: differences between processes drown it in start-up noise on a GPU
            write_json(layout.embed_info, {"data_set_seconds": finished - started, "track_seconds": finished - tracking})
            all_metrics[layout.dataset] = metrics
            consensus.append(emb.consensus)
        _drop_unlisted(part.out, layouts, _embedded)
        pooled, pooled_metrics = pool_data_sets(consensus, list(all_metrics.values()), emb)
        job = RunLayout(part.out, "")
        pooled_frame = correlation_frame(pooled, emb)
        write_csv(job.consensus, pooled_frame)
        report = {"all_data_sets": pooled_metrics, "data_sets": all_metrics}
        if tracker is not None:
            trained = {layout.dataset: run.parent_id if run else None for layout, run in zip(layouts, runs, strict=True)}
            # One data set's pooled consensus is its own: its figure serves the job (1.3 s of drawing on cortex).
            drawn = heatmap if len(layouts) == 1 else None
            _track_job(tracker, partition, checkpoint, pooled_metrics, trained, job.consensus, pooled_frame, inputs, drawn)
        write_json(job.partition_metrics, report)
        return report


def _track_job(
    tracker: Any,
    partition: str,
    checkpoint: str,
    metrics: dict[str, Any],
    trained: dict[str, str | None],
    consensus: Path,
    frame: pd.DataFrame,
    inputs: PartitionInputs,
    heatmap: Path | None,
) -> None:
    """`consensus`: the pooled consensus CSV as written; `frame`: its values, drawn without reading it back
    unless `heatmap` is their figure already."""
    with tempfile.TemporaryDirectory() as tmp:
        if heatmap is None:
            heatmap = _consensus_heatmap(frame, inputs, Path(tmp), f"consensus correlation, {len(trained)} data sets")
        tracker.record_job(partition, checkpoint, metrics, trained, [consensus, heatmap])


def _consensus_heatmap(frame: pd.DataFrame, inputs: PartitionInputs, folder: Path, title: str) -> Path:
    from transdnn.plots import heatmap

    pairs = list(zip(inputs.homology.human, inputs.homology.mouse, strict=True))
    return heatmap(frame, pairs, folder / "consensus_heatmap.png", title)


def _recorded_run_id(layout: RunLayout) -> str | None:
    """The MLflow run id a training recorded in its train.json; None if untracked or not trained."""
    return read_record(layout.train_info).get("run_id") if layout.train_info.is_file() else None


def _training_run(tracker: Any | None, layout: RunLayout) -> Any | None:
    """The MLflow run a tracked training recorded, reopened; None untracked."""
    run_id = _recorded_run_id(layout)
    return tracker.reopen(run_id) if tracker is not None and run_id else None


def _track_embedding(
    run: Any, layout: RunLayout, emb: Any, inputs: PartitionInputs, metrics: dict[str, Any], folder: Path
) -> Path:
    """Log a data set's embeddings and figures to its training run; returns its heatmap, drawn in `folder`."""
    for r in emb.replicates:
        replicate = layout.replicate_dir(r)
        run.log_artifacts(
            r, [replicate / "human_embedding.csv", replicate / "mouse_embedding.csv", replicate / "correlation.csv"], "embedding"
        )
    png = _consensus_heatmap(correlation_frame(emb.consensus, emb), inputs, folder, f"consensus correlation, {layout.dataset}")
    run.log_artifacts(None, [layout.consensus, png, layout.metrics], "embedding")
    run.log_parent_metrics(metrics)
    return png


def embed_with_model(
    model: StoredModel, uri: str, partition: str, part: PartitionSettings, device: torch.device
) -> tuple[dict[str, Any], Path]:
    """Embed with the registry model (one replicate) that `uri` named; its metrics record that URI as
    their checkpoint. Returns the metrics and the folder they were written to."""
    trained_on = model.meta.get("partition")
    if trained_on != partition:
        raise InputError(f"{uri}: a model of partition {trained_on!r} (expected one of {partition!r} to embed {partition})")
    require_trained(model, uri)
    inputs = load_inputs(part.data)
    emb = embed_inputs(model, inputs, device)
    metrics = embed_metrics(emb, uri, None)
    layout = RunLayout.for_model_uri(part.out, uri)
    with output_folder(layout.out, f"embed {partition} --model {uri}"):
        write_embeddings(emb, layout, metrics)
    return metrics, layout.embed_dir


def test_partition(
    partition: str,
    part: PartitionSettings,
    test_file: Path,
    device: torch.device,
    progress: TrainingSink | None = None,
) -> dict[str, Any]:
    """Independent test: train on the partition's training set(s), report on a held-out labelled set. The
    output folder is held from the training to the last report file: a second test there is refused."""
    from transdnn.evaluate import check_test_regions, independent_test  # the test's alone: no DVC stage loads it

    part = part.model_copy(update={"out": Path(part.out) / "independent_test"})
    # The test set is read, and its regions held against each training set's, before that set trains:
    # a wrong test file costs seconds, not a training.
    test_set = load_training_set(test_file, read_gene_list(part.data.genes), min_samples=1)
    for path in part.data.train_paths:
        if filecmp.cmp(test_file, path, shallow=False):
            raise InputError(f"{test_file}: the same data as training set {path} (expected a held-out set)")
    with output_folder(part.out, f"test {partition}"):
        outcomes = train_partition(
            "independent", part, device, progress=progress, check=lambda ts: check_test_regions(test_set, ts.regions)
        )
        report: dict[str, Any] = {}
        for outcome in outcomes:
            model = load_model(outcome.layout, part.embed.checkpoint)
            require_trained(model, str(outcome.layout.checkpoint(part.embed.checkpoint)))
            result = independent_test(model, test_set, device)
            folder = outcome.layout.report_dir
            for r, pred, conf in zip(result.replicates, result.predictions, result.confusion, strict=True):
                write_csv(folder / f"replicate_{r}" / "predictions.csv", pred, index=False)
                write_csv(folder / f"replicate_{r}" / "confusion_matrix.csv", conf)
            remove_others(folder, "replicate_*", {folder / f"replicate_{r}" for r in result.replicates})
            report[outcome.dataset] = {
                "accuracy": {str(r): float(a) for r, a in zip(result.replicates, result.accuracy, strict=True)},
                "accuracy_mean": float(result.accuracy.mean()),
                "replicates_left_out": model.replicates - len(result.replicates),
            }
            write_json(folder / "test_metrics.json", report[outcome.dataset])
        _drop_unlisted(part.out, [outcome.layout for outcome in outcomes], _reported)
        return report


def trained_run_ids(part: PartitionSettings) -> list[str]:
    """MLflow run ids recorded by the last `transdnn train` of this partition's outputs (train.json);
    none where nothing was trained here. A set trained here without tracking is refused: promoting
    around it would register some other training of the store."""
    ids = []
    for path in part.data.train_paths:
        layout = RunLayout.for_training_file(part.out, path)
        if not layout.train_info.is_file():
            continue
        if (run_id := _recorded_run_id(layout)) is None:
            raise InputError(
                f"{layout.train_info}: field 'run_id' is null, trained with --no-track "
                "(expected a tracked `transdnn train`, or `promote --run-id`)"
            )
        ids.append(run_id)
    return ids


def promote_partition(
    partition: str,
    part: PartitionSettings,
    experiment_id: str,
    criterion: str,
    run_id: str | None = None,
    require_better: bool = False,
) -> Any:
    """Promote from `run_id`, else from this workspace's last training, else the latest in MLflow;
    record in `<out>/promotion.json` (the DVC promote stage's output) the champion the alias names
    afterwards, and under `candidate` the training's best it was offered. The output folder is held: a
    training there meanwhile would leave half its data sets' train.json to promote from."""
    from transdnn.registry import champion_uri, describe, promote

    with output_folder(part.out, f"promote {partition}"):
        run_ids = [run_id] if run_id else trained_run_ids(part)
        result = promote(partition, experiment_id, criterion, run_ids or None, require_better)
        write_json(
            RunLayout(part.out, "").promotion,
            {
                "partition": partition,
                "moved": result.moved,
                "reason": result.reason,
                "uri": champion_uri(partition),
                **describe(result.version, result.champion),
                "candidate": describe(result.candidate_version, result.candidate),
            },
        )
        return result
