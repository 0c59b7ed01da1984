"""Shared fixtures: a tiny real-layout data set (another generator than `transdnn synth`), a tiny
params.yaml derived from the project's own, and a hermetic MLflow SQLite store per test."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
STORE_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")  # where MLflow clients look for a store
HUMAN = ["hA", "hB", "hC", "hD", "hE", "hF"]
MOUSE = ["mA", "mB", "mC", "mD", "mE"]
PAIRS = [("hA", "mA"), ("hB", "mB"), ("hC", "mC"), ("hD", "mD"), ("hA", "mE")]


def free_port() -> int:
    """A loopback port nothing listens on (for a server to start on, or for a store that never answers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path | None = None, timeout: float = 120.0) -> None:
    """Until an `mlflow server` at `url` answers its health check; fails the test (with its log's tail) if
    the process exits or `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            pytest.fail("mlflow server did not start" + (f":\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(0.5)


def write_h5ad(path: Path, X: np.ndarray, ids: list[str], genes: list[str], sparse: bool = False) -> Path:
    import scipy.sparse as sp

    path.parent.mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(
        X=sp.csr_matrix(X) if sparse else X,
        obs=pd.DataFrame({"region_index": ids}, index=[str(i) for i in range(len(ids))]),
        var=pd.DataFrame({"Gene": genes}, index=[f"v{i}" for i in range(len(genes))]),
    )
    adata.write_h5ad(path)
    return path


@dataclass
class TinyData:
    root: Path
    train: Path
    human: Path
    mouse: Path
    genes: Path
    homology: Path
    gene_names: list[str]


def make_tiny(
    root: Path, seed: int = 1, n_genes: int = 40, samples: int = 4, cells: int = 12, other: int = 5, sparse: bool = False
) -> TinyData:
    """Regions with a conserved signature on half the genes; mouse regions copy their human homologs."""
    rng = np.random.default_rng(seed)
    genes = [f"gene{i}" for i in range(n_genes)]
    sig = {h: rng.normal(size=n_genes) * (np.arange(n_genes) < n_genes // 2) * 2 for h in HUMAN}
    rows, ids = [], []
    for h in HUMAN:
        for s in range(samples):
            base = sig[h] + 0.3 * rng.normal(size=n_genes)
            for c in range(cells):
                rows.append(base + rng.normal(size=n_genes))
                ids.append(f"{h}_sample{s}_{c}")
    for i in range(other):
        rows.append(rng.normal(size=n_genes))
        ids.append(f"other_sample0_{i}")
    msig = {m: sig[h] for h, m in PAIRS if m != "mE"}
    msig["mE"] = rng.normal(size=n_genes)
    human_rows = [sig[h] + 0.5 * rng.normal(size=n_genes) for h in HUMAN for _ in range(3)]
    mouse_rows = [msig[m] + 0.5 * rng.normal(size=n_genes) for m in MOUSE for _ in range(3)]
    data = TinyData(
        root=root,
        train=write_h5ad(root / "integrated" / "Integrated_dataset_0.h5ad", np.array(rows, dtype=np.float32), ids, genes, sparse),
        human=write_h5ad(
            root / "Human_trans_data_tiny.h5ad",
            np.array(human_rows, dtype=np.float32),
            [f"{h}_{k}" for h in HUMAN for k in range(3)],
            genes,
        ),
        mouse=write_h5ad(
            root / "Mouse_trans_data_tiny.h5ad",
            np.array(mouse_rows, dtype=np.float32),
            [f"{m}_{k}" for m in MOUSE for k in range(3)],
            genes,
        ),
        genes=root / "genes.csv",
        homology=root / "homo.csv",
        gene_names=genes,
    )
    pd.DataFrame({"genes": list(reversed(genes))}).to_csv(data.genes, index=False)
    pd.DataFrame({"human_region": [h for h, _ in PAIRS], "mouse_region": [m for _, m in PAIRS]}).to_csv(data.homology)
    return data


def tiny_params(path: Path, data: TinyData, out: Path, **train: object) -> Path:
    """The project's params.yaml with both partitions pointed at tiny data and tiny, fast settings."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"]["out"] = str(path.parent / "synth")
    for name in ("cortex", "subcortex"):
        part = params[name]
        part["data"] = {
            "train_dir": str(data.train.parent),
            "train": [data.train.name],
            "human": str(data.human),
            "mouse": str(data.mouse),
            "genes": str(data.genes),
            "homology": str(data.homology),
        }
        part["model"]["hidden_units"] = [32, 32, 32]
        part["train"].update(
            {
                "replicates": 2,
                "max_epochs": 3,
                "batch_size": 32,
                "learning_rate": 1e-3,
                "device": "cpu",
                "state_every_s": 0,
                **train,
            }
        )
        part["out"] = str(out / name)
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def tiny(tmp_path: Path) -> TinyData:
    return make_tiny(tmp_path / "data")


@pytest.fixture
def params(tmp_path: Path, tiny: TinyData) -> Path:
    return tiny_params(tmp_path / "params.yaml", tiny, tmp_path / "runs")


@pytest.fixture(autouse=True)
def _no_outside_store(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test reaches the store the developer's shell names (MLFLOW_TRACKING_URI may be a shared server),
    and no test's store outlives it: MLflow's `set_tracking_uri` also sets that variable, for the process."""
    for name in STORE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    yield
    if (mlflow := sys.modules.get("mlflow")) is not None:
        mlflow.set_tracking_uri(None)  # the global, and the variable with it
        mlflow.set_registry_uri(None)


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite store per session; each test gets a copy (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def tracking_uri(tmp_path: Path, store_template: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    db = tmp_path / "mlflow.db"
    shutil.copy(store_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    return uri


def cli_ok(args: list[str]) -> str:
    """Run a transdnn command in this process; its stdout, once its exit status is 0."""
    from typer.testing import CliRunner

    from transdnn.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr + result.stdout
    return result.stdout


def train_cortex(params: Path, *extra: str) -> str:
    """`transdnn train cortex` with these params; the training run's id."""
    cli_ok(["train", "cortex", "--params", str(params), *extra])
    return json.loads((params.parent / "runs" / "cortex" / "train" / "Integrated_dataset_0" / "train.json").read_text())["run_id"]


def train_embed_cortex(params: Path, *extra: str) -> str:
    """`transdnn train cortex`, then `transdnn embed cortex`; the training run's id."""
    run_id = train_cortex(params, *extra)
    cli_ok(["embed", "cortex", "--params", str(params)])
    return run_id
