"""The CLI end to end on tiny real files, without tracking."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TinyData, cli_ok, make_tiny, train_cortex
from transdnn.checkpoints import RunLayout, load_model
from transdnn.cli import app

runner = CliRunner()


def test_train_then_embed_writes_the_reference_layout(params: Path, tmp_path: Path):
    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "12"])
    assert result.exit_code == 0, result.stderr
    assert "cortex/Integrated_dataset_0: 2 replicates" in result.stdout
    curves = pd.read_csv(tmp_path / "runs" / "cortex" / "curves.csv")
    assert curves["replicates"].iloc[0] == 2 and curves["epoch"].tolist() == list(range(len(curves)))
    started = time.perf_counter()
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    embed_wall = time.perf_counter() - started
    assert result.exit_code == 0, result.stderr
    root = tmp_path / "runs" / "cortex" / "embed" / "Integrated_dataset_0"
    embed_info = json.loads((root / "embed.json").read_text())
    assert 0 < embed_info["data_set_seconds"] < embed_wall, "the data set's own time, without the job's loading"
    assert 0 <= embed_info["track_seconds"] < embed_info["data_set_seconds"]
    human = pd.read_csv(root / "replicate_0" / "human_embedding.csv", index_col=0)
    mouse = pd.read_csv(root / "replicate_1" / "mouse_embedding.csv", index_col=0)
    assert human.shape == (6, 32) and mouse.shape == (5, 32)
    assert human.index.name == "region_id" and list(human.columns[:2]) == ["1", "2"]
    metrics = json.loads((root / "metrics.json").read_text())
    assert set(metrics["homology_rank"]) == {"0", "1"}
    for key in ("homology_rank_mean", "homology_rank_consensus", "raw_homology_rank"):
        assert key in metrics
    # the tiny world plants a perfect homology on half the genes: a trained model finds it
    assert metrics["homology_rank_consensus"] <= 1.5
    corr = pd.read_csv(root / "consensus_correlation.csv", index_col=0)
    assert corr.shape == (6, 5)
    # a one-set job's pooled answer is that set's
    pooled = json.loads((tmp_path / "runs" / "cortex" / "metrics.json").read_text())["all_data_sets"]
    assert (pooled["data_sets"], pooled["models"]) == (1, 2)
    assert pooled["homology_rank_consensus"] == metrics["homology_rank_consensus"]
    assert pd.read_csv(root.parent / "consensus_correlation.csv", index_col=0).equals(corr)
    assert not list((tmp_path / "runs").rglob("*.tmp")), "no temporary files may remain"
    train_info = json.loads((tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json").read_text())
    assert train_info["chosen_homology_rank"] == [metrics["homology_rank"][r] for r in ("0", "1")], (
        "training reports the ranks of the weights it stored"
    )
    epochs = sum(v for k, v in train_info["seconds"].items() if k != "epochs")
    after = train_info["after_training_seconds"]
    assert set(after) == {"save", "track"} and min(after.values()) > 0
    assert epochs + sum(after.values()) < train_info["data_set_seconds"], "the data set's wall time holds its parts"


def test_resume_keeps_the_data_sets_a_killed_job_had_finished(params: Path, tiny: TinyData, tmp_path: Path):
    """A multi-set job resumed after a kill (or with a data set added) trains only the unfinished data sets;
    other settings train them all."""
    shutil.copy(tiny.train, tiny.train.with_name("Integrated_dataset_1.h5ad"))
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_0.h5ad", "Integrated_dataset_1.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    train = tmp_path / "runs" / "cortex" / "train"
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    first = (train / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt").stat().st_mtime_ns
    # two copies of one file are two data sets: their replicates are seeded apart, as unseeded runs would be
    first_layer = [
        load_model(RunLayout(train.parent, f"Integrated_dataset_{k}"), "best_valid").state["weights.0"] for k in (0, 1)
    ]
    assert not torch.equal(*first_layer)
    (train / "Integrated_dataset_1" / "train.json").unlink()  # killed before the second set finished
    shutil.copy(tiny.train, tiny.train.with_name("Integrated_dataset_2.h5ad"))  # and a set is added
    raw["cortex"]["data"]["train"].append("Integrated_dataset_2.h5ad")
    params.write_text(yaml.safe_dump(raw))

    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.strip().splitlines()[-3:]
    assert "Integrated_dataset_0" in lines[0] and lines[0].endswith("(trained before; kept)")
    assert "Integrated_dataset_1" in lines[1] and "trained before" not in lines[1]
    assert "Integrated_dataset_2" in lines[2] and "trained before" not in lines[2]
    assert (train / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt").stat().st_mtime_ns == first
    assert (train / "Integrated_dataset_1" / "train.json").is_file()

    raw["cortex"]["train"]["learning_rate"] = 2e-3
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert result.exit_code == 0, result.stderr
    assert "trained before" not in result.stdout, "other settings: every data set is trained again"


def test_resume_trains_again_after_transdnn_code_changes(params: Path, tmp_path: Path, monkeypatch):
    """The DVC train stage reruns on a changed module; the data sets the old code trained are not kept."""
    from transdnn import jobs

    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    kept = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert kept.exit_code == 0 and "(trained before; kept)" in kept.stdout, kept.stderr
    monkeypatch.setattr(jobs, "code_digest", lambda: "another version of transdnn")
    again = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert again.exit_code == 0, again.stderr
    assert "cortex/Integrated_dataset_0: 2 replicates" in again.stdout and "trained before" not in again.stdout


def test_a_kept_data_set_needs_the_history_it_wrote(params: Path, tmp_path: Path):
    """The history is a DVC output apart from the training folder: one may be checked out, pulled or
    edited without the other. A history the training did not write, or none, trains the data set again."""
    history = tmp_path / "runs" / "cortex" / "history" / "Integrated_dataset_0"
    resume = ["train", "cortex", "--params", str(params), "--no-track", "--resume"]
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    (history / "replicate_1.csv").write_bytes((history / "replicate_0.csv").read_bytes())
    again = runner.invoke(app, resume)
    assert again.exit_code == 0 and "trained before" not in again.stdout, again.stderr
    assert "(trained before; kept)" in runner.invoke(app, resume).stdout
    (history / "replicate_1.csv").unlink()
    again = runner.invoke(app, resume)
    assert again.exit_code == 0 and "trained before" not in again.stdout, again.stderr
    assert (history / "replicate_1.csv").is_file()


def test_the_dvc_stage_removes_the_outputs_of_data_sets_no_longer_listed(params: Path, tiny: TinyData, tmp_path: Path):
    shutil.copy(tiny.train, tiny.train.with_name("Integrated_dataset_1.h5ad"))
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_0.h5ad", "Integrated_dataset_1.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    stage = ["train", "cortex", "--params", str(params), "--no-track", "--resume", "--stage", "train@cortex"]
    assert runner.invoke(app, stage).exit_code == 0
    out = tmp_path / "runs" / "cortex"
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_1.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    plain = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"])
    assert plain.exit_code == 0, plain.stderr
    assert (out / "train" / "Integrated_dataset_0").is_dir(), "outside DVC, another job's outputs are not touched"
    result = runner.invoke(app, stage)
    assert result.exit_code == 0 and "(trained before; kept)" in result.stdout, result.stderr
    for tree in ("train", "history"):
        assert sorted(p.name for p in (out / tree).iterdir()) == ["Integrated_dataset_1"], tree


def test_a_new_training_leaves_no_file_of_an_older_one(params: Path, tmp_path: Path):
    """The DVC stage keeps its folders between runs: fewer replicates or checkpoint kinds must not leave
    the older training's files to be plotted or embedded."""
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["train"].update(replicates=3, extra_checkpoints=["best_rank"])
    params.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    raw["cortex"]["train"].update(replicates=2, extra_checkpoints=[])
    params.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--resume"]).exit_code == 0
    out = tmp_path / "runs" / "cortex"
    history = sorted(p.name for p in (out / "history" / "Integrated_dataset_0").iterdir())
    assert history == ["replicate_0.csv", "replicate_1.csv"]
    checkpoints = sorted(p.name for p in (out / "train" / "Integrated_dataset_0" / "checkpoints").iterdir())
    assert checkpoints == ["best_valid.pt", "model.json"]


def test_checkpoints_are_float16_unless_asked_otherwise_float32_or_int8(params: Path, tmp_path: Path):
    ckpt = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "checkpoints"
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    half = torch.load(ckpt / "best_valid.pt", weights_only=True)
    assert sorted(p.name for p in ckpt.glob("*.pt")) == ["best_valid.pt"]
    assert half["state.weights.0"].dtype == torch.float16 and half["scaler_mean"].dtype == torch.float32
    params.write_text(params.read_text().replace("checkpoint_dtype: float16", "checkpoint_dtype: float32"))
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    full = torch.load(ckpt / "best_valid.pt", weights_only=True)
    assert full["state.weights.0"].dtype == torch.float32
    assert torch.equal(full["state.weights.0"].half(), half["state.weights.0"]), "the same training, rounded once"
    cli_ok(["train", "cortex", "--params", str(params), "--no-track", "--checkpoint-dtype", "int8"])
    small = load_model(RunLayout(tmp_path / "runs" / "cortex", "Integrated_dataset_0"), "best_valid")
    assert small.state["weights.0"].dtype == torch.int8
    step = small.scales["weights.0"]
    assert (small.weights()["weights.0"] - full["state.weights.0"]).abs().le(step / 2 + 1e-7).all(), "the same training, in int8"
    cli_ok(["embed", "cortex", "--params", str(params), "--no-track"])


def test_embed_checkpoint_choice_changes_weights(params: Path, tmp_path: Path):
    params.write_text(params.read_text().replace("extra_checkpoints: []", "extra_checkpoints: [best_rank, last]"))
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    for kind in ("best_valid", "best_rank", "last"):
        result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track", "--checkpoint", kind])
        assert result.exit_code == 0, result.stderr
        metrics = json.loads((tmp_path / "runs" / "cortex" / "metrics.json").read_text())["data_sets"]["Integrated_dataset_0"]
        assert metrics["checkpoint"] == kind


def test_independent_test_writes_predictions_and_confusion(params: Path, tmp_path: Path):
    """Predictions and a row-normalised confusion matrix per replicate, and no report of an earlier test
    beside them: of a replicate or a data set the training no longer has."""
    held_out = make_tiny(tmp_path / "heldout", seed=1, other=0, samples=1)  # never split: one sample per region will do
    reports = tmp_path / "runs" / "subcortex" / "independent_test" / "report"
    for stale in (reports / "Integrated_dataset_0" / "replicate_7", reports / "Integrated_dataset_5" / "replicate_0"):
        stale.mkdir(parents=True)
    result = runner.invoke(
        app, ["test", "subcortex", "--params", str(params), "--test", str(held_out.train), "--max-epochs", "25"]
    )
    assert result.exit_code == 0, result.stderr
    folder = reports / "Integrated_dataset_0"
    assert [p.name for p in reports.iterdir()] == ["Integrated_dataset_0"]
    assert sorted(p.name for p in folder.glob("replicate_*")) == ["replicate_0", "replicate_1"]
    conf = pd.read_csv(folder / "replicate_0" / "confusion_matrix.csv", index_col=0)
    assert conf.shape == (6, 6)
    assert conf.sum(axis=1).round(6).eq(1).all()
    report = json.loads((folder / "test_metrics.json").read_text())
    assert report["accuracy_mean"] > 0.9


def test_independent_test_holds_its_folder_until_the_report_is_written(
    params: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The report is written after the training inside the test: the folder stays held until then, so a
    second test there cannot clear the checkpoints the first one is reading."""
    from transdnn import evaluate

    lock = tmp_path / "runs" / "subcortex" / "independent_test" / ".transdnn.lock"
    holders = []

    def tested_while_held(*args: Any, **kwargs: Any) -> Any:
        with open(lock) as probe:
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                holders.append(None)
            except BlockingIOError:
                holders.append(probe.read().strip())
        return independent_test(*args, **kwargs)

    independent_test = evaluate.independent_test
    monkeypatch.setattr(evaluate, "independent_test", tested_while_held)
    held_out = make_tiny(tmp_path / "heldout", seed=1, other=0, samples=1)
    result = runner.invoke(
        app, ["test", "subcortex", "--params", str(params), "--test", str(held_out.train), "--max-epochs", "2"]
    )
    assert result.exit_code == 0, result.stderr
    assert holders == [f"`transdnn test subcortex` (pid {os.getpid()})"]


def test_independent_test_refuses_a_wrong_test_set_before_training(params: Path, tiny: TinyData, tmp_path: Path):
    import anndata as ad

    held_out = make_tiny(tmp_path / "heldout", seed=1, other=0)
    a = ad.read_h5ad(held_out.train)
    a.obs["region_index"] = a.obs["region_index"].str.replace("hA_", "hZ_")
    a.write_h5ad(held_out.train)
    copy = shutil.copy(tiny.train, tmp_path / "copy_of_the_training_set.h5ad")
    for test_file, expected in (
        (held_out.train, "['hZ'] were not trained on"),
        (tmp_path / "nope.h5ad", "file not found"),
        (copy, f"the same data as training set {tiny.train} (expected a held-out set)"),
    ):
        result = runner.invoke(app, ["test", "subcortex", "--params", str(params), "--test", str(test_file)])
        assert result.exit_code == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and str(test_file) in lines[0] and expected in lines[0], result.stderr
        assert not (tmp_path / "runs" / "subcortex" / "independent_test").exists(), "refused before any training"


def test_embed_matches_genes_to_the_model_by_name(params: Path, tiny: TinyData, tmp_path: Path):
    """A gene list reordered since the training embeds as before; one that lost a trained gene is
    refused: neither is fed to the wrong weights."""
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "2"]).exit_code == 0
    human = tmp_path / "runs" / "cortex" / "embed" / "Integrated_dataset_0" / "replicate_0" / "human_embedding.csv"

    def embedded() -> pd.DataFrame:
        result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
        assert result.exit_code == 0, result.stderr
        return pd.read_csv(human, index_col=0)

    before = embedded()
    genes = pd.read_csv(tiny.genes)["genes"].tolist()
    pd.DataFrame({"genes": genes[::-1]}).to_csv(tiny.genes, index=False)
    pd.testing.assert_frame_equal(embedded(), before, atol=1e-6)

    pd.DataFrame({"genes": genes[1:]}).to_csv(tiny.genes, index=False)
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: {tiny.genes}: column 'genes' lacks 1 of the 40 genes the model was trained on: {genes[0]!r} "
        "(expected the training's gene list)"
    )


def test_synth_is_deterministic_by_seed(tmp_path: Path, params: Path):
    import anndata as ad

    args = ["synth", "--params", str(params), "--samples-per-region", "2", "--cells-per-sample", "1"]
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "a")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "b")]).exit_code == 0
    a = ad.read_h5ad(tmp_path / "a" / "subcortex" / "integrated" / "Integrated_dataset_0.h5ad")
    b = ad.read_h5ad(tmp_path / "b" / "subcortex" / "integrated" / "Integrated_dataset_0.h5ad")
    assert (a.X == b.X).all()
    assert a.obs.region_index.str.startswith("other_").any()
    homo = pd.read_csv(tmp_path / "a" / "cortex" / "homo_cortex.csv", index_col=0)
    assert len(homo) == 41 and list(homo.columns) == ["human_region", "mouse_region"]
    genes = pd.read_csv(tmp_path / "a" / "subcortex" / "common_stable_genes_subcortex.csv")
    assert len(genes) == 5063


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [("--samples-per-region", "1", "greater than or equal to 2"), ("--cells-per-sample", "0", "greater than 0")],
)
def test_a_synth_option_out_of_bounds_is_named_in_one_line(tmp_path: Path, params: Path, option: str, value: str, expected: str):
    result = runner.invoke(app, ["synth", "--params", str(params), "--out", str(tmp_path / "s"), option, value])
    field = option.removeprefix("--").replace("-", "_")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: option '{field}': Input should be {expected} (got {value})"
    assert not (tmp_path / "s").exists()


def test_the_progress_bar_fills_when_the_job_finishes_and_stays_where_a_failed_one_stopped():
    """Replicates that stop early leave replicate-epochs that never run; a finished job still ends at 100 %."""
    from transdnn.cli import _Progress

    for finished, expected in ((True, 10), (False, 3)):
        progress = _Progress(10, "replicate-epochs")
        progress.on_epoch(1, pd.DataFrame({"replicate": [0, 1, 2]}))
        progress.close(finished=finished)
        assert progress.bar.pos == expected


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    for cmd in ("synth", "validate", "train", "embed", "test", "promote", "registry"):
        assert cmd in result.stdout


def _literal_values(annotation: Any) -> set[str]:
    """The values of the Literal inside an option's annotation (through Annotated and `| None`)."""
    if get_origin(annotation) is Literal:
        return set(get_args(annotation))
    return {v for arg in get_args(annotation) for v in _literal_values(arg)}


def test_the_cli_offers_exactly_the_values_params_yaml_accepts():
    """Each closed set is spelled once (transdnn.choices): a command offers what the settings validate,
    and refuses anything else before it reads a file."""
    from transdnn import cli
    from transdnn.settings import EmbedSettings, PartitionSettings, Settings, TrainSettings

    def offered(command: Callable[..., None], name: str) -> set[str]:
        return _literal_values(get_type_hints(command, include_extras=True)[name])

    partitions = {name for name, field in Settings.model_fields.items() if field.annotation is PartitionSettings}
    for command in (cli.validate, cli.train_cmd, cli.embed, cli.test_cmd, cli.promote, cli.registry_show):
        assert offered(command, "partition") == partitions, command.__name__
    assert offered(cli.train_cmd, "precision") == _literal_values(TrainSettings.model_fields["precision"].annotation)
    dtypes = _literal_values(TrainSettings.model_fields["checkpoint_dtype"].annotation)
    assert offered(cli.train_cmd, "checkpoint_dtype") == dtypes == {"float32", "float16", "int8"}
    assert offered(cli.embed, "checkpoint") == _literal_values(EmbedSettings.model_fields["checkpoint"].annotation)
    for args in (
        ["train", "cortx"],
        ["train", "cortex", "--precision", "fp16"],
        ["train", "cortex", "--checkpoint-dtype", "int4"],
        ["embed", "cortex", "--checkpoint", "best"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "is not one of" in result.stderr, args


def test_version_names_transdnn_and_the_libraries_it_runs_on():
    from importlib.metadata import version

    import transdnn

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    line = result.stdout.strip()
    assert line.startswith(f"transdnn {transdnn.__version__} (Python 3.")
    assert f"torch {torch.__version__}" in line and f"mlflow {version('mlflow')}" in line


def test_validate_loads_neither_torch_nor_mlflow(params: Path):
    """Checking inputs is a data-contract matter: it should not pay ~3 s for torch, MLflow and the loop."""
    code = (
        "import sys\nfrom transdnn.cli import app\n"
        f"app(['validate', 'cortex', '--params', {str(params)!r}], standalone_mode=False)\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'transdnn.training') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Integrated_dataset_0.h5ad: rows" in out and out.strip().splitlines()[-1] == "[]", out


def test_a_tilde_in_an_option_is_the_home_folder_as_the_shell_would_make_it(params: Path, tmp_path: Path, monkeypatch):
    """`--out=~/x` reaches the program unexpanded (the shell expands only `--out ~/x`)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    shutil.copy(params, home / "params.yaml")
    monkeypatch.chdir(cwd)
    args = ["train", "cortex", "--params=~/params.yaml", "--out=~/elsewhere", "--no-track", "--max-epochs", "1"]
    result = runner.invoke(app, args, env={"HOME": str(home)})
    assert result.exit_code == 0, result.stderr
    assert (home / "elsewhere" / "train" / "Integrated_dataset_0" / "train.json").is_file()
    assert not (cwd / "~").exists(), "no folder named '~' may appear"


def test_running_out_of_memory_is_one_line_naming_the_data_set(params: Path, tiny: TinyData, tmp_path: Path):
    """A model the machine cannot hold (here: two 40,000-unit layers under a 6 GiB address-space limit, a
    real allocation failure) fails in one line with exit 2, not a traceback, and writes no checkpoint."""
    import resource

    settings = yaml.safe_load(params.read_text())
    settings["cortex"]["model"]["hidden_units"] = [32, 40000, 40000]
    params.write_text(yaml.safe_dump(settings))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))

    cmd = [
        sys.executable,
        "-c",
        "from transdnn.cli import main; main()",
        "train",
        "cortex",
        "--params",
        str(params),
        "--no-track",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {tiny.train}: out of memory on cpu (an allocation of 11.92 GiB failed); expected"), line
    assert not list((tmp_path / "runs").rglob("*.pt")) and not list((tmp_path / "runs").rglob("*.tmp"))


def test_one_job_at_a_time_writes_a_partitions_outputs(params: Path, tmp_path: Path):
    """A second train or embed into an output folder a job holds (a manual one beside `dvc repro`) is one
    line and changes nothing; a holder killed with SIGKILL holds nothing (the kernel's lock)."""
    out = tmp_path / "runs" / "cortex"
    train = ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1"]
    assert runner.invoke(app, train).exit_code == 0

    def files() -> dict[str, int]:
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.name != ".transdnn.lock"}

    before = files()
    holder = (
        "import time\nfrom pathlib import Path\nfrom transdnn.atomic import output_folder\n"
        f"with output_folder(Path({str(out)!r}), 'train cortex'):\n    print('held', flush=True)\n    time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        for command in (train, ["embed", "cortex", "--params", str(params), "--no-track"]):
            result = runner.invoke(app, command)
            assert result.exit_code == 2, result.output
            assert result.stderr.strip() == (
                f"error: {out}: in use by `transdnn train cortex` (pid {proc.pid}); expected one transdnn job per output "
                "folder at a time (wait for it to end, or give this one another `out` or --out)"
            )
        assert files() == before, "the refused jobs changed nothing"
    finally:
        proc.kill()
        proc.wait()
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 0, result.stderr


def test_embed_finds_a_checkpoint_unlike_its_description_before_it_writes_the_first_set(
    params: Path, tiny: TinyData, tmp_path: Path
):
    """An edited model.json of the second data set stops `embed` before the first set's embeddings are written."""
    shutil.copy(tiny.train, tiny.train.with_name("Integrated_dataset_1.h5ad"))
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_0.h5ad", "Integrated_dataset_1.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1"]).exit_code == 0
    second = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_1" / "checkpoints"
    meta = json.loads((second / "model.json").read_text())
    (second / "model.json").write_text(json.dumps({**meta, "regions": meta["regions"][:-1]}))
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {second / 'best_valid.pt'}: 'biases.3' has shape"), result.stderr
    assert not (tmp_path / "runs" / "cortex" / "embed").exists()


def test_embed_finds_a_missing_checkpoint_before_it_writes_the_first_set(params: Path, tiny: TinyData, tmp_path: Path):
    """A data set listed since the training (not trained yet) stops `embed` before any set's embeddings are
    written, not after the sets before it: no half-embedded job."""
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1"]).exit_code == 0
    shutil.copy(tiny.train, tiny.train.with_name("Integrated_dataset_1.h5ad"))
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["data"]["train"] = ["Integrated_dataset_0.h5ad", "Integrated_dataset_1.h5ad"]
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 2
    assert "Integrated_dataset_1/checkpoints/best_valid.pt: checkpoint 'best_valid' was never written" in result.stderr
    assert not (tmp_path / "runs" / "cortex" / "embed").exists()


@pytest.mark.parametrize("damage", [b'{"genes": [', b"\xff\xfe", b"[1, 2]", b"", b"best_valid_loss\nlow\n"])
def test_a_damaged_record_is_named_in_one_line_before_embed_writes(
    params: Path, tmp_path: Path, tracking_uri: str, damage: bytes
):
    """model.json, train.json and the summary are plain files anyone can edit: a damaged one stops `embed`
    and `promote` with exit 2 and its path, before anything is written, and `train --resume` trains its
    data set again."""
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1"]).exit_code == 0
    trained = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0"
    for record in (trained / "checkpoints" / "model.json", trained / "train.json", trained / "train_summary.csv"):
        kept = record.read_bytes()
        record.write_bytes(damage)
        result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert message.startswith(f"error: {record}: ") and "\n" not in message and "Traceback" not in result.output
        assert not (tmp_path / "runs" / "cortex" / "embed").exists()
        record.write_bytes(kept)
    (trained / "train_summary.csv").write_bytes(damage)
    (trained / "train.json").write_bytes(damage)
    promoted = runner.invoke(app, ["promote", "cortex", "--params", str(params)])
    assert promoted.exit_code == 2 and promoted.stderr.startswith(f"error: {trained / 'train.json'}: "), promoted.output
    again = runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track", "--max-epochs", "1", "--resume"])
    assert again.exit_code == 0, again.output
    assert "trained before" not in again.stdout and json.loads((trained / "train.json").read_text())["epochs_run"] == [1, 1]


def test_a_diverged_training_warns_and_is_not_promoted(params: Path, tracking_uri: str):
    """A learning rate far too large makes every loss NaN from the first epoch: the training still ends (its
    outputs record what happened), warns in one line per data set, and promote refuses its replicates,
    whose models hold their initial weights."""
    raw = yaml.safe_load(params.read_text())
    raw["cortex"]["train"]["learning_rate"] = 1e12
    params.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "cortex", "--params", str(params), "--max-epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "warning: cortex/Integrated_dataset_0: replicates 0, 1 diverged" in result.stderr
    assert "best valid loss none (no trained replicate), homology rank none (no trained replicate)" in result.stdout
    promoted = runner.invoke(app, ["promote", "cortex", "--params", str(params)])
    assert promoted.exit_code == 2 and "no replicate with a logged model and trained weights" in promoted.stderr
    embedded = runner.invoke(app, ["embed", "cortex", "--params", str(params)])
    assert embedded.exit_code == 2 and "best_valid.pt: no replicate has weights from an epoch with a finite" in embedded.stderr
    assert not (params.parent / "runs" / "cortex" / "embed").exists(), "nothing is written"


def test_embed_leaves_out_a_replicate_without_trained_weights_and_the_files_of_older_embeddings(params: Path, tmp_path: Path):
    """A replicate that diverged before its first finite validation loss holds its initial weights (epoch
    -1 in its checkpoint): embed leaves it out of the files, the ranks and the consensus, and says so. Files
    an earlier embedding wrote for it, and for a data set no longer listed, go: they are of another model."""
    train_cortex(params, "--no-track", "--replicates", "3", "--max-epochs", "2")
    cli_ok(["embed", "cortex", "--params", str(params), "--no-track"])
    root = tmp_path / "runs" / "cortex" / "embed"
    (root / "Integrated_dataset_9" / "replicate_0").mkdir(parents=True)
    layout = RunLayout(tmp_path / "runs" / "cortex", "Integrated_dataset_0")
    tensors = torch.load(layout.checkpoint("best_valid"), weights_only=True)
    tensors["epochs"][1] = -1
    torch.save(tensors, layout.checkpoint("best_valid"))
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 0, result.stderr
    assert "warning: cortex/Integrated_dataset_0: 1 replicate left out of the embeddings and the consensus" in result.stderr
    data_set = root / "Integrated_dataset_0"
    assert sorted(p.name for p in data_set.glob("replicate_*")) == ["replicate_0", "replicate_2"]
    assert not (root / "Integrated_dataset_9").exists()
    metrics = json.loads((data_set / "metrics.json").read_text())
    assert set(metrics["homology_rank"]) == {"0", "2"} and metrics["replicates_left_out"] == 1
    kept = [pd.read_csv(data_set / f"replicate_{r}" / "correlation.csv", index_col=0) for r in (0, 2)]
    consensus = pd.read_csv(data_set / "consensus_correlation.csv", index_col=0)
    assert np.allclose(consensus.to_numpy(), (kept[0].to_numpy() + kept[1].to_numpy()) / 2)
    pooled = json.loads((tmp_path / "runs" / "cortex" / "metrics.json").read_text())["all_data_sets"]
    assert (pooled["models"], pooled["replicates_left_out"]) == (2, 1)
