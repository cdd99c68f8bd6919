#!/bin/sh
# The engine on a GPU, in one run: the device as NVML sees it, the engine tests with their models
# on CUDA, and `llmos bench --fixed` through a whole suite whose worker runs on the GPU, against
# transformers' generate() on the same GPU. Needs a Python with a CUDA build of torch and llmos's
# dependencies (PYTHON, default .venv/bin/python). Usage: tools/gpu_check.sh [output directory].
set -eu
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-gpu-check}
mkdir -p "$OUT"
DATA=$(mktemp -d)
trap 'kill "$UP" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DATA"' EXIT

nvidia-smi -L | tee "$OUT/devices.txt"
"$PY" -c 'import torch; assert torch.cuda.is_available(), "this torch has no CUDA"; print(torch.__version__, torch.cuda.get_device_name(0))' | tee -a "$OUT/devices.txt"
"$PY" -c 'from llmos.resources.inventory import probe_devices
for d in probe_devices(): print(d)' | tee -a "$OUT/devices.txt"

LLMOS_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/integration/test_engine.py \
  tests/integration/test_prefix_cache.py tests/integration/test_determinism.py tests/integration/test_lora.py \
  tests/integration/test_generic.py 2>&1 | tee "$OUT/engine-tests.txt" || true

LLMOS_WORKER_DEVICE=cuda "$PY" -m llmos.cli --data-dir "$DATA" up --port-base 62000 --metrics-port 0 \
  > "$OUT/up.txt" 2>&1 &
UP=$!
for _ in $(seq 300); do grep -q "serving;" "$OUT/up.txt" 2>/dev/null && break; sleep 1; done
G="--data-dir $DATA --gateway 127.0.0.1:62000 --registry 127.0.0.1:62002"
for c in 1 16 64; do
  "$PY" -m llmos.cli $G bench --target both --fixed --max-tokens 128 --requests $((c * 4)) --concurrency "$c" \
    --baseline-device cuda 2>&1 | tee "$OUT/bench-c$c.txt"
done
