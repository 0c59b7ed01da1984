"""Kill and resume, Ctrl-C, and refusing pickled payloads: real subprocesses, real files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TinyData, make_tiny, tiny_params
from transdnn.cli import app

pytestmark = pytest.mark.slow
LONG = {"max_epochs": 150, "patience": 1000, "learning_rate": 1e-4, "extra_checkpoints": ["best_rank", "last"]}


def _params(tmp_path: Path, name: str) -> Path:
    tiny: TinyData = make_tiny(tmp_path / "data", n_genes=300, samples=5, cells=40)
    raw = tiny_params(tmp_path / f"{name}.yaml", tiny, tmp_path / name, **LONG)
    text = raw.read_text().replace("- 32\n  - 32\n  - 32", "- 256\n  - 256\n  - 256")
    raw.write_text(text)
    return raw


def _start(params: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.Popen(
        ["transdnn", "train", "cortex", "--params", str(params), *extra],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline
        time.sleep(0.05)


def _checkpoint(root: Path, kind: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "cortex" / "train" / "Integrated_dataset_0" / "checkpoints" / f"{kind}.pt", weights_only=True)


def test_sigkill_mid_training_then_resume_gives_identical_weights(tmp_path: Path, tracking_uri: str):
    reference = _params(tmp_path, "straight")
    proc = _start(reference, "--no-track")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    params = _params(tmp_path, "killed")
    state = tmp_path / "killed" / "cortex" / "train" / "Integrated_dataset_0" / "state.current"
    proc = _start(params)
    _wait_for(state, proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    root = tmp_path / "killed" / "cortex" / "train" / "Integrated_dataset_0"
    assert not (root / "train.json").exists()
    run_id = json.loads((root / "run.json").read_text())["run_id"]

    proc = _start(params, "--resume")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    for kind in ("best_valid", "best_rank", "last"):
        a, b = _checkpoint(tmp_path / "straight", kind), _checkpoint(tmp_path / "killed", kind)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (kind, key)
    assert json.loads((root / "train.json").read_text())["run_id"] == run_id, "resume continues the same MLflow run"
    assert not list(root.glob("state*")), "the finished run leaves no resume state"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    kids = client.search_runs([client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    for kid in kids:
        steps = {m.step for m in client.get_metric_history(kid.info.run_id, "valid_loss")}
        assert steps == set(range(int(kid.data.metrics["epochs_run"])))


def test_ctrl_c_stops_cleanly(tmp_path: Path, tracking_uri: str):
    params = _params(tmp_path, "interrupted")
    root = tmp_path / "interrupted" / "cortex" / "train" / "Integrated_dataset_0"
    proc = _start(params)
    _wait_for(root / "state.current", proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "error: interrupted"
    run_id = json.loads((root / "run.json").read_text())["run_id"]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"
    assert (root / "state.current").exists(), "the last complete epoch is kept"
    assert not list((tmp_path / "interrupted").rglob("*.tmp")), "nothing half-written remains"

    proc = _start(params, "--resume", "--max-epochs", "2")  # other settings: the state is not theirs
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "state was of other settings, files or code: trained afresh" in out
    info = json.loads((root / "train.json").read_text())
    assert info["epochs_run"] == [2, 2] and info["run_id"] != run_id, "a new training in a new run"
    assert MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED", "the killed run stays as it ended"


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/transdnn-pwned",))


def test_pickled_payload_in_a_checkpoint_is_refused(tmp_path: Path, params: Path):
    runner = CliRunner()
    assert runner.invoke(app, ["train", "cortex", "--params", str(params), "--no-track"]).exit_code == 0
    ckpt = tmp_path / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "checkpoints" / "best_valid.pt"
    marker = Path("/tmp/transdnn-pwned")
    marker.unlink(missing_ok=True)
    torch.save({"evil": _Payload()}, ckpt, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    result = runner.invoke(app, ["embed", "cortex", "--params", str(params), "--no-track"])
    assert result.exit_code == 2
    assert "refused to load checkpoint" in result.stderr and "best_valid.pt" in result.stderr
    assert not marker.exists(), "the payload must never run"
