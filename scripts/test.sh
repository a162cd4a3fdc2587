#!/usr/bin/env bash
# The project's test command: set-up, then ruff, mypy and pytest.
# Extra arguments go to pytest (e.g. ./scripts/test.sh -k broker -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh
BIN="$ROOT/.venv/bin"
echo "== ruff"
"$BIN/ruff" check .
echo "== mypy"
"$BIN/mypy" proto node broker agent scheduler
echo "== pytest"
export DINET_MODELS_DIR="${DINET_MODELS_DIR:-$ROOT/.cache/models}"
"$BIN/python" -m pytest -q -ra "$@"
