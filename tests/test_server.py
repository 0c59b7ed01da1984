"""The documented team setup for real: a throwaway PostgreSQL 15 cluster on 127.0.0.1 and
deploy/mlflow_server.sh (basic auth, served artifacts) in front of it."""

from __future__ import annotations

import configparser
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, TinyData, free_port, make_tiny, tiny_params, wait_for_server

pytestmark = [pytest.mark.server, pytest.mark.slow]
PG_BIN = Path("/usr/lib/postgresql/15/bin")


class Server(dict[str, str]):
    """The clients' environment for the server, and the process group the script and its children run in."""

    pgid: int


def _process_group(pgid: int) -> list[tuple[str, dict[str, str]]]:
    """Command line and environment of each process in a process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) != pgid:
                continue
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (stat.parent / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        found.append((command, dict(e.split("=", 1) for e in environ if "=" in e)))
    return found


def _as_postgres(args: list[str]) -> list[str]:
    """Clusters refuse to run as root: run their commands as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL 15 is not installed: .ci/run installs postgresql-15")
        pytest.skip("PostgreSQL 15 not installed (apt-get install postgresql-15)")
    data = Path(tempfile.mkdtemp(prefix="transdnn-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(
        _as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"]), check=True, capture_output=True
    )
    opts = f"-h 127.0.0.1 -p {port} -k {data}"
    subprocess.run(
        _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(data / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        for db in ("mlflow", "mlflow_auth"):
            subprocess.run(
                _as_postgres([str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db]), check=True
            )
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """deploy/mlflow_server.sh on a free loopback port; the admin password is rotated before use."""
    port = free_port()
    first, final = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    env = {
        **os.environ,
        "TRANSDNN_BACKEND_URI": f"{postgres}/mlflow",
        "TRANSDNN_AUTH_DB_URI": f"{postgres}/mlflow_auth",
        "TRANSDNN_ARTIFACTS": str(tmp_path_factory.mktemp("served-artifacts")),
        "TRANSDNN_PORT": str(port),
        "MLFLOW_AUTH_ADMIN_PASSWORD": first,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(24),
        "PYTHONWARNINGS": "ignore",
    }
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(key, None)
    log = tmp_path_factory.mktemp("server-log") / "server.log"
    proc = subprocess.Popen(
        ["bash", str(REPO / "deploy" / "mlflow_server.sh")],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc, log)
        from mlflow.server.auth.client import AuthServiceClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", first
        AuthServiceClient(url).update_user_password("admin", final, current_password=first)
        clients = Server(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=final)
        clients.pgid = proc.pid  # start_new_session: the script leads its own group
        yield clients
    finally:
        os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
        os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    full = {**os.environ, **env, "PYTHONWARNINGS": "ignore"}
    full.pop("MLFLOW_REGISTRY_URI", None)
    return subprocess.Popen(["transdnn", *args], env=full, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ok(args: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = _cli(args, env, cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"transdnn {' '.join(args)}\n{out}\n{err}"
    return out


def test_server_rejects_requests_without_credentials(server: Server):
    request = urllib.request.Request(f"{server['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    assert err.value.code == 401


def test_workers_trust_checked_passwords_and_no_job_consumers_run(server: Server):
    """Basic auth checks each request's password against its scrypt hash unless the worker caches it,
    and MLflow's job runner starts consumer processes that slow every request: a 10-replicate training
    took 221 s against this script without the cache and with the runner, 38 s with both fixed."""
    processes = _process_group(server.pgid)
    commands = [command for command, _ in processes]
    assert any("mlflow server" in command for command in commands), commands
    assert not [command for command in commands if "huey" in command]
    configs = {env["MLFLOW_AUTH_CONFIG_PATH"] for _, env in processes if "MLFLOW_AUTH_CONFIG_PATH" in env}
    assert configs, commands
    for path in configs:
        config = configparser.ConfigParser()
        config.read(path)
        assert config.getint("mlflow", "auth_cache_ttl_seconds") == 60


def test_wrong_password_is_one_line_and_exit_2(server: Server, tmp_path: Path):
    tiny: TinyData = make_tiny(tmp_path / "data")
    params = tiny_params(tmp_path / "params.yaml", tiny, tmp_path / "runs")
    proc = _cli(["train", "cortex", "--params", str(params)], {**server, "MLFLOW_TRACKING_PASSWORD": "wrong"}, tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and server["MLFLOW_TRACKING_URI"] in lines[0] and "401" in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_train_promote_show_load_embed_against_the_server(server: Server, tmp_path: Path):
    tiny: TinyData = make_tiny(tmp_path / "data")
    params = tiny_params(tmp_path / "params.yaml", tiny, tmp_path / "runs")
    _ok(["train", "cortex", "--params", str(params)], server, tmp_path)
    _ok(["embed", "cortex", "--params", str(params)], server, tmp_path)
    _ok(["promote", "cortex", "--params", str(params)], server, tmp_path)
    shown = json.loads(_ok(["registry", "show", "cortex", "--params", str(params), "--json"], server, tmp_path))
    assert shown[0]["uri"] == "models:/transdnn-cortex@champion"
    _ok(["embed", "cortex", "--params", str(params), "--model", "models:/transdnn-cortex@champion"], server, tmp_path)
    replicate = shown[0]["replicate"]
    via_registry = (tmp_path / "runs/cortex/registry/embed/champion/replicate_0/human_embedding.csv").read_text()
    from_run = (tmp_path / f"runs/cortex/embed/Integrated_dataset_0/replicate_{replicate}/human_embedding.csv").read_text()
    from io import StringIO

    import numpy as np
    import pandas as pd

    assert np.allclose(pd.read_csv(StringIO(via_registry), index_col=0), pd.read_csv(StringIO(from_run), index_col=0), atol=1e-5)


def test_two_trainings_at_once_lose_no_run_or_metric(server: Server, tmp_path: Path):
    tiny = make_tiny(tmp_path / "data")
    params = tiny_params(tmp_path / "params.yaml", tiny, tmp_path / "runs", max_epochs=4)
    procs = [_cli(["train", p, "--params", str(params)], server, tmp_path) for p in ("cortex", "subcortex")]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    _assert_complete(server, tmp_path)


def _assert_complete(env: dict[str, str], root: Path) -> None:
    from mlflow.tracking import MlflowClient

    for key, value in env.items():
        os.environ[key] = value
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    for partition in ("cortex", "subcortex"):
        run_id = json.loads((root / "runs" / partition / "train" / "Integrated_dataset_0" / "train.json").read_text())["run_id"]
        parent = client.get_run(run_id)
        assert parent.info.status == "FINISHED"
        kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
        assert len(kids) == 2
        for kid in kids:
            epochs = int(kid.data.metrics["epochs_run"])
            for key in ("train_loss", "valid_loss", "homology_rank"):
                assert len(client.get_metric_history(kid.info.run_id, key)) == epochs
