#!/usr/bin/env bash
# Local MLflow tracking server: 127.0.0.1 only, SQLite metadata, artifacts on local disk.
#   bash tracking/server.sh            # http://127.0.0.1:5000
#   PORT=5050 bash tracking/server.sh
# Then point runs at it: export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
set -euo pipefail
cd "$(dirname "$0")/.."
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-5000}
STORE=${STORE:-$PWD/tracking/local}
mkdir -p "$STORE/artifacts"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" -m mlflow server \
  --host "$HOST" --port "$PORT" \
  --backend-store-uri "sqlite:///$STORE/mlflow.db" \
  --artifacts-destination "$STORE/artifacts" \
  --workers "${WORKERS:-2}"
