#!/usr/bin/env bash
# Regenerates kvfleet/v1/*_pb2*.py from protos/. The only way generated code changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -f kvfleet/v1/*_pb2.py kvfleet/v1/*_pb2_grpc.py kvfleet/v1/*_pb2.pyi
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  protos/kvfleet/v1/*.proto
touch kvfleet/v1/__init__.py
echo "generated: $(ls kvfleet/v1/*_pb2*.py | wc -l) files"
