"""MLflow tracking: the only module (with its pyfunc model and the registry) that touches mlflow.

Configured by an explicit `configure()` call from the CLI, never at import. One parent run per
partition and training set, one nested child run per replicate, per-epoch metrics with step=epoch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import mlflow
import numpy as np
import pandas as pd
import requests
import yaml
from mlflow.entities import Dataset, DatasetInput, Experiment, InputTag, Metric, Param, Run, ViewType
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT
from mlflow.utils.uri import is_local_uri
from packaging.version import Version

import transdnn
from transdnn.errors import StoreFailure, TrackingError, first_line
from transdnn.lineage import RunSpec
from transdnn.settings import TrackingSettings

T = TypeVar("T")
ROLE_TAG = "transdnn.role"  # what a run is: a training (parent of replicate runs) or a job
PARENT_ROLE = "training"
JOB_ROLE = "job"  # a job's pooled answer over all its data sets (embed)
DIGEST_TAG = "md5."  # a training run's tag per input file: md5.train, md5.human, ...
FLUSH_SECONDS = 30.0  # how stale the MLflow UI's per-epoch curves may be during a training
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
_MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
_PACKAGE_DIR = Path(__file__).parent
# what the logged model's code (transdnn.mlflow_model and the modules it loads) needs to run
_MODEL_DISTRIBUTIONS = ("torch", "pandas", "numpy", "mlflow", "anndata", "pydantic", "pyyaml", "h5py", "scipy")


def project_home(project: Path) -> Path:
    """The real project folder, also from inside a `dvc exp run --temp/--queue` copy under .dvc/tmp/exps."""
    parts = project.resolve().parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return project.resolve()


def default_uri(project: Path) -> str:
    """An absolute SQLite store in the project, so `dvc exp run --temp/--queue` records into one place."""
    return f"sqlite:///{project_home(project) / 'mlflow.db'}"


def configure(settings: TrackingSettings, project: Path) -> str:
    """Point MLflow at the store: MLFLOW_TRACKING_URI, else params.yaml's `tracking.uri`, else the default."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.uri or default_uri(project)
    if is_local_uri(uri) and not MLFLOW_ALLOW_FILE_STORE.get():
        # MLflow 3 raises a paragraph-long error, as a traceback, on a file store (e.g. an old ./mlruns)
        raise TrackingError(
            f"{uri}: a file store, which MLflow 3 refuses (expected a database such as {default_uri(project)} or a "
            "tracking server, at tracking.uri or MLFLOW_TRACKING_URI; `mlflow migrate-filestore` moves old runs)"
        )
    mlflow.set_tracking_uri(uri)
    # MLflow draws two "Downloading artifacts" bars per logged model (10 per training) on stderr.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return uri


def shown(uri: str) -> str:
    """A store URI fit for a message: a password in it is masked."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


STORE_FAILURES = (MlflowException, requests.exceptions.RequestException)


def store_failed(exc: BaseException) -> StoreFailure:
    """A store that stopped answering in the middle of a job (a server restarted, a network cut, after
    MLflow's own retries) or refused a request, in one line."""
    return StoreFailure(
        f"{shown(mlflow.get_tracking_uri())}: the MLflow store failed a request ({first_line(exc)}); expected a store "
        "that answers at tracking.uri or MLFLOW_TRACKING_URI: run the command again once it does (`train --resume` "
        "continues a training from its last state)"
    )


def answered(method: Callable[..., T]) -> Callable[..., T]:
    """Store failures inside `method` leave it as one StoreFailure (see `store_failed`), not a traceback."""

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> T:
        try:
            return method(*args, **kwargs)
        except STORE_FAILURES as exc:
            raise store_failed(exc) from None

    return call


def not_found(exc: MlflowException) -> bool:
    """MLflow's answer for an id the store does not hold, as opposed to a store that failed."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def _check_answers(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds when nothing answers at an http(s) store: MLflow retries a refused connection for
    ~4.5 minutes before it gives up. Any HTTP answer counts (401 and 404 included), and so does a TLS
    error, which MLflow's own certificate settings may resolve: those are MLflow's to report."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return
    except OSError as exc:  # URLError (refused, unknown host, TLS) or a timeout while reading the answer
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if reason is not exc and isinstance(reason, ssl.SSLError):
            return
        raise TrackingError(
            f"{shown(uri)}: no MLflow server answers ({reason}); expected one at tracking.uri or MLFLOW_TRACKING_URI"
        ) from None


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a local SQLite store URI (`sqlite:///path`); None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _absent_store(uri: str) -> Path | None:
    """The database file of a local SQLite store that does not exist yet: nothing is recorded there, and
    opening it would create and migrate an empty store. None for an existing file or any other store."""
    _check_answers(uri)
    database = _sqlite_file(uri)
    return database if database is not None and not database.is_file() else None


def reader() -> MlflowClient | None:
    """A client for looking things up, or None when the configured store does not exist yet."""
    return None if _absent_store(mlflow.get_tracking_uri()) else MlflowClient()


def load_model(uri: str) -> Any:
    """Load a logged or registered replicate model through MLflow (never by reading the store's files).
    A `models:/` or `runs:/` URI on a local store that does not exist yet is refused without making one."""
    if uri.startswith(("models:/", "runs:/")) and (database := _absent_store(mlflow.get_tracking_uri())):
        raise TrackingError(f"{uri}: cannot load model (no MLflow store at {database} yet)")
    try:
        return mlflow.pyfunc.load_model(uri).unwrap_python_model().model
    except MlflowException as exc:
        raise TrackingError(f"{uri}: cannot load model ({first_line(exc)})") from None


def retry(call: Callable[[], T], attempts: int = 8, delay: float = 0.2) -> T:
    """Retry a store call while SQLite reports it is locked or busy (parallel writers)."""
    for attempt in range(attempts):
        try:
            return call()
        except MlflowException as exc:
            text = str(exc).lower()
            if attempt == attempts - 1 or not ("locked" in text or "busy" in text):
                raise
            time.sleep(delay * 2**attempt)
    raise AssertionError("unreachable")


@contextmanager
def store_lock(suffix: str = "lock") -> Iterator[None]:
    """Serialise one step among the processes sharing a local SQLite store (e.g. `dvc queue start -j 2`),
    on the lock file `mlflow.db.<suffix>`: first contact ("lock"), where two would both migrate a fresh
    mlflow.db and one fails, and promotions ("promote.lock"), where two would each compare with the same
    champion and the worse could move the alias last. A server's store is not locked (its clients share
    no file)."""
    database = _sqlite_file(mlflow.get_tracking_uri())
    if database is None:
        yield
        return
    lock_path = Path(f"{database}.{suffix}")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_experiment(client: MlflowClient, name: str, project: Path) -> str:
    """Get or create the experiment, race-free; artifacts go beside the store, at an absolute path."""
    found = retry(lambda: client.get_experiment_by_name(name))
    if found is not None:
        return _active_experiment(found)
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (project_home(project) / "mlartifacts").as_uri()
    try:
        return retry(lambda: client.create_experiment(name, artifact_location=location))
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return _active_experiment(found)


def _active_experiment(experiment: Experiment) -> str:
    """The id of an experiment runs may go to: one deleted in the MLflow UI holds its name in the trash,
    and MLflow refuses every run in it."""
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"experiment {experiment.name!r}: deleted in the MLflow store (expected an active experiment: "
            f"`mlflow experiments restore --experiment-id {experiment.experiment_id}`, or another tracking.experiment in params.yaml)"
        )
    return str(experiment.experiment_id)


def input_digests(run: Run) -> dict[str, str]:
    """The md5 of each input file a training run recorded, by input name (train, human, mouse, ...)."""
    return {k.removeprefix(DIGEST_TAG): v for k, v in run.data.tags.items() if k.startswith(DIGEST_TAG)}


def file_digest(path: Path) -> str:
    """Streaming md5 of a file: the same value DVC 3 records for it in dvc.lock and .dvc files.

    Remembered for the process by path, size, modification time and inode (as DVC's own state does): a
    job over 100 training sets reads the transform sets, gene list and homology they share once."""
    st = path.stat()
    return _digest(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=1024)
def _digest(path: str, size: int, mtime_ns: int, inode: int) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit(project: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def flatten(prefix: str, value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for k, v in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), v))
        return out
    return {prefix: str(value)}


def _dataset_input(name: str, path: Path, digest: str) -> DatasetInput:
    """An input file as MLflow dataset lineage: a `local` source (what `mlflow.data.get_source` resolves
    to the file) with our md5 as digest, and the role it played as the input's context."""
    dataset = Dataset(
        name=f"{name}:{path.name}", digest=digest, source_type="local", source=json.dumps({"uri": str(path.resolve())})
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training" if name.startswith("train") else name)])


class _LibyamlDump:
    """PyYAML as MLflow's model module sees it, with `safe_dump` done by libyaml's emitter."""

    def __getattr__(self, name: str) -> Any:
        return getattr(yaml, name)

    @staticmethod
    def safe_dump(data: Any, stream: Any = None, **kwargs: Any) -> Any:
        return yaml.dump_all([data], stream, Dumper=yaml.CSafeDumper, **kwargs)


@contextmanager
def _replaced(module: Any, name: str, value: Any) -> Iterator[None]:
    """`module.name` is `value` inside the block, and what it was after it."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def _libyaml_emitter() -> AbstractContextManager[None]:
    """MLflow writes each MLmodel file with PyYAML's pure-Python emitter, which scans the signature
    (one column per gene, ~300 kB of JSON) a character at a time: 0.2 s per dump, two dumps per model.
    libyaml's emitter writes the identical document in milliseconds; used only where it is built in."""
    import mlflow.models.model as model_module

    return _replaced(model_module, "yaml", _LibyamlDump()) if yaml.__with_libyaml__ else nullcontext()


def _requirements_taken_as_pinned() -> AbstractContextManager[None]:
    """MLflow checks every pip requirement of a model against the installed releases, only to warn of a
    mismatch, rebuilding its package map for each (0.11 s a model, 10 models a training).
    `model_requirements` pins exactly the installed releases, so the check can find none: skipped."""
    import mlflow.utils.environment as environment_module

    return _replaced(environment_module, "warn_dependency_requirement_mismatches", lambda requirements: None)


def model_requirements() -> list[str]:
    """The logged models' pip requirements, pinned to this environment's releases as MLflow pins what it
    infers: a model served or loaded elsewhere gets the libraries it was trained and tested with (a
    `+cpu` or `+cu130` torch build is pinned as its public release, which pip finds on PyPI)."""
    return [f"{name}=={Version(version(name)).public}" for name in _MODEL_DISTRIBUTIONS]


def model_signature(genes: list[str]) -> ModelSignature:
    """One double column per gene and the `output` param, built directly (inferring a signature scans every
    column of an example, ~0.2 s for 5k genes). Double, not float: MLflow refuses to narrow float64, the
    dtype of a frame read from CSV, to a float32 column, while it widens float32; the model casts to
    float32 itself."""
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.double, gene) for gene in genes]),
        params=ParamSchema([ParamSpec("output", DataType.string, "embedding")]),
    )


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The figures of a metrics record that MLflow can chart: numbers, counts included (models, replicates
    left out); not flags, names or the per-replicate ranks."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def training_run(client: MlflowClient, run_id: str, store: str = "") -> Run:
    """The run `run_id` names, not deleted; one the store does not hold is named in one line (`store`: where
    it was looked for, for the message)."""
    try:
        return refuse_deleted(client.get_run(run_id))
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise TrackingError(f"run {run_id}: not found{store} (expected a training run id)") from None


def refuse_deleted(run: Run) -> Run:
    """A run deleted in the MLflow UI (or by `mlflow runs delete`) is in the store's trash: nothing is
    logged to it or registered from it."""
    if run.info.lifecycle_stage != "active":
        raise TrackingError(
            f"run {run.info.run_id}: deleted in the MLflow store (expected an active run: `mlflow runs restore --run-id "
            f"{run.info.run_id}`, or `transdnn train PARTITION --resume` trains its data set again)"
        )
    return run


class TrainingRun:
    """A parent run and its replicate children; implements the training loop's sink."""

    def __init__(self, client: MlflowClient, parent_id: str, children: list[str]) -> None:
        self.client = client
        self.parent_id = parent_id
        self.children = children
        self._pending: dict[int, list[Metric]] = {}
        self._flushed = time.monotonic()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transdnn-metrics")  # threads start on first use
        self._in_flight: Future[None] | None = None

    @answered
    def on_epoch(self, epoch: int, metrics: pd.DataFrame) -> None:
        """Per-epoch metrics go out every FLUSH_SECONDS (and at each resume state and at the end), not
        every epoch, and from a writer thread: the store's round trips overlap the next epochs."""
        from transdnn.training import EPOCH_METRICS  # here: registry lookups need no torch

        now = int(time.time() * 1000)
        for row in metrics.itertuples(index=False):
            self._pending.setdefault(int(row.replicate), []).extend(
                Metric(k, float(getattr(row, k)), now, epoch) for k in EPOCH_METRICS
            )
        if time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self._send()

    @answered
    def flush(self) -> None:
        """Everything reported so far is in the store when this returns (a failed write raises here)."""
        self._send()
        self._wait()

    def _send(self) -> None:
        self._wait()  # one batch in flight at a time: the store sees the epochs in order
        batch, self._pending = self._pending, {}
        self._in_flight = self._writer.submit(self._write, batch)
        self._flushed = time.monotonic()

    def _wait(self) -> None:
        if self._in_flight is not None:
            future, self._in_flight = self._in_flight, None
            future.result()

    def _write(self, batch: dict[int, list[Metric]]) -> None:
        for r, values in batch.items():
            for start in range(0, len(values), MAX_METRICS_PER_BATCH):
                chunk = values[start : start + MAX_METRICS_PER_BATCH]
                retry(functools.partial(self.client.log_batch, self.children[r], metrics=chunk))

    @answered
    def log_summary(self, summary: pd.DataFrame, chosen_ranks: np.ndarray, history_files: list[Path]) -> None:
        """Final metrics and history artifacts of each replicate."""
        now = int(time.time() * 1000)
        for row, rank, hist in zip(summary.itertuples(index=False), chosen_ranks, history_files, strict=True):
            child = self.children[int(row.replicate)]
            values = {
                "best_valid_loss": row.best_valid_loss,
                "best_valid_acc": row.best_valid_acc,
                "best_homology_rank": row.best_homology_rank,
                "chosen_homology_rank": float(rank),
                "epochs_run": row.epochs_run,
                "early_stopped": float(row.early_stopped),
                "diverged": float(row.diverged),
            }
            retry(
                functools.partial(self.client.log_batch, child, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()])
            )
            self.client.log_artifact(child, str(hist), "history")

    @answered
    def log_models(self, replicate_files: list[tuple[Path, Path]], genes: list[str], example: np.ndarray, folder: Path) -> None:
        """Log each replicate's chosen checkpoint as a pyfunc model (model from code, weights-only).

        The signature names every gene column. The few-row input example is logged beside the model as
        `model_input_example.csv` rather than through `input_example=`: MLflow's serving validation of a
        4,542-column example costs ~5 s per model, 10 models per training.
        """
        example_csv = folder / "model_input_example.csv"
        pd.DataFrame(example, columns=genes).to_csv(example_csv, index=False)
        signature = model_signature(genes)
        requirements = model_requirements()
        for r, (weights, meta) in enumerate(replicate_files):
            with (
                mlflow.start_run(run_id=self.children[r], nested=True),
                _libyaml_emitter(),
                _requirements_taken_as_pinned(),
                warnings.catch_warnings(),
            ):
                # the example is logged beside the model (see above); MLflow warns that the model has none
                warnings.filterwarnings("ignore", message=".*An input example was not provided")  # after a colour code
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(_MODEL_CODE),
                    artifacts={"weights": str(weights), "meta": str(meta)},
                    code_paths=[str(_PACKAGE_DIR)],
                    signature=signature,
                    pip_requirements=requirements,
                )
            self.client.log_artifact(self.children[r], str(example_csv))
            self.client.set_tag(self.children[r], "model_uri", info.model_uri)

    @answered
    def log_artifacts(self, replicate: int | None, files: list[Path], folder: str | None = None) -> None:
        run = self.parent_id if replicate is None else self.children[replicate]
        for f in files:
            self.client.log_artifact(run, str(f), folder)

    @answered
    def log_parent_metrics(self, metrics: dict[str, Any]) -> None:
        """The numbers among `metrics` (see `numbers`) on the parent run."""
        now = int(time.time() * 1000)
        retry(lambda: self.client.log_batch(self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in numbers(metrics).items()]))

    def end(self, status: str) -> None:
        try:
            self.flush()
        finally:
            self._writer.shutdown()
        for run in [*self.children, self.parent_id]:
            retry(functools.partial(self.client.set_terminated, run, status))

    def abandon(self, status: str | None) -> None:
        """End the runs as `status` after the job failed, as far as the store lets: the job's own error is
        the one to report. None: the store has failed, and nothing more is sent."""
        if status is None:
            self._writer.shutdown(wait=False, cancel_futures=True)
            return
        with contextlib.suppress(*STORE_FAILURES, StoreFailure):
            self.end(status)


@contextmanager
def _system_metrics(run_id: str, every_s: float | None, resumed: bool) -> Iterator[None]:
    """The machine's CPU, memory, disk and network use (and the GPU's, where NVML answers), sampled every
    `every_s` seconds into the training's parent run as `system/…` curves: runs then compare by what they
    cost the machine too. MLflow's sampler runs in its own thread; it stops before the run ends."""
    if every_s is None:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not a line per start and stop
    monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=resumed)
    monitor.start()  # a sampler that cannot start still says so
    sampler_log = logging.getLogger(SystemMetricsMonitor.__module__)
    sampler_log.addFilter(_silenced)
    try:
        yield
    finally:
        monitor.finish()
        sampler_log.removeFilter(_silenced)


def _silenced(record: logging.LogRecord) -> bool:
    """Drops the running sampler's own reports: each is a store failure (it cannot read the run, log or
    flush its samples), which the job reports itself in one line and exit status 2 (`StoreFailure`);
    the sampler's WARNING would be a second line."""
    return False


class Tracker:
    """Opens and reopens runs in one experiment of the configured store.

    Made without touching the store: a job opens it (`connect`) once its inputs have passed their
    checks, so a command that fails on a missing file leaves no fresh mlflow.db behind."""

    def __init__(self, experiment: str, project: Path, create: bool = True, system_metrics_s: float | None = None) -> None:
        self.experiment = experiment
        self.project = project
        self.create = create  # False: a local store that does not exist yet is an error, not made
        self.system_metrics_s = system_metrics_s
        self._opened: tuple[MlflowClient, str] | None = None

    @property
    def client(self) -> MlflowClient:
        return self.connect()[0]

    @property
    def experiment_id(self) -> str:
        return self.connect()[1]

    def connect(self) -> tuple[MlflowClient, str]:
        """Open the store (once): the client and the experiment's id. A job calls it as soon as its inputs
        pass, so a store that does not answer fails the command before anything is written."""
        if self._opened is None:
            self._opened = self._open()
        return self._opened

    def _open(self) -> tuple[MlflowClient, str]:
        uri = mlflow.get_tracking_uri()
        database = _absent_store(uri)
        if database is not None and not self.create:
            raise TrackingError(
                f"{database}: no MLflow store there yet (expected the store of a `transdnn train`, "
                "at tracking.uri or MLFLOW_TRACKING_URI)"
            )
        try:
            with store_lock():  # creating the client may create and migrate a fresh store
                client = MlflowClient()
                return client, ensure_experiment(client, self.experiment, self.project)
        except MlflowException as exc:
            reason = first_line(exc, 200)
            raise TrackingError(
                f"{shown(uri)}: the store refused the experiment {self.experiment!r} ({reason}); expected a store this "
                "user may write to at tracking.uri or MLFLOW_TRACKING_URI"
            ) from None

    @contextmanager
    def training(self, spec: RunSpec, resume_run_id: str | None = None) -> Iterator[TrainingRun]:
        """A parent run with one child per replicate; ends FINISHED, FAILED or KILLED, never RUNNING while the
        store answers.

        `resume_run_id` reopens the runs of a killed training instead of creating new ones. A store that
        stops answering mid-job fails it in one line (`StoreFailure`), and its runs stay RUNNING there:
        `train --resume` continues them once it answers."""
        run = answered(self._resume)(resume_run_id) if resume_run_id else answered(self._create)(spec)
        try:
            with _system_metrics(run.parent_id, self.system_metrics_s, resumed=resume_run_id is not None):
                yield run
            answered(run.end)("FINISHED")
        except KeyboardInterrupt:
            run.abandon("KILLED")
            raise
        except StoreFailure:
            run.abandon(None)  # another request would wait out MLflow's retries (minutes) to fail again
            raise
        except BaseException:
            run.abandon("FAILED")
            raise

    def _resume(self, run_id: str) -> TrainingRun:
        run = self.reopen(run_id)
        for rid in [run.parent_id, *run.children]:
            retry(functools.partial(self.client.update_run, rid, status="RUNNING"))
        return run

    def _create(self, spec: RunSpec) -> TrainingRun:
        partition, dataset, inputs = spec.partition, spec.dataset, spec.inputs
        tags = {
            "partition": partition,
            "dataset": dataset,
            ROLE_TAG: PARENT_ROLE,
            "mlflow.runName": f"{partition}-{dataset}",
        }
        if spec.stage:
            tags["dvc.stage"] = spec.stage
        digests = {name: file_digest(path) for name, path in inputs.items()}
        tags.update({f"{DIGEST_TAG}{name}": d for name, d in digests.items()})
        parent = retry(lambda: self.client.create_run(self.experiment_id, tags=tags))
        pid = parent.info.run_id
        self._log_params(pid, {**flatten("", spec.params), **{k: str(v) for k, v in spec.info.items()}})
        # one request, and the run stays RUNNING (the fluent log_input would end it FINISHED mid-training)
        retry(lambda: self.client.log_inputs(pid, datasets=[_dataset_input(n, p, digests[n]) for n, p in inputs.items()]))
        children = []
        for r, seed in enumerate(spec.seeds):
            ctags = {
                "partition": partition,
                "dataset": dataset,
                "replicate": str(r),
                "seed": str(seed),
                "mlflow.parentRunId": pid,
                "mlflow.runName": f"{partition}-{dataset}-r{r}",
            }
            child = retry(functools.partial(self.client.create_run, self.experiment_id, tags=ctags))
            retry(
                functools.partial(
                    self.client.log_batch, child.info.run_id, params=[Param("replicate", str(r)), Param("seed", str(seed))]
                )
            )
            children.append(child.info.run_id)
        return TrainingRun(self.client, pid, children)

    def _log_params(self, run_id: str, flat: dict[str, str]) -> None:
        """The settings, with the code they ran under (this process's, over any in `flat`), in batches the store accepts."""
        items = list({**flat, "transdnn_version": transdnn.__version__, "git_commit": git_commit(self.project)}.items())
        for start in range(0, len(items), 100):
            retry(
                functools.partial(
                    self.client.log_batch, run_id, params=[Param(k, v[:6000]) for k, v in items[start : start + 100]]
                )
            )

    @answered
    def record_job(
        self, partition: str, checkpoint: str, metrics: dict[str, Any], runs: dict[str, str | None], files: list[Path]
    ) -> None:
        """One run (role `job`) for the pooled answer of a job over all its data sets: the row to compare
        jobs by in the MLflow UI. It holds the params every data set's training run shares (the job's
        settings, whatever CLI options the trainings had), the pooled figures, `files` (the pooled
        consensus and its heatmap) and `data_sets.json`, the training run of each data set."""
        tags = {
            "partition": partition,
            ROLE_TAG: JOB_ROLE,
            "data_sets": str(len(runs)),
            "checkpoint": checkpoint,
            "mlflow.runName": f"{partition}-all-data-sets",
        }
        trainings = [retry(functools.partial(self.client.get_run, rid)).data.params for rid in runs.values() if rid]
        shared = {k: v for k, v in trainings[0].items() if all(t.get(k) == v for t in trainings)} if trainings else {}
        run_id = retry(lambda: self.client.create_run(self.experiment_id, tags=tags)).info.run_id
        try:
            self._log_params(run_id, shared)  # the code is the job's, not the trainings'
            now = int(time.time() * 1000)
            figures = [Metric(k, v, now, 0) for k, v in numbers(metrics).items()]
            retry(lambda: self.client.log_batch(run_id, metrics=figures))
            for f in files:
                self.client.log_artifact(run_id, str(f))
            self.client.log_dict(run_id, runs, "data_sets.json")
        except BaseException:
            retry(lambda: self.client.set_terminated(run_id, "FAILED"))
            raise
        retry(lambda: self.client.set_terminated(run_id, "FINISHED"))

    @answered
    def reopen(self, run_id: str) -> TrainingRun:
        """The run of an earlier training (for embed): its children in replicate order."""
        parent = training_run(self.client, run_id, f" in {shown(mlflow.get_tracking_uri())}")
        found = self.client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'", ViewType.ALL, max_results=1000
        )
        kids = sorted(map(refuse_deleted, found), key=lambda k: int(k.data.tags["replicate"]))
        return TrainingRun(self.client, run_id, [k.info.run_id for k in kids])

    def _held(self, run_id: str) -> Run | None:
        """The run, where this store and experiment hold it and it is not deleted."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if not not_found(exc):
                raise
            return None
        return run if run.info.experiment_id == self.experiment_id and run.info.lifecycle_stage == "active" else None

    @answered
    def finished(self, run_id: str) -> bool:
        """Whether `run_id` is a finished run of this store and experiment, not deleted: a training kept
        from before must have its run where embed and promote will look for it."""
        run = self._held(run_id)
        return run is not None and run.info.status == "FINISHED"

    @answered
    def resumable(self, run_id: str) -> bool:
        """Whether a killed training's run can be continued: this store and experiment hold it, not deleted."""
        return self._held(run_id) is not None
