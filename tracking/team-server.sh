#!/usr/bin/env bash
# Team MLflow server: PostgreSQL backend + S3-compatible artifact store, artifacts proxied
# through the server (clients need no bucket credentials, only the server URL).
#   pip install psycopg2-binary boto3      # on the server host
#   cp tracking/team.env.example tracking/team.env && edit it
#   bash tracking/team-server.sh
# Clients: export MLFLOW_TRACKING_URI=http://<server>:5000 (credentials in the URI are never logged by mlproject).
set -euo pipefail
cd "$(dirname "$0")"
set -a; . ./team.env; set +a
exec python -m mlflow server \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
