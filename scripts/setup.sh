#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: virtualenv, CPU torch first, dinet[dev],
# the tiny test model, and a running RabbitMQ. Sourced by test.sh and demo.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
MODELS_DIR="${DINET_MODELS_DIR:-$ROOT/.cache/models}"

log() { printf '[setup] %s\n' "$*" >&2; }

if [[ ! -x "$PY" ]]; then
  log "creating virtualenv in .venv"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

STAMP="$VENV/.dinet-installed"
if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" ]]; then
  log "installing torch==2.13.0 (CPU build) first, then dinet[dev]"
  PIP_LOG="$VENV/pip-install.log"
  if ! { "$PY" -m pip install torch==2.13.0 && "$PY" -m pip install -e ".[dev]"; } >"$PIP_LOG" 2>&1; then
    grep -v "WARNING: Location" "$PIP_LOG" | tail -40 >&2
    log "pip install failed; full log in $PIP_LOG"
    exit 1
  fi
  touch "$STAMP"
fi

if [[ ! -f "$MODELS_DIR/tiny/config.json" ]]; then
  log "building the tiny test model in $MODELS_DIR/tiny"
  "$VENV/bin/dinet-node" make-model "$MODELS_DIR/tiny" --preset tiny
fi

if ! rabbitmqctl -q status >/dev/null 2>&1; then
  log "starting RabbitMQ"
  rabbitmq-server -detached >/dev/null 2>&1 || true
fi
rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1 || rabbitmqctl -q start_app >/dev/null 2>&1 || true
rabbitmqctl -q await_startup --timeout 120 >/dev/null
