#!/bin/bash
# What a GPU check machine lacks, fetched here (with network to PyPI) into .gpu/ (git-ignored), which
# the check carries: wheels for its Python 3.12, and SmolLM2-135M-Instruct's config, tokenizer and chat
# template (tools/gpu/make_models.py makes random-weight models from them there). Run from the
# repository's root with the project's venv made (`make venv`): bash tools/gpu/prepare.sh
set -eu
PY=${PYTHON:-.venv/bin/python}
rm -rf .gpu/whl && mkdir -p .gpu/whl .gpu/model
PLATFORMS=""
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_31; do
  PLATFORMS="$PLATFORMS --platform ${p}_x86_64"
done
# The check machine has torch (with Triton), numpy, tokenizers, safetensors, aiohttp and uvloop of its own.
for spec in transformers==5.24.0 grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 \
    grpcio-reflection==1.85.1 grpcio-status==1.85.3 googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 \
    opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2 opentelemetry-instrumentation==0.66b2 \
    opentelemetry-instrumentation-grpc==0.66b2 opentelemetry-proto==1.45.2 opentelemetry-exporter-otlp==1.45.2 \
    opentelemetry-exporter-otlp-proto-grpc==1.45.2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
    opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-otlp-common==0.66b2 \
    opentelemetry-exporter-http-transport==0.66b2 wrapt==2.5.2 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 \
    sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 starlette==1.10.0 uvicorn==0.54.0 llguidance==1.9.1 \
    nvidia-ml-py==13.615.71 psutil==7.2.2 prometheus-client==0.26.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
    packaging==26.4 pytest-asyncio==1.5.0 pytest-timeout==2.4.0 jsonschema==4.26.0 \
    jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 peft==0.21.2 \
    typing-extensions==4.16.0 anyio==4.16.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d .gpu/whl "$spec"
done
# The bundled GGUF's config and tokenizer, as the registry's importer converts it (the weights are not kept).
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
GGUF=$("$PY" -c 'from llmos.registry.bundled import smollm2_gguf; print(smollm2_gguf())')
"$PY" -m llmos.registry.to_safetensors gguf "$GGUF" "$TMP/conv"
cp "$TMP"/conv/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/model/
du -sh .gpu
