#!/usr/bin/env bash
# Regenerates services/llmos/v1 from protos/llmos/v1. Run through `make protos`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
rm -f services/llmos/v1/*_pb2*.py services/llmos/v1/*_pb2*.pyi
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=services --pyi_out=services --grpc_python_out=services \
  protos/llmos/v1/*.proto
touch services/llmos/v1/__init__.py
