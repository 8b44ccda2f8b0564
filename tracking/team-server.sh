#!/usr/bin/env bash
# Team MLflow server: PostgreSQL backend + S3-compatible artifact store (artifacts proxied
# through the server: clients need no bucket credentials), MLflow's basic-auth app (every
# request needs a user; permissions per experiment and model), and an explicit list of the
# host names clients use (MLflow 3 refuses API calls with any other Host header: 403
# "Invalid Host header", while /health still answers 200).
#
#   pip install 'mlflow[auth]' psycopg2-binary boto3        # on the server host (postgresql+psycopg2:// URIs)
#   cp tracking/team.env.example tracking/team.env          # git-ignored; edit every CHANGE_ME
#   bash tracking/team-server.sh                            # or TEAM_ENV=/etc/mlflow/team.env …
#
# Clients: export MLFLOW_TRACKING_URI=https://<server>; MLFLOW_TRACKING_USERNAME=<user>;
# MLFLOW_TRACKING_PASSWORD=<password> (or put user:password@ in the URI: mlproject never logs
# it). Basic auth sends passwords with every request: serve it over TLS (a reverse proxy in
# front, MLFLOW_HOST=127.0.0.1 behind it) or keep it on a trusted network.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
env_file="${TEAM_ENV:-$here/team.env}"
if [ ! -f "$env_file" ]; then
  echo "error: $env_file not found: cp tracking/team.env.example tracking/team.env and edit it" >&2
  exit 2
fi
set -a; . "$env_file"; set +a

for var in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_HOST MLFLOW_PORT MLFLOW_ALLOWED_HOSTS \
           MLFLOW_AUTH_DATABASE_URI MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  value="${!var:-}"
  if [ -z "$value" ] || [[ "$value" == *CHANGE_ME* ]]; then
    echo "error: set $var in $env_file (it is empty or still CHANGE_ME)" >&2
    exit 2
  fi
done
if [ "$MLFLOW_AUTH_ADMIN_PASSWORD" = "password1234" ] || [ "${#MLFLOW_AUTH_ADMIN_PASSWORD}" -lt 12 ]; then
  echo "error: MLFLOW_AUTH_ADMIN_PASSWORD in $env_file must be your own, 12 characters or more" >&2
  exit 2
fi

# The database drivers and the S3 client the URIs ask for, before the server starts: SQLAlchemy 2.1
# reads a plain postgresql:// as psycopg 3 (not psycopg2), which a psycopg2-only host lacks, and
# MLflow would only say so in a traceback.
"${PYTHON:-python3}" - <<'PY' || exit 2
import importlib.util, os, sys
from sqlalchemy.engine import make_url
for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
    url = make_url(os.environ[var])
    dialect = url.get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = (" (a plain postgresql:// means psycopg 3: pip install 'psycopg[binary]', or write "
                "postgresql+psycopg2:// with psycopg2-binary)" if url.get_backend_name() == "postgresql" else "")
        sys.exit(f"error: {var} needs the {url.get_backend_name()} driver {dialect.driver}: {exc}{hint}")
if os.environ["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and importlib.util.find_spec("boto3") is None:
    sys.exit("error: MLFLOW_ARTIFACTS_DESTINATION is s3://: pip install boto3")
PY

# The auth app reads its settings from an ini file (the admin password it takes from
# MLFLOW_AUTH_ADMIN_PASSWORD, on the first start only). The file holds the auth database URI,
# so only this user may read it. MLflow checks the password hash (scrypt, ~0.1 s of CPU) on every
# request unless its credential cache is on; a step makes ~30 requests, so it is on here
# (MLFLOW_AUTH_CACHE_TTL_SECONDS, default 60; 0 = off).
export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/local/basic_auth.ini}"
mkdir -p "$(dirname "$MLFLOW_AUTH_CONFIG_PATH")"
( umask 077
  cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}
INI
)
chmod 600 "$MLFLOW_AUTH_CONFIG_PATH"  # (umask does not tighten a file left by an earlier start)

cors=()
if [ -n "${MLFLOW_CORS_ALLOWED_ORIGINS:-}" ]; then
  cors=(--cors-allowed-origins "$MLFLOW_CORS_ALLOWED_ORIGINS")
fi
# The backend store URI holds the database password: mlflow server reads it from the exported
# MLFLOW_BACKEND_STORE_URI, so it is not on the command line (which `ps` shows every user).
exec "${PYTHON:-python3}" -m mlflow server \
  --app-name basic-auth \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "${MLFLOW_WORKERS:-4}" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --allowed-hosts "$MLFLOW_ALLOWED_HOSTS" "${cors[@]}"
