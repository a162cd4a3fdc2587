#!/usr/bin/env bash
# Regenerates proto/*_pb2*.py from proto/*.proto. The output is committed;
# tests/test_proto_stubs.py fails when it is stale. Pinned grpcio-tools (see pyproject) keeps it reproducible.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
OUT="${1:-.}"
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" proto/*.proto
