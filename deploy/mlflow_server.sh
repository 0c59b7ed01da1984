#!/usr/bin/env bash
# The team's shared tracking server: PostgreSQL backend store, served artifacts, basic auth, loopback.
#
# Required environment (nothing here holds a password):
#   TRANSDNN_BACKEND_URI    postgresql://USER@HOST:PORT/DB  (the run/registry store)
#   TRANSDNN_AUTH_DB_URI    postgresql://USER@HOST:PORT/DB  (the users store of basic auth)
#   TRANSDNN_ARTIFACTS      folder or s3://bucket/prefix for served artifacts
#   MLFLOW_AUTH_ADMIN_PASSWORD  first admin password (used once, when the users store is empty;
#                               rotate it afterwards with the update-password API, see README)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  a long random string
# Optional: TRANSDNN_HOST (default 127.0.0.1), TRANSDNN_PORT (default 5000), TRANSDNN_WORKERS (default 2),
#   TRANSDNN_AUTH_CACHE_S (default 60): seconds a worker trusts a password it has checked. Basic auth
#   checks each request's password against its scrypt hash (~0.13 s of CPU, more than once a request),
#   which made a 10-replicate training's few hundred requests take minutes. The price: a changed or
#   removed password still opens the workers that checked it, for up to this long. 0 checks every request.
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION (default false here): MLflow's job runner, for its GenAI jobs,
#   which transdnn does not use; on, it starts consumer processes (~1.9 GB) that slow every request.
set -euo pipefail
: "${TRANSDNN_BACKEND_URI:?set TRANSDNN_BACKEND_URI}" "${TRANSDNN_AUTH_DB_URI:?set TRANSDNN_AUTH_DB_URI}"
: "${TRANSDNN_ARTIFACTS:?set TRANSDNN_ARTIFACTS}" "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
# Before anything starts: each store URI must parse and its database driver must import (psycopg 3 for
# postgresql://, from pip install -e ".[server]"); one line naming the variable otherwise, never the URI.
for var in TRANSDNN_BACKEND_URI TRANSDNN_AUTH_DB_URI; do
  python3 - "$var" "${!var}" <<'PY' || exit 2
import sys

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

var, uri = sys.argv[1:]
try:
    url = make_url(uri)
except (ArgumentError, ValueError):
    sys.exit(f"deploy/mlflow_server.sh: {var}: expected a database URI such as postgresql://USER@HOST:PORT/DB")
try:
    url.get_dialect().import_dbapi()
except NoSuchModuleError:
    sys.exit(f"deploy/mlflow_server.sh: {var}: unknown database kind {url.drivername!r}; expected postgresql://")
except ImportError as exc:
    sys.exit(f"deploy/mlflow_server.sh: {var}: the {url.drivername} driver is not installed ({exc.name}); pip install -e '.[server]'")
PY
done
auth_cache="${TRANSDNN_AUTH_CACHE_S:-60}"
if [[ ! "$auth_cache" =~ ^[0-9]+$ ]]; then
  echo "deploy/mlflow_server.sh: TRANSDNN_AUTH_CACHE_S: expected a whole number of seconds (0: no cache), got '$auth_cache'" >&2
  exit 2
fi
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
host="${TRANSDNN_HOST:-127.0.0.1}"
port="${TRANSDNN_PORT:-5000}"
ini="$(mktemp --suffix=.ini)"
trap 'rm -f "$ini"' EXIT
cat > "$ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${TRANSDNN_AUTH_DB_URI}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${auth_cache}
INI
export MLFLOW_AUTH_CONFIG_PATH="$ini"
mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$TRANSDNN_BACKEND_URI" \
  --artifacts-destination "$TRANSDNN_ARTIFACTS" \
  --host "$host" --port "$port" \
  --workers "${TRANSDNN_WORKERS:-2}" \
  --allowed-hosts "$host:$port,localhost:$port,127.0.0.1:$port"
