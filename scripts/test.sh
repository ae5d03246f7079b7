#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Prefect: a throw-away home, offline, generous ephemeral-server start-up (see docs).
export PREFECT_HOME=${PREFECT_HOME:-$(mktemp -d)}
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
exec .venv/bin/python -m pytest "$@"
