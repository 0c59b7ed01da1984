"""deploy/mlflow_server.sh refuses a store URI or setting it cannot use before it starts anything: one
line on stderr naming the variable (never the URI, which may hold a password), exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

GOOD = "postgresql://mlflow@127.0.0.1:1/mlflow"


def _start(tmp_path: Path, backend: str, auth: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin",
        "TRANSDNN_BACKEND_URI": backend,
        "TRANSDNN_AUTH_DB_URI": auth,
        "TRANSDNN_ARTIFACTS": str(tmp_path / "artifacts"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "x" * 48,
        "MLFLOW_AUTH_ADMIN_PASSWORD": "unused",
        **extra,
    }
    return subprocess.run(
        ["bash", str(REPO / "deploy" / "mlflow_server.sh")], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("backend", "auth", "names"),
    [
        ("postgresql+pg8000://mlflow@127.0.0.1:1/mlflow", GOOD, ["TRANSDNN_BACKEND_URI", "pg8000", ".[server]"]),
        (GOOD, "postgresql://admin:s3cret@127.0.0.1:notaport/auth", ["TRANSDNN_AUTH_DB_URI", "postgresql://USER@HOST"]),
        ("nosuchdb://mlflow@127.0.0.1/mlflow", GOOD, ["TRANSDNN_BACKEND_URI", "'nosuchdb'"]),
    ],
)
def test_unusable_store_uri_is_one_line_and_exit_2(tmp_path: Path, backend: str, auth: str, names: list[str]) -> None:
    proc = _start(tmp_path, backend, auth)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for name in names:
        assert name in lines[0]
    assert "s3cret" not in proc.stderr


@pytest.mark.parametrize("value", ["1m", "-5"])
def test_auth_cache_that_is_not_whole_seconds_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    proc = _start(tmp_path, GOOD, GOOD, TRANSDNN_AUTH_CACHE_S=value)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TRANSDNN_AUTH_CACHE_S" in lines[0] and "whole number of seconds" in lines[0], proc.stderr
