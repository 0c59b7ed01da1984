"""The model registry: promotion, the champion alias and lookups, against a real (hermetic) SQLite store
and trainings of the tiny data; no mocks of MLflow."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
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

from conftest import TinyData, cli_ok, train_cortex, train_embed_cortex
from transdnn.checkpoints import RunLayout, load_model
from transdnn.cli import app
from transdnn.data import load_partition_inputs
from transdnn.registry import _candidate, candidates, promotion_reason

runner = CliRunner()


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_promote_champion_loads_and_reproduces_run_embeddings(
    params: Path, tracking_uri: str, tiny: TinyData, tmp_path: Path, dtype: str
):
    """The registered model is the checkpoint's weights as stored, int8 ones with their scales."""
    params.write_text(params.read_text().replace("checkpoint_dtype: float16", f"checkpoint_dtype: {dtype}"))
    run_id = train_embed_cortex(params)
    stored = load_model(RunLayout(tmp_path / "runs" / "cortex", "Integrated_dataset_0"), "best_valid")
    assert stored.state["weights.0"].dtype == getattr(torch, dtype)
    out = cli_ok(["promote", "cortex", "--params", str(params)])
    assert "promoted version" in out
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias("transdnn-cortex", "champion")
    assert champion.tags["partition"] == "cortex" and "promotion_reason" in champion.tags
    source = client.get_run(champion.run_id)  # the version's tags are set as it is created
    assert champion.tags["source_run_id"] == champion.run_id and champion.tags["replicate"] == source.data.tags["replicate"]
    assert champion.tags["dataset"] == "Integrated_dataset_0"
    assert float(champion.tags["chosen_homology_rank"]) == pytest.approx(source.data.metrics["chosen_homology_rank"], abs=5e-5)
    assert float(champion.tags["best_valid_loss"]) == pytest.approx(source.data.metrics["best_valid_loss"], abs=5e-5)
    n_versions = len(client.search_model_versions("name='transdnn-cortex'"))
    # promote again: nothing changes
    assert "already champion" in cli_ok(["promote", "cortex", "--params", str(params)])
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

    shown = cli_ok(["registry", "show", "cortex", "--params", str(params)])
    assert "models:/transdnn-cortex@champion" in shown and run_id not in shown  # versions point at child runs

    cli_ok(["embed", "cortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"])
    registry = tmp_path / "runs" / "cortex" / "registry" / "embed"
    via_registry = pd.read_csv(registry / "champion" / "replicate_0" / "human_embedding.csv", index_col=0)
    assert np.allclose(via_registry.to_numpy(), expected.to_numpy(), atol=1e-5)
    # another URI writes beside the champion's folder, not over it, and its metrics name the model
    by_version = f"models:/transdnn-cortex/{champion.version}"
    assert str(registry / f"version_{champion.version}") in cli_ok(
        ["embed", "cortex", "--params", str(params), "--model", by_version]
    )
    assert json.loads((registry / f"version_{champion.version}" / "metrics.json").read_text())["checkpoint"] == by_version
    assert json.loads((registry / "champion" / "metrics.json").read_text())["checkpoint"] == "models:/transdnn-cortex@champion"
    again = pd.read_csv(registry / f"version_{champion.version}" / "replicate_0" / "human_embedding.csv", index_col=0)
    assert np.allclose(again.to_numpy(), via_registry.to_numpy())
    # the registry's embeddings are held like a partition's outputs: a second writer there is refused
    with open(registry.parent / ".transdnn.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.truncate(0)
        held.write("`transdnn embed cortex --model elsewhere` (pid 1)\n")
        held.flush()
        refused = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--model", by_version])
    assert refused.exit_code == 2
    assert refused.stderr.startswith(f"error: {registry.parent}: in use by `transdnn embed cortex --model elsewhere` (pid 1);")
    # a promotion reads the partition's train.json files: not while a training there rewrites them
    with open(tmp_path / "runs" / "cortex" / ".transdnn.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        refused = runner.invoke(app, ["promote", "cortex", "--params", str(params)])
    assert refused.exit_code == 2 and " in use by " in refused.stderr, refused.output
    # a cortex model does not embed the subcortex inputs, even where (as here) their genes would fit it
    wrong = runner.invoke(app, ["embed", "subcortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"])
    assert wrong.exit_code == 2 and wrong.stderr.strip() == (
        "error: models:/transdnn-cortex@champion: a model of partition 'cortex' (expected one of 'subcortex' to embed subcortex)"
    )
    assert not (tmp_path / "runs" / "subcortex").exists()


@pytest.mark.parametrize("criterion", ["homology_rank", "valid_loss"])
def test_require_better_keeps_the_better_champion(criterion: str, params: Path, tracking_uri: str):
    """Of two trainings, --require-better moves `champion` from the worse one's best replicate (by
    `promote.criterion`) to the better one's and refuses the way back; a plain promote takes it,
    keeping the one it replaced as `previous`."""
    settings = yaml.safe_load(params.read_text())
    settings["promote"]["criterion"] = criterion
    params.write_text(yaml.safe_dump(settings))
    runs = [train_embed_cortex(params, "--seed", seed) for seed in ("1", "2")]
    client = MlflowClient(tracking_uri)
    best = {run: min(candidates(client, [run], "cortex"), key=lambda c: c.key(criterion)) for run in runs}
    better, worse = sorted(runs, key=lambda run: best[run].key(criterion))

    def champion() -> ModelVersion:
        return client.get_model_version_by_alias("transdnn-cortex", "champion")

    cli_ok(["promote", "cortex", "--params", str(params), "--run-id", worse])
    assert champion().tags["replicate"] == str(best[worse].replicate)
    out = cli_ok(["promote", "cortex", "--params", str(params), "--run-id", better, "--require-better"])
    assert "promoted" in out
    first = champion()
    assert first.tags["source_run_id"] == best[better].run_id
    out = cli_ok(["promote", "cortex", "--params", str(params), "--run-id", worse, "--require-better"])
    assert "kept" in out and "does not beat" in out
    assert champion().version == first.version

    cli_ok(["promote", "cortex", "--params", str(params), "--run-id", worse, "--always"])
    assert champion().tags["source_run_id"] == best[worse].run_id
    assert client.get_model_version_by_alias("transdnn-cortex", "previous").version == first.version


# A collaborator's machine: no GPU, and no transdnn installed (the model brings the code it needs).
_PREDICT_ELSEWHERE = """
import sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p or ".") / "transdnn" / "__init__.py").is_file()]
import mlflow, pandas as pd, torch
assert not torch.cuda.is_available()
model = mlflow.pyfunc.load_model("models:/transdnn-cortex@champion")
model.predict(pd.read_csv(sys.argv[1], index_col=0)).to_csv(sys.argv[2])
import transdnn
print(transdnn.__file__)
"""


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
    ],
)
def test_a_champion_trained_on_either_device_predicts_without_a_gpu_or_transdnn(
    device: str, params: Path, tracking_uri: str, tiny: TinyData, tmp_path: Path
):
    """A GPU job registers the models; users load them on laptops and CPU servers, with its own code."""
    train_embed_cortex(params, "--device", device)
    cli_ok(["promote", "cortex", "--params", str(params)])
    champion = MlflowClient(tracking_uri).get_model_version_by_alias("transdnn-cortex", "champion")
    inputs = load_partition_inputs(tiny.human, tiny.mouse, tiny.genes, tiny.homology)
    pd.DataFrame(inputs.human.means, columns=inputs.genes.genes, index=inputs.human.regions).to_csv(tmp_path / "in.csv")
    loaded = subprocess.run(
        [sys.executable, "-c", _PREDICT_ELSEWHERE, str(tmp_path / "in.csv"), str(tmp_path / "out.csv")],
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    imported_from = Path(loaded.stdout.splitlines()[-1])
    assert imported_from.parts[-3:-1] == ("code", "transdnn"), f"the model's own code, not {imported_from}"
    predicted = pd.read_csv(tmp_path / "out.csv", index_col=0)
    stored = tmp_path / "runs" / "cortex" / "embed" / "Integrated_dataset_0" / f"replicate_{champion.tags['replicate']}"
    expected = pd.read_csv(stored / "human_embedding.csv", index_col=0)  # embedded on `device` by `transdnn embed`
    assert predicted.shape == expected.shape and np.isfinite(predicted.to_numpy()).all()
    assert np.allclose(predicted.to_numpy(), expected.to_numpy(), atol=1e-4)


def test_require_better_compares_exact_figures_not_the_rounded_tags(params: Path, tracking_uri: str):
    """Two trainings tie on rank and differ in valid loss below the fourth decimal that version tags
    show: the worse must not replace the better, and `registry show --json` gives the exact figures."""
    runs = [train_cortex(params, "--seed", seed, "--replicates", "1") for seed in ("1", "2")]
    client = MlflowClient(tracking_uri)
    (held,), (worse,) = (candidates(client, [run], "cortex") for run in runs)
    for cand, loss in ((held, 1.73276), (worse, 1.73278)):  # both 1.7328 when rounded
        client.log_metric(cand.run_id, "chosen_homology_rank", 1.0)
        client.log_metric(cand.run_id, "best_valid_loss", loss)
    cli_ok(["promote", "cortex", "--params", str(params), "--run-id", runs[0]])
    out = cli_ok(["promote", "cortex", "--params", str(params), "--run-id", runs[1], "--require-better"])
    assert "kept" in out and "does not beat" in out, out
    (shown,) = json.loads(cli_ok(["registry", "show", "cortex", "--params", str(params), "--json"]))
    assert shown["run_id"] == held.run_id
    assert (shown["replicate"], shown["chosen_homology_rank"], shown["best_valid_loss"]) == (0, 1.0, 1.73276)
    assert shown["dataset"] == "Integrated_dataset_0" and shown["version"] == 1
    assert shown["promotion_reason"] == f"lowest homology_rank among 1 replicate of run(s) {runs[0]}"
    promoted = json.loads((params.parent / "runs" / "cortex" / "promotion.json").read_text())
    described = ("version", "run_id", "dataset", "replicate", "chosen_homology_rank", "best_valid_loss")
    assert {k: promoted[k] for k in described} == {k: shown[k] for k in described}, "one vocabulary in both"


def test_promote_keeps_a_better_champion_unless_ranked_on_other_inputs(params: Path, tracking_uri: str, tiny: TinyData):
    """`promote.require_better` (true in params.yaml): a worse training leaves `champion` where it is,
    and promotion.json says so; `--always` moves it; a training ranked on other transform sets, or whose
    ranks are of another checkpoint kind, is not compared, so it takes the alias even with worse figures."""
    client = MlflowClient(tracking_uri)

    def train_worse(*extra: str) -> str:
        run = train_cortex(params, *extra)
        for cand in candidates(client, [run], "cortex"):
            client.log_metric(cand.run_id, "chosen_homology_rank", 99.0)  # worse than any real rank here
        return run

    def promote(run: str, *extra: str) -> dict:
        cli_ok(["promote", "cortex", "--params", str(params), "--run-id", run, *extra])
        return json.loads((params.parent / "runs" / "cortex" / "promotion.json").read_text())

    good = train_cortex(params, "--seed", "1")
    held = promote(good)
    assert held["moved"] and held["run_id"] == held["candidate"]["run_id"]
    worse = train_worse("--seed", "2")
    kept = promote(worse)
    assert not kept["moved"] and "does not beat it" in kept["reason"], kept
    assert (kept["version"], kept["run_id"]) == (held["version"], held["run_id"])  # the champion, unchanged
    assert kept["candidate"]["chosen_homology_rank"] == 99.0 and kept["candidate"]["version"] != held["version"]
    assert int(client.get_model_version_by_alias("transdnn-cortex", "champion").version) == held["version"]
    always = promote(worse, "--always")
    assert always["moved"] and always["run_id"] == always["candidate"]["run_id"] != held["run_id"]

    promote(good, "--always")
    other = tiny.root / "Human_other.h5ad"
    human = ad.read_h5ad(tiny.human)
    human.X = human.X + 0.1
    human.write_h5ad(other)
    moved = promote(train_worse("--human", str(other)))
    assert moved["moved"] and moved["chosen_homology_rank"] == 99.0, moved
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
    cli_ok(["train", "cortex", "--params", str(params)])
    cli_ok(["train", "cortex", "--params", str(params), "--no-track"])
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
    cli_ok(["train", "subcortex", "--params", str(params)])
    record = params.parent / "runs" / "subcortex" / "train" / "Integrated_dataset_0" / "train.json"
    subcortex = json.loads(record.read_text())["run_id"]
    result = runner.invoke(app, ["promote", "cortex", "--params", str(params), "--run-id", subcortex])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: run {subcortex}: a training of partition 'subcortex' (expected one of 'cortex')"
    cli_ok(["embed", "subcortex", "--params", str(params)])
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


def test_promote_without_training_exits_2(params: Path, tracking_uri: str):
    result = runner.invoke(app, ["promote", "subcortex", "--params", str(params)])
    assert result.exit_code == 2 and "no finished training run" in result.stderr


@pytest.mark.slow
def test_two_promotes_at_once_leave_one_champion(params: Path, tracking_uri: str):
    """As `dvc queue start -j 2` runs them: each in its own workspace (one holds a copy of the other's
    outputs), both on one store."""
    import os
    import shutil
    import subprocess

    train_embed_cortex(params)
    raw = yaml.safe_load(params.read_text())
    out = params.parent / raw["cortex"]["out"]
    raw["cortex"]["out"] = str(shutil.copytree(out, out.with_name("cortex_copy")))
    copy = params.with_name("params_copy.yaml")
    copy.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            ["transdnn", "promote", "cortex", "--params", str(workspace)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for workspace in (params, copy)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions("name='transdnn-cortex'")
    assert len(versions) == 2, "each replicate is registered once"
    champions = [v for v in versions if "champion" in client.get_model_version("transdnn-cortex", v.version).aliases]
    assert len(champions) == 1


def _waits_for_flock(inode: int) -> bool:
    """Whether some process (or thread) is blocked on a flock of this file: /proc/locks lists waiters with `->`."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and any(f.count(":") == 2 and f.rsplit(":", 1)[1] == str(inode) for f in fields):
            return True
    return False


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="reads Linux's /proc/locks")
def test_a_promotion_waits_while_another_holds_the_local_store(params: Path, tracking_uri: str):
    """With `dvc queue start -j 2`, two promotions at once each compared with the same champion and the
    worse could move the alias last; a promotion now reads the champion only once it holds the store."""
    import threading

    from transdnn.registry import promote
    from transdnn.tracking import store_lock

    run_id = train_cortex(params)
    experiment_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    lock_file = Path(f"{tracking_uri.removeprefix('sqlite:///')}.promote.lock")
    done = []
    with store_lock("promote.lock"):  # another promotion, mid-way
        worker = threading.Thread(target=lambda: done.append(promote("cortex", experiment_id, "homology_rank", [run_id], True)))
        worker.start()
        deadline = time.monotonic() + 120
        while worker.is_alive() and not _waits_for_flock(lock_file.stat().st_ino) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.is_alive() and not done, "the promotion went ahead while another held the store"
    worker.join(120)
    assert done and done[0].moved and done[0].reason.startswith("lowest homology_rank")


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
        cli_ok(["registry", "show", "--params", str(params)]).strip()
        == "no registered champion yet: run `transdnn promote PARTITION`"
    )
    assert json.loads(cli_ok(["registry", "show", "cortex", "--params", str(params), "--json"])) == []
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


def test_promotion_reason_names_a_few_runs_and_counts_many():
    assert promotion_reason("homology_rank", 10, ["a1", "b2"]) == "lowest homology_rank among 10 replicates of run(s) a1, b2"
    many = promotion_reason("valid_loss", 1000, [f"{i:032x}" for i in range(100)])
    assert many == "lowest valid_loss among 1000 replicates of 100 training runs"


def test_a_replicate_without_trained_weights_in_its_chosen_checkpoint_is_not_trained(tracking_uri: str):
    """A replicate that diverged before its chosen checkpoint's first finite validation loss logged initial
    (or, for `last`, non-finite) weights as its model: its chosen rank is NaN. Runs of older transdnn ranked
    such initial weights; MLflow stores their infinite best validation loss as the largest float."""
    client = MlflowClient()
    experiment = client.create_experiment("diverged")
    found = []
    for rank, loss in ((2.0, float("inf")), (float("nan"), 0.5), (2.0, 0.5)):
        run = client.create_run(experiment, tags={"model_uri": "models:/m-0", "replicate": "0"})
        client.log_metric(run.info.run_id, "chosen_homology_rank", rank)
        client.log_metric(run.info.run_id, "best_valid_loss", loss)
        found.append(_candidate(client.get_run(run.info.run_id)))
    assert all(c is not None for c in found), "registry show still describes them"
    assert [c.trained for c in found if c is not None] == [False, False, True]
    assert (found[2].rank, found[2].valid_loss) == (2.0, 0.5)
