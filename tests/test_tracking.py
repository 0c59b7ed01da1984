"""MLflow tracking and the registry against a real (hermetic) SQLite store; no mocks of MLflow."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from packaging.version import Version
from typer.testing import CliRunner

from conftest import TinyData
from transdnn.checkpoints import RunLayout
from transdnn.cli import app
from transdnn.data import load_partition_inputs
from transdnn.registry import candidates, promotion_reason
from transdnn.tracking import shown
from transdnn.training import EPOCH_METRICS

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result.stdout


def _train(params: Path, *extra: str) -> str:
    _ok(["train", "cortex", "--params", str(params), *extra])
    return json.loads((params.parent / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json").read_text())["run_id"]


def _train_embed(params: Path, *extra: str) -> str:
    run_id = _train(params, *extra)
    _ok(["embed", "cortex", "--params", str(params)])
    return run_id


def test_runs_children_metrics_and_inputs(params: Path, tracking_uri: str):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_id = _train_embed(params, "--max-epochs", "4")
    assert not [w for w in caught if "input example" in str(w.message)], "the example is logged beside the model"
    client = MlflowClient(tracking_uri)
    parent = client.get_run(run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["partition"] == "cortex" and parent.data.tags["dataset"] == "Integrated_dataset_0"
    assert parent.data.params["rows"] == "288" and parent.data.params["genes"] == "40" and parent.data.params["regions"] == "6"
    assert parent.data.params["train.max_epochs"] == "4" and "git_commit" in parent.data.params
    inputs = {i.dataset.name.split(":")[0]: i.dataset for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"train", "human", "mouse", "genes", "homology"}
    assert len(inputs["train"].digest) == 32
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
    # the trainings' settings (--max-epochs 4 here), not params.yaml's, with the code the job ran under
    assert job.data.params["train.max_epochs"] == "4" and job.data.params["git_commit"] == parent.data.params["git_commit"]
    assert job.data.tags["checkpoint"] == "best_valid"
    assert {a.path for a in client.list_artifacts(job.info.run_id)} == {
        "consensus_correlation.csv",
        "consensus_heatmap.png",
        "data_sets.json",
    }
    assert mlflow.artifacts.load_dict(f"runs:/{job.info.run_id}/data_sets.json") == {"Integrated_dataset_0": run_id}


def test_promote_champion_loads_and_reproduces_run_embeddings(params: Path, tracking_uri: str, tiny: TinyData, tmp_path: Path):
    run_id = _train_embed(params)
    out = _ok(["promote", "cortex", "--params", str(params)])
    assert "promoted version" in out
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("transdnn-cortex", "champion")
    assert champion.tags["partition"] == "cortex" and "promotion_reason" in champion.tags
    n_versions = len(client.search_model_versions("name='transdnn-cortex'"))
    # promote again: nothing changes
    assert "already champion" in _ok(["promote", "cortex", "--params", str(params)])
    assert len(client.search_model_versions("name='transdnn-cortex'")) == n_versions
    assert client.get_model_version_by_alias("transdnn-cortex", "champion").version == champion.version

    # the model pins the libraries it was made with, so a serving environment built from it gets them
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/transdnn-cortex@champion")).read_text().split()
    assert f"torch=={Version(torch.__version__).public}" in requirements and f"mlflow=={mlflow.__version__}" in requirements
    assert all("==" in line for line in requirements if not line.startswith("-")), requirements
    model = mlflow.pyfunc.load_model("models:/transdnn-cortex@champion")
    inputs = load_partition_inputs(tiny.human, tiny.mouse, tiny.genes, tiny.homology)
    frame = pd.DataFrame(inputs.human.means, columns=inputs.genes.genes, index=inputs.human.regions)
    frame = frame[frame.columns[::-1]].assign(extra_column=1.0)  # any order, extra columns ignored
    predicted = model.predict(frame)
    replicate = champion.tags["replicate"]
    stored = Path(
        mlflow.artifacts.download_artifacts(
            run_id=champion.run_id, artifact_path="embedding/human_embedding.csv", dst_path=str(tmp_path / "dl")
        )
    )
    expected = pd.read_csv(stored, index_col=0)
    assert np.allclose(predicted.to_numpy(), expected.to_numpy(), atol=1e-5)
    assert (
        tmp_path / "runs" / "cortex" / "embed" / "Integrated_dataset_0" / f"replicate_{replicate}" / "human_embedding.csv"
    ).is_file()
    proba = model.predict(frame, params={"output": "proba"})
    assert np.allclose(proba.sum(axis=1), 1, atol=1e-5)
    with pytest.raises(Exception, match="missing inputs"):
        model.predict(frame.drop(columns=inputs.genes.genes[:2]))

    shown = _ok(["registry", "show", "cortex", "--params", str(params)])
    assert "models:/transdnn-cortex@champion" in shown and run_id not in shown  # versions point at child runs

    _ok(["embed", "cortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"])
    registry = tmp_path / "runs" / "cortex" / "registry" / "embed"
    via_registry = pd.read_csv(registry / "champion" / "replicate_0" / "human_embedding.csv", index_col=0)
    assert np.allclose(via_registry.to_numpy(), expected.to_numpy(), atol=1e-5)
    # another URI writes beside the champion's folder, not over it, and its metrics name the model
    by_version = f"models:/transdnn-cortex/{champion.version}"
    assert str(registry / f"version_{champion.version}") in _ok(
        ["embed", "cortex", "--params", str(params), "--model", by_version]
    )
    assert json.loads((registry / f"version_{champion.version}" / "metrics.json").read_text())["checkpoint"] == by_version
    assert json.loads((registry / "champion" / "metrics.json").read_text())["checkpoint"] == "models:/transdnn-cortex@champion"
    again = pd.read_csv(registry / f"version_{champion.version}" / "replicate_0" / "human_embedding.csv", index_col=0)
    assert np.allclose(again.to_numpy(), via_registry.to_numpy())
    # a cortex model does not embed the subcortex inputs, even where (as here) their genes would fit it
    wrong = runner.invoke(app, ["embed", "subcortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"])
    assert wrong.exit_code == 2 and wrong.stderr.strip() == (
        "error: models:/transdnn-cortex@champion: a model of partition 'cortex' (expected one of 'subcortex' to embed subcortex)"
    )
    assert not (tmp_path / "runs" / "subcortex").exists()


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


@pytest.mark.parametrize("criterion", ["homology_rank", "valid_loss"])
def test_require_better_keeps_the_better_champion(criterion: str, params: Path, tracking_uri: str):
    """Of two trainings, --require-better moves `champion` from the worse one's best replicate (by
    `promote.criterion`) to the better one's and refuses the way back; a plain promote takes it,
    keeping the one it replaced as `previous`."""
    settings = yaml.safe_load(params.read_text())
    settings["promote"]["criterion"] = criterion
    params.write_text(yaml.safe_dump(settings))
    runs = [_train_embed(params, "--seed", seed) for seed in ("1", "2")]
    client = MlflowClient(tracking_uri)
    best = {run: min(candidates(client, [run], "cortex"), key=lambda c: c.key(criterion)) for run in runs}
    better, worse = sorted(runs, key=lambda run: best[run].key(criterion))

    def champion() -> ModelVersion:
        return client.get_model_version_by_alias("transdnn-cortex", "champion")

    _ok(["promote", "cortex", "--params", str(params), "--run-id", worse])
    assert champion().tags["replicate"] == str(best[worse].replicate)
    out = _ok(["promote", "cortex", "--params", str(params), "--run-id", better, "--require-better"])
    assert "promoted" in out
    first = champion()
    assert first.tags["source_run_id"] == best[better].run_id
    out = _ok(["promote", "cortex", "--params", str(params), "--run-id", worse, "--require-better"])
    assert "kept" in out and "does not beat" in out
    assert champion().version == first.version

    _ok(["promote", "cortex", "--params", str(params), "--run-id", worse, "--always"])
    assert champion().tags["source_run_id"] == best[worse].run_id
    assert client.get_model_version_by_alias("transdnn-cortex", "previous").version == first.version


def test_require_better_compares_exact_figures_not_the_rounded_tags(params: Path, tracking_uri: str):
    """Two trainings tie on rank and differ in valid loss below the fourth decimal that version tags
    show: the worse must not replace the better, and `registry show --json` gives the exact figures."""
    runs = [_train(params, "--seed", seed, "--replicates", "1") for seed in ("1", "2")]
    client = MlflowClient(tracking_uri)
    (held,), (worse,) = (candidates(client, [run], "cortex") for run in runs)
    for cand, loss in ((held, 1.73276), (worse, 1.73278)):  # both 1.7328 when rounded
        client.log_metric(cand.run_id, "chosen_homology_rank", 1.0)
        client.log_metric(cand.run_id, "best_valid_loss", loss)
    _ok(["promote", "cortex", "--params", str(params), "--run-id", runs[0]])
    out = _ok(["promote", "cortex", "--params", str(params), "--run-id", runs[1], "--require-better"])
    assert "kept" in out and "does not beat" in out, out
    (shown,) = json.loads(_ok(["registry", "show", "cortex", "--params", str(params), "--json"]))
    assert shown["run_id"] == held.run_id
    assert (shown["replicate"], shown["chosen_homology_rank"], shown["best_valid_loss"]) == (0, 1.0, 1.73276)
    assert shown["dataset"] == "Integrated_dataset_0" and shown["version"] == 1
    assert shown["promotion_reason"] == f"lowest homology_rank among 1 replicates of run(s) {runs[0]}"


def test_promote_keeps_a_better_champion_unless_ranked_on_other_inputs(params: Path, tracking_uri: str, tiny: TinyData):
    """`promote.require_better` (true in params.yaml): a worse training leaves `champion` where it is,
    and promotion.json says so; `--always` moves it; a training ranked on other transform sets, or whose
    ranks are of another checkpoint kind, is not compared, so it takes the alias even with worse figures."""
    client = MlflowClient(tracking_uri)

    def train_worse(*extra: str) -> str:
        run = _train(params, *extra)
        for cand in candidates(client, [run], "cortex"):
            client.log_metric(cand.run_id, "chosen_homology_rank", 99.0)  # worse than any real rank here
        return run

    def promote(run: str, *extra: str) -> dict:
        _ok(["promote", "cortex", "--params", str(params), "--run-id", run, *extra])
        return json.loads((params.parent / "runs" / "cortex" / "promotion.json").read_text())

    good = _train(params, "--seed", "1")
    held = promote(good)
    assert held["moved"] and held["run_id"] == held["candidate"]["run_id"]
    worse = train_worse("--seed", "2")
    kept = promote(worse)
    assert not kept["moved"] and "does not beat it" in kept["reason"], kept
    assert (kept["version"], kept["run_id"]) == (held["version"], held["run_id"])  # the champion, unchanged
    assert kept["candidate"]["homology_rank"] == 99.0 and kept["candidate"]["version"] != held["version"]
    assert int(client.get_model_version_by_alias("transdnn-cortex", "champion").version) == held["version"]
    always = promote(worse, "--always")
    assert always["moved"] and always["run_id"] == always["candidate"]["run_id"] != held["run_id"]

    promote(good, "--always")
    other = tiny.root / "Human_other.h5ad"
    human = ad.read_h5ad(tiny.human)
    human.X = human.X + 0.1
    human.write_h5ad(other)
    moved = promote(train_worse("--human", str(other)))
    assert moved["moved"] and moved["homology_rank"] == 99.0, moved
    assert "ranked on other transform sets, genes or homology" in moved["reason"]

    promote(good, "--always")  # a best-rank checkpoint's rank chose it: not compared with best-valid ones
    settings = yaml.safe_load(params.read_text())
    settings["cortex"]["embed"]["checkpoint"] = "best_rank"
    params.write_text(yaml.safe_dump(settings))
    moved = promote(train_worse())
    assert moved["moved"] and "another checkpoint kind" in moved["reason"], moved


def test_promote_refuses_an_untracked_training_rather_than_the_stores_latest(params: Path, tracking_uri: str, tmp_path: Path):
    """The workspace's training was untracked: promoting the latest run of the store instead would put
    some other training (another checkout's, a teammate's) behind `champion`."""
    _ok(["train", "cortex", "--params", str(params)])
    _ok(["train", "cortex", "--params", str(params), "--no-track"])
    result = runner.invoke(app, ["promote", "cortex", "--params", str(params)])
    record = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json"
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {record}: field 'run_id' is null, trained with --no-track "
        "(expected a tracked `transdnn train`, or `promote --run-id`)"
    )
    assert MlflowClient(tracking_uri).search_registered_models() == []


def test_promote_refuses_another_partitions_or_a_job_run(params: Path, tracking_uri: str):
    """`--run-id` of a subcortex training must not put subcortex models behind transdnn-cortex."""
    _ok(["train", "subcortex", "--params", str(params)])
    record = params.parent / "runs" / "subcortex" / "train" / "Integrated_dataset_0" / "train.json"
    subcortex = json.loads(record.read_text())["run_id"]
    result = runner.invoke(app, ["promote", "cortex", "--params", str(params), "--run-id", subcortex])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: run {subcortex}: a training of partition 'subcortex' (expected one of 'cortex')"
    _ok(["embed", "subcortex", "--params", str(params)])
    client = MlflowClient(tracking_uri)
    (job,) = client.search_runs(client.get_run(subcortex).info.experiment_id, "tags.`transdnn.role` = 'job'")
    result = runner.invoke(app, ["promote", "subcortex", "--params", str(params), "--run-id", job.info.run_id])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: run {job.info.run_id}: not a training run (tag transdnn.role is 'job'; "
        "expected the id of a `transdnn train subcortex` run)"
    )
    assert client.search_registered_models() == []


def test_promote_unknown_run_exits_2(params: Path, tracking_uri: str):
    result = runner.invoke(app, ["promote", "cortex", "--params", str(params), "--run-id", "0" * 32])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: run {'0' * 32}: not found (expected a training run id)"


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


def test_promote_without_training_exits_2(params: Path, tracking_uri: str):
    result = runner.invoke(app, ["promote", "subcortex", "--params", str(params)])
    assert result.exit_code == 2 and "no finished training run" in result.stderr


@pytest.mark.slow
def test_two_trainings_at_once_on_sqlite_lose_nothing(params: Path, tracking_uri: str, tmp_path: Path):
    import os
    import subprocess

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


@pytest.mark.slow
def test_two_promotes_at_once_leave_one_champion(params: Path, tracking_uri: str):
    import os
    import subprocess

    _train_embed(params)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            ["transdnn", "promote", "cortex", "--params", str(params)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions("name='transdnn-cortex'")
    assert len(versions) == 2, "each replicate is registered once"
    champions = [v for v in versions if "champion" in client.get_model_version("transdnn-cortex", v.version).aliases]
    assert len(champions) == 1


def test_model_signature_is_what_mlflow_infers():
    """The signature is built directly (inference scans every column); it must stay what MLflow infers."""
    from mlflow.models import infer_signature

    from transdnn.tracking import model_signature

    genes = [f"G{i}" for i in range(7)]
    frame = pd.DataFrame(np.random.default_rng(0).random((3, 7), dtype=np.float32), columns=genes)
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
    _ok(["train", "cortex", "--params", str(params), "--max-epochs", "1"])
    run_id = json.loads((tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json").read_text())["run_id"]
    other = tmp_path / "other.db"
    shutil.copy(store_template, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{other}")
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: run {run_id}: not found in sqlite:///{other} (expected a training run id)"
    assert not (tmp_path / "runs" / "cortex" / "embed").exists()


def test_embed_of_an_unknown_registered_model_exits_2(params: Path, tracking_uri: str, tmp_path: Path):
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: models:/transdnn-cortex@champion: cannot load model (")
    assert not (tmp_path / "runs" / "cortex" / "registry").exists()


def test_registry_show_before_any_store_creates_none(params: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A lookup reports that nothing is registered; it does not create and migrate an empty store."""
    db = tmp_path / "project" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert (
        _ok(["registry", "show", "--params", str(params)]).strip()
        == "no registered champion yet: run `transdnn promote PARTITION`"
    )
    assert json.loads(_ok(["registry", "show", "cortex", "--params", str(params), "--json"])) == []
    assert not db.exists() and not db.parent.exists()


def test_registry_show_loads_no_torch(params: Path, tracking_uri: str):
    """A lookup pays for MLflow, not for torch, anndata and the training loop (~2.5 s a call here)."""
    code = (
        "import sys\nfrom transdnn.cli import app\n"
        f"app(['registry', 'show', '--params', {str(params)!r}], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'anndata', 'transdnn.training') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


@pytest.mark.parametrize("command", [["train", "cortex"], ["registry", "show"]])
def test_no_server_at_the_tracking_uri_exits_2(
    command: list[str], params: Path, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MLflow alone retries a refused connection for minutes, then prints a traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = runner.invoke(app, [*command, "--params", str(params)])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {uri}: no MLflow server answers ([Errno 111] Connection refused); expected one at tracking.uri or MLFLOW_TRACKING_URI"
    )
    assert not (tmp_path / "runs").exists()


def test_messages_mask_a_password_in_the_store_uri():
    assert shown("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert shown("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert shown("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_promotion_reason_names_a_few_runs_and_counts_many():
    assert promotion_reason("homology_rank", 10, ["a1", "b2"]) == "lowest homology_rank among 10 replicates of run(s) a1, b2"
    many = promotion_reason("valid_loss", 1000, [f"{i:032x}" for i in range(100)])
    assert many == "lowest valid_loss among 1000 replicates of 100 training runs"


def test_a_kept_data_set_has_its_finished_run_in_this_store(
    params: Path, tracking_uri: str, store_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """`--resume` keeps a data set only where embed and promote will find its run: a training that was
    untracked, or tracked into another store, is trained into this one."""
    train = ["train", "cortex", "--params", str(params), "--max-epochs", "1", "--resume"]
    _ok([*train, "--no-track"])
    assert "trained before" not in _ok(train), "untracked before: trained again, into the store"
    record = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json"
    first = json.loads(record.read_text())["run_id"]
    assert "(trained before; kept)" in _ok(train) and "(trained before; kept)" in _ok([*train, "--no-track"])
    other = tmp_path / "other.db"
    shutil.copy(store_template, other)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{other}")
    assert "trained before" not in _ok(train), "its run is in another store: trained into this one"
    second = json.loads(record.read_text())["run_id"]
    assert second != first and MlflowClient(f"sqlite:///{other}").get_run(second).info.status == "FINISHED"
