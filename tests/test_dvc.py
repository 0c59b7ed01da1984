"""The DVC pipeline in a real, temporary DVC repo: repro, status, metrics, and selective re-runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, STORE_VARIABLES

pytestmark = pytest.mark.slow


MODULE_LOG = Path(__file__).with_name("module_log")
SHARED = {"cli", "errors"}  # parse, print and name errors: they change no stage's outputs
LOGGED = "src/transdnn/mlflow_model.py"  # not imported by the training: MLflow logs the file as each model's code


def _sh(cwd: Path, *args: str, **env_extra: str) -> str:
    # the project's own store, never the one the developer's shell names (the module's fixture runs before
    # conftest's per-test guard)
    env = {**{k: v for k, v in os.environ.items() if k not in STORE_VARIABLES}, "PYTHONWARNINGS": "ignore", **env_extra}
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project (sources, dvc.yaml, params.yaml) as a fresh git + DVC repo, tiny params."""
    repo = tmp_path_factory.mktemp("dvcrepo")
    shutil.copytree(REPO / "src", repo / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(samples_per_region=2, cells_per_sample=3, transform_samples_per_region=2, other_rows=4, datasets=2)
    for name in ("cortex", "subcortex"):
        params[name]["train"].update(replicates=2, max_epochs=2, device="cpu")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _sh(repo, "git", "init", "-q")
    _sh(repo, "dvc", "init", "-q")
    _sh(repo, "dvc", "config", "core.analytics", "false")
    _sh(repo, "git", "add", "-A")
    _sh(repo, "git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "init")
    pythonpath = os.pathsep.join(filter(None, [str(MODULE_LOG), os.environ.get("PYTHONPATH")]))
    _sh(repo, "dvc", "repro", PYTHONPATH=pythonpath, TRANSDNN_MODULE_LOG=str(repo.parent / "modules.jsonl"))
    return repo


def test_each_stage_depends_on_exactly_the_modules_its_command_loads(dvc_repo: Path):
    """A module a stage runs but does not list would leave its outputs stale when that module changes; one it
    lists but never runs would rerun it (a 2,000-model training, for the train stage) for nothing."""
    stages = yaml.safe_load((dvc_repo / "dvc.yaml").read_text())["stages"]
    runs = [json.loads(line) for line in (dvc_repo.parent / "modules.jsonl").read_text().splitlines()]
    assert {r["argv"][0] for r in runs} == set(stages), "each stage ran, as a `transdnn` process"
    loaded: dict[str, set[str]] = {stage: set() for stage in stages}  # over the stage's partitions
    for run in runs:
        loaded[run["argv"][0]] |= {_source(m.split(".")[0]) for m in run["modules"] if m not in SHARED}
    loaded["train"].add(LOGGED)
    listed = {
        name: {d for d in stage.get("do", stage)["deps"] if d.startswith("src/transdnn/")} for name, stage in stages.items()
    }
    assert {s: sorted(loaded[s] - listed[s]) for s in stages} == {s: [] for s in stages}, "run but not listed"
    assert {s: sorted(listed[s] - loaded[s]) for s in stages} == {s: [] for s in stages}, "listed but not run"


def _source(module: str) -> str:
    """The dvc.yaml dependency of a transdnn module: its file, or its folder for a package."""
    folder = f"src/transdnn/{module}"
    return folder if (REPO / folder).is_dir() else f"{folder}.py"


def test_repro_leaves_a_clean_status_and_a_second_repro_does_nothing(dvc_repo: Path):
    assert "up to date" in _sh(dvc_repo, "dvc", "status")
    assert "Stage 'train@cortex' didn't change" in _sh(dvc_repo, "dvc", "repro")


def test_metrics_plots_and_champions(dvc_repo: Path):
    shown = _sh(dvc_repo, "dvc", "metrics", "show", "--json")
    metrics = json.loads(shown)
    files = next(iter(metrics.values()))["data"]
    assert {"runs/cortex/metrics.json", "runs/subcortex/metrics.json"} <= set(files)
    cortex = files["runs/cortex/metrics.json"]["data"]
    assert {"homology_rank", "homology_rank_consensus", "raw_homology_rank", "best_valid_loss", "best_valid_acc"} <= set(
        cortex["data_sets"]["Integrated_dataset_0"]
    )
    assert {"data_sets", "models", "homology_rank_mean", "homology_rank_consensus", "beats_raw"} <= set(cortex["all_data_sets"])
    plots = json.loads(_sh(dvc_repo, "dvc", "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    assert {"loss", "accuracy", "homology_rank"} <= set(plots["data"])
    assert all(plots["data"][name] for name in ("loss", "accuracy", "homology_rank")), "each plot has its curves"
    for name in ("cortex", "subcortex"):
        promotion = json.loads((dvc_repo / "runs" / name / "promotion.json").read_text())
        assert promotion["uri"] == f"models:/transdnn-{name}@champion"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{dvc_repo / 'mlflow.db'}")
    run = client.get_run(promotion["run_id"])
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).data.tags["dvc.stage"] == "train@subcortex"
    assert client.get_model_version_by_alias("transdnn-cortex", "champion")


def _edit_params(repo: Path, edit: Callable[[dict], object]) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    edit(params)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _train_list(repo: Path, partition: str, names: list[str]) -> None:
    _edit_params(repo, lambda p: p[partition]["data"].update(train=names))


def test_adding_a_data_set_trains_only_it_and_removing_one_drops_its_outputs(dvc_repo: Path):
    out = dvc_repo / "runs" / "cortex"
    first = (out / "train" / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt").stat().st_mtime_ns
    _train_list(dvc_repo, "cortex", ["Integrated_dataset_*.h5ad"])  # both sets synth wrote
    added = _sh(dvc_repo, "dvc", "repro")
    kept = [line for line in added.splitlines() if "(trained before; kept)" in line]
    assert len(kept) == 1 and kept[0].startswith("cortex/Integrated_dataset_0:"), added
    assert "cortex/Integrated_dataset_1: 2 replicates" in added and "Running stage 'promote@cortex'" in added
    assert "cortex, all 2 data sets (4 models): homology rank mean" in added
    assert (out / "train" / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt").stat().st_mtime_ns == first
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["data_sets"]) == {"Integrated_dataset_0", "Integrated_dataset_1"}
    assert (metrics["all_data_sets"]["data_sets"], metrics["all_data_sets"]["models"]) == (2, 4)
    each = [pd.read_csv(out / "embed" / name / "consensus_correlation.csv", index_col=0) for name in metrics["data_sets"]]
    pooled = pd.read_csv(out / "embed" / "consensus_correlation.csv", index_col=0)
    assert np.allclose(pooled.to_numpy(), (each[0].to_numpy() + each[1].to_numpy()) / 2)

    _train_list(dvc_repo, "cortex", ["Integrated_dataset_1.h5ad"])
    removed = _sh(dvc_repo, "dvc", "repro")
    assert "cortex/Integrated_dataset_1: 2 replicates" in removed and "(trained before; kept)" in removed
    for tree in ("train", "history", "embed"):
        assert sorted(p.name for p in (out / tree).iterdir() if p.is_dir()) == ["Integrated_dataset_1"], tree
    assert set(json.loads((out / "metrics.json").read_text())["data_sets"]) == {"Integrated_dataset_1"}
    assert "up to date" in _sh(dvc_repo, "dvc", "status")


def test_experiments_show_their_own_metrics(dvc_repo: Path):
    """runs/ is not in git: DVC must keep the metrics (and history) in its cache for `dvc exp show` and
    `dvc plots diff` to read them for anything but the workspace."""
    _sh(dvc_repo, "git", "add", "-A")
    _sh(dvc_repo, "git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "baseline")
    assert "up to date" in _sh(dvc_repo, "dvc", "status")
    _sh(dvc_repo, "dvc", "exp", "run", "-S", "cortex.train.seed=1", "-n", "seed1")
    shown = json.loads(_sh(dvc_repo, "dvc", "exp", "show", "--json"))
    baseline = shown[1]
    experiments = {r["name"]: r for e in baseline.get("experiments") or [] for r in e["revs"]}
    for rev in (baseline, experiments["seed1"]):
        metrics = rev["data"]["metrics"]["runs/cortex/metrics.json"]
        assert "error" not in metrics, (rev.get("name"), metrics)
        assert "homology_rank_mean" in metrics["data"]["all_data_sets"]
    # the README's way to compare 100-set jobs by their pooled figures alone
    header = _sh(dvc_repo, "dvc", "exp", "show", "--csv", "--drop", ".*:data_sets").splitlines()[0].split(",")
    assert "runs/cortex/metrics.json:all_data_sets.homology_rank_consensus" in header, header
    assert not [column for column in header if ":data_sets." in column], header
    plots = json.loads(_sh(dvc_repo, "dvc", "plots", "diff", "HEAD", "seed1", "--json"))
    assert not plots.get("errors"), plots["errors"]
    revs = {rev for plot in plots["data"]["homology_rank"] for rev in plot.get("revisions", [])}
    assert {"HEAD", "seed1"} <= revs, revs


def test_a_killed_dvc_repro_is_finished_by_dvc_repro(dvc_repo: Path):
    """SIGKILL the whole `dvc repro` mid-training: the next `dvc repro` continues the killed training (same
    MLflow run) instead of starting over, and ends with a clean status."""
    _train_list(dvc_repo, "cortex", ["Integrated_dataset_0.h5ad"])
    _edit_params(dvc_repo, lambda p: p["cortex"]["model"].update(hidden_units=[64, 64, 64]))
    _edit_params(dvc_repo, lambda p: p["cortex"]["train"].update(max_epochs=150, patience=1000, state_every_s=0))
    root = dvc_repo / "runs" / "cortex" / "train" / "Integrated_dataset_0"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        ["dvc", "repro"], cwd=dvc_repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not (root / "state.current").exists():
        assert proc.poll() is None, "dvc repro ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (root / "train.json").exists(), "killed mid-training"
    killed_run = json.loads((root / "run.json").read_text())["run_id"]

    rerun = _sh(dvc_repo, "dvc", "repro")
    assert "Running stage 'train@cortex'" in rerun and "trained afresh" not in rerun
    info = json.loads((root / "train.json").read_text())
    assert info["run_id"] == killed_run and info["epochs_run"] == [150, 150], "the killed training, continued"
    assert "up to date" in _sh(dvc_repo, "dvc", "status")


def test_changing_one_partition_reruns_only_its_stages(dvc_repo: Path):
    _edit_params(dvc_repo, lambda p: p["cortex"]["train"].update(learning_rate=1e-4))
    status = _sh(dvc_repo, "dvc", "status", "--json")
    changed = set(json.loads(status))
    assert "train@cortex" in changed
    assert not any("subcortex" in s for s in changed)
    assert "synth" not in changed
