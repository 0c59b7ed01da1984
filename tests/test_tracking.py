"""MLflow tracking (runs, metrics, models, lineage) against a real (hermetic) SQLite store; no mocks of MLflow.
Promotion and lookups are in test_registry.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from conftest import TinyData, cli_ok, free_port, train_cortex, train_embed_cortex, wait_for_server
from transdnn.checkpoints import RunLayout
from transdnn.cli import app
from transdnn.hardware import native_bf16
from transdnn.tracking import _requirements_taken_as_pinned, model_requirements, shown
from transdnn.training import EPOCH_METRICS

runner = CliRunner()


def test_runs_children_metrics_and_inputs(params: Path, tracking_uri: str, tiny: TinyData):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = train_embed_cortex(params, "--max-epochs", "4")
    assert not [w for w in caught if "input example" in str(w.message)], "the example is logged beside the model"
    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["partition"] == "cortex" and parent.data.tags["dataset"] == "Integrated_dataset_0"
    assert parent.data.params["rows"] == "288" and parent.data.params["genes"] == "40" and parent.data.params["regions"] == "6"
    assert parent.data.params["train.max_epochs"] == "4" and "git_commit" in parent.data.params
    assert parent.data.params["device"] == "cpu" and parent.data.params["cpu_threads"] == str(torch.get_num_threads())
    inputs = {i.dataset.name.split(":")[0]: i for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"train", "human", "mouse", "genes", "homology"}
    assert len(inputs["train"].dataset.digest) == 32
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"train": "training", "human": "human", "mouse": "mouse", "genes": "genes", "homology": "homology"}
    source = mlflow.data.get_source(inputs["human"])  # lineage a reader resolves back to the file
    assert Path(source.uri) == tiny.human.resolve(), source.uri
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(kids) == 2
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert {"partition", "replicate", "seed"} <= set(kid.data.tags)
        epochs = int(kid.data.metrics["epochs_run"])
        for key in ("train_loss", "valid_loss", "valid_acc", "homology_rank", "lr"):
            history = client.get_metric_history(kid.info.run_id, key)
            assert [m.step for m in history] == list(range(epochs))
        arts = {a.path for a in client.list_artifacts(kid.info.run_id, "embedding")}
        assert "embedding/human_embedding.csv" in arts
    parent_arts = {a.path for a in client.list_artifacts(run_id, "embedding")}
    assert {"embedding/metrics.json", "embedding/consensus_heatmap.png", "embedding/consensus_correlation.csv"} <= parent_arts
    # the job's pooled answer has a run of its own, to compare jobs by
    (job,) = client.search_runs([parent.info.experiment_id], "tags.`transdnn.role` = 'job'")
    pooled = json.loads((params.parent / "runs" / "cortex" / "metrics.json").read_text())["all_data_sets"]
    assert job.info.status == "FINISHED" and job.data.tags["partition"] == "cortex" and job.data.tags["data_sets"] == "1"
    assert job.data.metrics["homology_rank_consensus"] == pooled["homology_rank_consensus"]
    assert (job.data.metrics["models"], job.data.metrics["replicates_left_out"]) == (2, 0), "counts are figures too"
    assert parent.data.metrics["replicates_left_out"] == 0 and "beats_raw" not in parent.data.metrics
    # the trainings' settings (--max-epochs 4 here), not params.yaml's, with the code the job ran under
    assert job.data.params["train.max_epochs"] == "4" and job.data.params["git_commit"] == parent.data.params["git_commit"]
    assert job.data.tags["checkpoint"] == "best_valid"
    assert {a.path for a in client.list_artifacts(job.info.run_id)} == {
        "consensus_correlation.csv",
        "consensus_heatmap.png",
        "data_sets.json",
    }
    assert mlflow.artifacts.load_dict(f"runs:/{job.info.run_id}/data_sets.json") == {"Integrated_dataset_0": run_id}
    # one data set: its pooled consensus is its own, and so is the figure (drawn once, not twice)
    figures = [
        Path(mlflow.artifacts.download_artifacts(f"runs:/{rid}/{path}")).read_bytes()
        for rid, path in ((run_id, "embedding/consensus_heatmap.png"), (job.info.run_id, "consensus_heatmap.png"))
    ]
    assert figures[0] == figures[1]


def test_system_metrics_are_sampled_into_the_training_run(params: Path, tracking_uri: str):
    """With `tracking.system_metrics_s`, the parent run holds the machine's curves (one point per sample);
    with null, none, and no sampler thread outlives the job."""
    import threading

    settings = yaml.safe_load(params.read_text())
    settings["tracking"]["system_metrics_s"] = 0.2
    params.write_text(yaml.safe_dump(settings))
    client = MlflowClient(tracking_uri)
    run = client.get_run(train_cortex(params, "--max-epochs", "20", "--replicates", "1"))
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu)))
    assert run.data.metrics["system/system_memory_usage_megabytes"] > 0
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    settings["tracking"]["system_metrics_s"] = None
    params.write_text(yaml.safe_dump(settings))
    run = client.get_run(train_cortex(params, "--max-epochs", "1", "--replicates", "1"))
    assert not [k for k in run.data.metrics if k.startswith("system/")]


@pytest.mark.skipif(not native_bf16(torch.device("cpu")), reason="needs a CPU with native bf16 (AVX-512, AMX)")
def test_the_precision_option_overrides_params_and_is_recorded(params: Path, tracking_uri: str):
    """`--precision bf16` (params.yaml says fp32) reaches the loop: the run records it beside the other settings."""
    run_id = train_cortex(params, "--precision", "bf16", "--max-epochs", "1", "--replicates", "1")
    assert MlflowClient(tracking_uri).get_run(run_id).data.params["train.precision"] == "bf16"


@pytest.mark.skipif(native_bf16(torch.device("cpu")), reason="needs a CPU without native bf16 (AVX2)")
def test_bf16_on_a_cpu_without_it_is_refused_before_the_store_is_opened(params: Path, tracking_uri: str):
    """Where bf16 would be emulated (a training many times slower than fp32), `--precision bf16` is one line
    and exit status 2: no output folder, no run."""
    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--precision", "bf16", "--max-epochs", "1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "option 'precision': 'bf16' requested but this CPU" in result.stderr
    assert not (params.parent / "runs").exists()
    assert (
        MlflowClient(tracking_uri).search_runs([e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]) == []
    )


def test_a_training_shows_running_in_mlflow_until_it_ends(tracking_uri: str, tiny: TinyData, tmp_path: Path):
    """People watch a long training in the MLflow UI: its parent and children are RUNNING while it trains."""
    from transdnn.lineage import RunSpec
    from transdnn.settings import TrackingSettings
    from transdnn.tracking import Tracker, configure

    configure(TrackingSettings(experiment="watched"), tmp_path)  # as the CLI does before it tracks
    spec = RunSpec("cortex", "d0", params={}, info={}, seeds=[1, 2], inputs={"train": tiny.train, "human": tiny.human})
    client = MlflowClient(tracking_uri)
    with Tracker("watched", tmp_path).training(spec) as run:
        runs = [run.parent_id, *run.children]
        assert [client.get_run(r).info.status for r in runs] == ["RUNNING"] * 3
        assert client.get_run(run.parent_id).info.end_time is None
    assert [client.get_run(r).info.status for r in runs] == ["FINISHED"] * 3


def test_a_store_that_stops_answering_mid_training_fails_it_in_one_line(
    tracking_uri: str, tiny: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A tracking server restarted, or the network cut, mid-job: MLflow raised a page of traceback. Now one
    line, and nothing more is sent (each request would wait out MLflow's retries, minutes, to fail again): the
    runs stay RUNNING in the store, and `train --resume` continues them."""
    from transdnn.errors import StoreFailure
    from transdnn.lineage import RunSpec
    from transdnn.settings import TrackingSettings
    from transdnn.tracking import Tracker, configure

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    gone = f"http://127.0.0.1:{free_port()}"
    configure(TrackingSettings(experiment="cut"), tmp_path)
    spec = RunSpec("cortex", "d0", params={}, info={}, seeds=[1, 2], inputs={"train": tiny.train, "human": tiny.human})
    client = MlflowClient(tracking_uri)
    with pytest.raises(StoreFailure) as failed, Tracker("cut", tmp_path).training(spec) as run:
        runs = [run.parent_id, *run.children]
        run.client = MlflowClient(gone)  # the store stops answering
        run.log_parent_metrics({"homology_rank_mean": 2.0})
    message = str(failed.value)
    assert message.startswith(f"{tracking_uri}: the MLflow store failed a request (") and "\n" not in message
    assert message.endswith("run the command again once it does (`train --resume` continues a training from its last state)")
    assert [client.get_run(r).info.status for r in runs] == ["RUNNING"] * 3


@pytest.mark.slow
def test_a_server_killed_mid_training_fails_it_in_one_line_with_system_metrics_on(
    params: Path, store_template: Path, tmp_path: Path
):
    """A real `mlflow server` killed while `transdnn train` runs, with the sampler of system metrics on (as
    params.yaml has it): MLflow's sampler thread printed its own WARNING about the dead server beside the
    job's one-line error."""
    import os
    import signal
    import time

    db = tmp_path / "served.db"
    shutil.copy(store_template, db)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--backend-store-uri"]
    server = subprocess.Popen(
        [*serve, f"sqlite:///{db}", "--default-artifact-root", str(tmp_path / "artifacts")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_server(url, server)
        settings = yaml.safe_load(params.read_text())
        settings["tracking"]["system_metrics_s"] = 0.1
        settings["cortex"]["train"]["max_epochs"] = 50
        params.write_text(yaml.safe_dump(settings))
        env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "PYTHONWARNINGS": "ignore"}
        job = subprocess.Popen(
            ["transdnn", "train", "cortex", "--params", str(params)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        opened = params.parent / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "run.json"
        while not opened.exists() and job.poll() is None:  # the training's runs are open on the server
            time.sleep(0.02)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        _, err = job.communicate(timeout=300)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert job.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {url}: the MLflow store failed a request (")


@pytest.mark.parametrize(
    ("uri", "label"),
    [
        ("models:/transdnn-cortex@champion", "champion"),
        ("models:/transdnn-cortex@previous", "previous"),
        ("models:/transdnn-cortex/12", "version_12"),
        ("models:/m-0123abcd", "m-0123abcd"),
        ("runs:/0123abcd/model", "0123abcd_model"),
    ],
)
def test_each_model_uri_embeds_into_its_own_folder(uri: str, label: str, tmp_path: Path):
    assert RunLayout.for_model_uri(tmp_path, uri).embed_dir == tmp_path / "registry" / "embed" / label


def test_failed_training_ends_runs_failed(params: Path, tracking_uri: str, monkeypatch: pytest.MonkeyPatch):
    import transdnn.jobs

    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(transdnn.jobs, "train", explode)
    result = runner.invoke(app, ["train", "cortex", "--params", str(params)])
    assert result.exit_code != 0
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("transdnn").experiment_id])
    assert runs and {r.info.status for r in runs} == {"FAILED"}


@pytest.mark.slow
def test_two_trainings_at_once_on_sqlite_lose_nothing(params: Path, tracking_uri: str, tmp_path: Path):
    import os

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            ["transdnn", "train", p, "--params", str(params), "--max-epochs", "6"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in ("cortex", "subcortex")
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    client = MlflowClient(tracking_uri)
    assert len(client.search_experiments(filter_string="name = 'transdnn'")) == 1
    for partition in ("cortex", "subcortex"):
        info = json.loads((tmp_path / "runs" / partition / "train" / "Integrated_dataset_0" / "train.json").read_text())
        kids = client.search_runs(
            [client.get_run(info["run_id"]).info.experiment_id], f"tags.mlflow.parentRunId = '{info['run_id']}'"
        )
        assert len(kids) == 2
        for kid in kids:
            assert kid.info.status == "FINISHED"
            epochs = int(kid.data.metrics["epochs_run"])
            assert len(client.get_metric_history(kid.info.run_id, "valid_loss")) == epochs


def test_the_skipped_requirement_check_finds_no_mismatch_and_is_restored():
    """Model logging skips MLflow's check of each requirement against the installed releases, because
    `model_requirements` pins exactly those: the check agrees, and it is back once the logging ends."""
    import mlflow.utils.environment as environment
    from mlflow.utils import requirements_utils

    assert [r for r in model_requirements() if requirements_utils._check_requirement_satisfied(r) is not None] == []
    original = requirements_utils.warn_dependency_requirement_mismatches
    with _requirements_taken_as_pinned():
        assert environment.warn_dependency_requirement_mismatches is not original
    assert environment.warn_dependency_requirement_mismatches is original


def test_model_signature_is_what_mlflow_infers():
    """The signature is built directly (inference scans every column); it must stay what MLflow infers
    for a float64 frame, as read from a CSV."""
    from mlflow.models import infer_signature

    from transdnn.tracking import model_signature

    genes = [f"G{i}" for i in range(7)]
    frame = pd.DataFrame(np.random.default_rng(0).random((3, 7)), columns=genes)
    assert model_signature(genes) == infer_signature(frame, params={"output": "embedding"})
    assert model_signature(genes) != infer_signature(frame.iloc[:, ::-1], params={"output": "embedding"})


def test_metrics_sent_from_the_writer_thread_all_arrive_in_order(tracking_uri: str, monkeypatch: pytest.MonkeyPatch):
    """Every epoch hands its batch to the writer while the previous one may still be in flight; after
    flush() the store holds every epoch of every replicate, in order."""
    import transdnn.tracking as tracking

    monkeypatch.setattr(tracking, "FLUSH_SECONDS", 0.0)
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("writer")
    parent = client.create_run(experiment).info.run_id
    children = [client.create_run(experiment).info.run_id for _ in range(2)]
    run = tracking.TrainingRun(client, parent, children)
    for epoch in range(12):
        frame = pd.DataFrame({"replicate": [0, 1]} | {k: [epoch + 0.5, -epoch] for k in EPOCH_METRICS})
        run.on_epoch(epoch, frame)
    run.end("FINISHED")
    for r, child in enumerate(children):
        history = client.get_metric_history(child, "valid_loss")
        assert [m.step for m in history] == list(range(12))
        assert [m.value for m in history] == [e + 0.5 if r == 0 else -e for e in range(12)]
        assert client.get_run(child).info.status == "FINISHED"


def test_file_digest_is_dvcs_md5_and_changes_with_the_file(tmp_path: Path):
    """Digests are remembered per process; a rewritten file (new size or time) is digested again."""
    import hashlib
    import os

    from transdnn.tracking import file_digest

    f = tmp_path / "input.csv"
    f.write_bytes(b"genes\nA\n")
    assert file_digest(f) == hashlib.md5(b"genes\nA\n").hexdigest() == file_digest(f)
    f.write_bytes(b"genes\nB\n")  # same size: only the modification time tells
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_digest(f) == hashlib.md5(b"genes\nB\n").hexdigest()


def test_embed_of_a_training_the_store_lacks_exits_2(
    params: Path, tracking_uri: str, store_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A store swapped or lost since the training: embed names the run and the store, writes nothing."""
    cli_ok(["train", "cortex", "--params", str(params), "--max-epochs", "1"])
    run_id = json.loads((tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json").read_text())["run_id"]
    other = tmp_path / "other.db"
    shutil.copy(store_template, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{other}")
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: run {run_id}: not found in sqlite:///{other} (expected a training run id)"
    assert not (tmp_path / "runs" / "cortex" / "embed").exists()


def test_a_training_run_deleted_in_the_store_is_never_logged_to_and_is_trained_again(
    params: Path, tracking_uri: str, tmp_path: Path
):
    """A run deleted in the MLflow UI is in the store's trash: embed and promote refuse it in one line
    (MLflow itself raised "must be in the 'active' state" from embed), and `train --resume`, which the DVC
    stage runs, no longer keeps its data set but trains it into a new run."""
    run_id = train_cortex(params, "--max-epochs", "1")
    MlflowClient(tracking_uri).delete_run(run_id)
    deleted = (
        f"error: run {run_id}: deleted in the MLflow store (expected an active run: `mlflow runs restore --run-id {run_id}`, "
        "or `transdnn train PARTITION --resume` trains its data set again)"
    )
    for command in (["embed", "cortex"], ["promote", "cortex", "--run-id", run_id]):
        result = runner.invoke(app, [*command, "--params", str(params)])
        assert (result.exit_code, result.stderr.strip()) == (2, deleted), command
    assert not (tmp_path / "runs" / "cortex" / "embed").exists()
    out = cli_ok(["train", "cortex", "--params", str(params), "--max-epochs", "1", "--resume"])
    assert "trained before; kept" not in out
    layout = RunLayout(tmp_path / "runs" / "cortex", "Integrated_dataset_0")
    assert json.loads(layout.train_info.read_text())["run_id"] != run_id
    cli_ok(["embed", "cortex", "--params", str(params)])


def test_a_training_into_an_experiment_deleted_in_the_store_exits_2_before_writing(
    params: Path, tracking_uri: str, tmp_path: Path
):
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("transdnn")
    client.delete_experiment(experiment)
    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--max-epochs", "1"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"error: experiment 'transdnn': deleted in the MLflow store (expected an active experiment: "
        f"`mlflow experiments restore --experiment-id {experiment}`, or another tracking.experiment in params.yaml)"
    )
    assert not (tmp_path / "runs").exists()


def test_a_killed_training_whose_run_the_store_no_longer_holds_is_trained_afresh(params: Path, tracking_uri: str, tmp_path: Path):
    """Its metrics went with the deleted run (or stayed in another store): continuing it in a new run would
    record only the epochs after the kill, so it is trained afresh, and says why."""
    from transdnn.jobs import _restart_reason
    from transdnn.tracking import Tracker

    run_id = train_cortex(params, "--max-epochs", "1")
    tracker = Tracker("transdnn", tmp_path)
    assert _restart_reason({"made_from": "m", "run_id": run_id}, "m", tracker) is None
    assert _restart_reason({"made_from": "other", "run_id": run_id}, "m", tracker) == "of other settings, files or code"
    MlflowClient(tracking_uri).delete_run(run_id)
    for gone in (run_id, "0" * 32):
        reason = _restart_reason({"made_from": "m", "run_id": gone}, "m", tracker)
        assert reason == f"recorded in MLflow run {gone}, which this store no longer holds (deleted, or another store)"
    assert _restart_reason({"made_from": "m", "run_id": None}, "m", tracker) is None, "an untracked one is resumed"


@pytest.mark.parametrize("command", [["train", "cortex"], ["registry", "show"]])
def test_no_server_at_the_tracking_uri_exits_2(
    command: list[str], params: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MLflow alone retries a refused connection for minutes, then prints a traceback."""
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = runner.invoke(app, [*command, "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {uri}: no MLflow server answers ([Errno 111] Connection refused); expected one at tracking.uri or MLFLOW_TRACKING_URI"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", [["train", "cortex"], ["promote", "cortex"], ["registry", "show"]])
def test_a_file_store_is_refused_in_one_line(command: list[str], params: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An old `./mlruns` at MLFLOW_TRACKING_URI: MLflow 3 alone raises a paragraph, as a traceback."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    result = runner.invoke(app, [*command, "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {store.as_uri()}: a file store, which MLflow 3 refuses (expected a database such as "
        f"sqlite:///{params.parent.resolve() / 'mlflow.db'} or a tracking server, at tracking.uri or MLFLOW_TRACKING_URI; "
        "`mlflow migrate-filestore` moves old runs)"
    )
    assert not store.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["train", "cortex"], "{genes}: file not found (expected a CSV file)"),
        (["embed", "cortex"], "{genes}: file not found (expected a CSV file)"),
        (
            ["promote", "cortex"],
            "{db}: no MLflow store there yet (expected the store of a `transdnn train`, at tracking.uri or MLFLOW_TRACKING_URI)",
        ),
        (
            ["embed", "cortex", "--model", "models:/transdnn-cortex@champion"],
            "models:/transdnn-cortex@champion: cannot load model (no MLflow store at {db} yet)",
        ),
    ],
)
def test_a_command_that_fails_makes_no_store(
    command: list[str], expected: str, params: Path, tiny: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Failing on its inputs, or finding no store to read, a command leaves no fresh, empty mlflow.db."""
    db = tmp_path / "fresh.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{db}")
    tiny.genes.unlink()
    result = runner.invoke(app, [*command, "--params", str(params)])
    mlflow.set_tracking_uri("")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: " + expected.format(genes=tiny.genes.resolve(), db=db)
    assert not list(tmp_path.glob("fresh.db*"))


@pytest.mark.parametrize("command", ["train", "embed"])
def test_an_output_folder_that_cannot_be_made_fails_before_any_run(command: str, params: Path, tracking_uri: str, tmp_path: Path):
    (tmp_path / "taken").write_text("a file where the outputs' folder would go")
    out = tmp_path / "taken" / "cortex"
    result = runner.invoke(app, [command, "cortex", "--params", str(params), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {out}: cannot hold outputs ({tmp_path / 'taken'} is not a folder); expected a folder this user may "
        "write to: `out` in params.yaml or --out"
    )
    assert (
        MlflowClient(tracking_uri).search_runs([e.experiment_id for e in MlflowClient(tracking_uri).search_experiments()]) == []
    )


def test_messages_mask_a_password_in_the_store_uri():
    assert shown("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert shown("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert shown("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_a_kept_data_set_has_its_finished_run_in_this_store(
    params: Path, tracking_uri: str, store_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`--resume` keeps a data set only where embed and promote will find its run: a training that was
    untracked, or tracked into another store, is trained into this one."""
    train = ["train", "cortex", "--params", str(params), "--max-epochs", "1", "--resume"]
    cli_ok([*train, "--no-track"])
    assert "trained before" not in cli_ok(train), "untracked before: trained again, into the store"
    record = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json"
    first = json.loads(record.read_text())["run_id"]
    assert "(trained before; kept)" in cli_ok(train) and "(trained before; kept)" in cli_ok([*train, "--no-track"])
    other = tmp_path / "other.db"
    shutil.copy(store_template, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{other}")
    assert "trained before" not in cli_ok(train), "its run is in another store: trained into this one"
    second = json.loads(record.read_text())["run_id"]
    assert second != first and MlflowClient(f"sqlite:///{other}").get_run(second).info.status == "FINISHED"
