#!/bin/bash
# The engine on a GPU in one run, from the repository's root on a machine with a CUDA build of torch
# (made ready by tools/gpu/prepare.sh; tools/gpu_check.sh says how): OUT=<dir> bash tools/gpu/run.sh
# 1. the device (nvidia-smi, torch, llmos's NVML inventory); 2. random-weight models from configs;
# 3. one decode step three ways (torch's operators, the Triton kernels, CUDA graphs: step_bench.py);
# 4. the engine's tests with their models on the GPU, while the suite starts with its worker there;
# 5. `llmos bench --fixed` per model and concurrency, until the budget is spent.
# Every step runs under `timeout`, cut to what is left of BUDGET seconds; a failed step does not stop
# the later ones. Output: $OUT/{summary,devices,steps,engine-tests,up,bench,logs}.txt
set -u
ROOT=$(pwd)
OUT=${OUT:?set OUT to the output directory}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WORK=${WORK:-/tmp/llmos-gpu}
PORT=${PORT_BASE:-62000}
# DEVICE=cpu: a dry run of this script where no GPU is (the project's venv, the SmolLM2-shaped model, C=1 and 4).
DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  BUDGET=${BUDGET:-900}; TEST_TIMEOUT=${TEST_TIMEOUT:-300}; SLOTS=${SLOTS:-16}; MAX_TOKENS=${MAX_TOKENS:-16}
  MODELS=${MODELS:-smollm2}; BENCHES=${BENCHES:-"smollm2:1 smollm2:4:nobase"}; PY=${PYTHON:-.venv/bin/python}
else
  BUDGET=${BUDGET:-420}; TEST_TIMEOUT=${TEST_TIMEOUT:-200}; SLOTS=${SLOTS:-256}; MAX_TOKENS=${MAX_TOKENS:-128}
  MODELS=${MODELS:-smollm2 llama1b}
  # model:C[:nobase]: in order of worth, as many as the budget allows (nobase: without generate()'s baselines).
  BENCHES=${BENCHES:-"llama1b:1 smollm2:1 llama1b:256:nobase smollm2:256:nobase llama1b:16 llama1b:64:nobase"}
fi
BASELINE_REQUESTS=${BASELINE_REQUESTS:-2}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=$WORK/pycache TOKENIZERS_PARALLELISM=false \
  PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
rm -rf "$WORK"; mkdir -p "$WORK/models"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"

note() { echo "[+$(( $(date +%s) - START ))s] $*" >> "$SUMMARY"; }
left() { echo $(( DEADLINE - $(date +%s) )); }
within() {
  local want=$1 l; shift
  l=$(left)
  (( want > l )) && want=$l
  if (( want < 5 )); then echo "skipped, no time left: $*"; return 124; fi
  timeout -k 5 "$want" "$@"
}
step() {
  local name=$1 s rc; shift
  s=$(date +%s)
  within "$@"; rc=$?
  note "$name: rc=$rc in $(( $(date +%s) - s ))s"
  return $rc
}

UP="" BRANCH=""
cleanup() {
  trap - EXIT INT TERM
  if [ -n "$BRANCH" ] && kill -0 "$BRANCH" 2>/dev/null; then kill $(pgrep -P "$BRANCH") "$BRANCH" 2>/dev/null; fi
  [ -z "$UP" ] && [ -s "$WORK/up.pid" ] && UP=$(cat "$WORK/up.pid")
  if [ -n "$UP" ] && kill -0 "$UP" 2>/dev/null; then
    local children i
    children=$(pgrep -P "$UP")
    kill -TERM -- "-$UP" 2>/dev/null || kill -TERM "$UP" 2>/dev/null
    for i in $(seq 15); do kill -0 "$UP" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$UP" 2>/dev/null; kill -KILL "$UP" 2>/dev/null
    for p in $children; do kill -KILL -- "-$p" 2>/dev/null; kill -KILL "$p" 2>/dev/null; done
    note "suite stopped"
  fi
  if [ -d "$WORK/data/logs" ]; then
    for f in "$WORK"/data/logs/*.log; do
      echo "===== $f: its last 200 lines but the audit of status polls"
      grep -v "audit: /llmos.v1.[A-Za-z]*/\(GetWorkerStatus\|ListLeases\|ListWorkers\|GetSchedulerStats\)" "$f" | tail -n 200
    done > "$OUT/logs.txt" 2>&1
  fi
  note "done in $(( $(date +%s) - START ))s"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

note "llmos GPU check: BUDGET=${BUDGET}s SLOTS=$SLOTS MAX_TOKENS=$MAX_TOKENS models: $MODELS; benches: $BENCHES"

# 1. The carried wheels beside the machine's own packages; the device.
{
  if [ "$DEVICE" = cuda ]; then
    rm -rf "$SITE"
    step install 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .gpu/whl/*.whl
  fi
} > "$OUT/devices.txt" 2>&1
export PYTHONPATH="$SITE:$ROOT/services:$ROOT/clients/python:$ROOT"
{
  echo "===== nvidia-smi"; within 30 nvidia-smi -L
  step versions 60 "$PY" -c '
import sys, torch, triton, transformers
print(sys.version.split()[0], "torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__,
      "transformers", transformers.__version__)
if torch.cuda.is_available():
    free, total = torch.cuda.mem_get_info()
    print(torch.cuda.get_device_name(0), f"free {free / 2**30:.1f} of {total / 2**30:.1f} GiB")'
  echo "===== llmos's device inventory (NVML)"
  step inventory 60 "$PY" -c 'from llmos.resources.inventory import probe_devices
for d in probe_devices(): print(d)'
} >> "$OUT/devices.txt" 2>&1
note "device: $(grep -m1 -E '^(NVIDIA|GPU 0)' "$OUT/devices.txt"); $(grep -m1 ' torch ' "$OUT/devices.txt")"

# 2-3. The models, then one decode step three ways (alone on the GPU, before anything else runs there).
{
  step models 120 "$PY" tools/gpu/make_models.py "$WORK/models" "$DEVICE" $MODELS
  [ "$DEVICE" = cuda ] && for m in $MODELS; do
    echo "===== $m"
    step "step-bench $m" 90 "$PY" tools/gpu/step_bench.py "$WORK/models/$m-random" 128
  done
} > "$OUT/steps.txt" 2>&1
grep -E "^  batch|^decode step" "$OUT/steps.txt" >> "$SUMMARY"

# 4. The suite in the background while the engine's tests run.
G=(--data-dir "$WORK/data" --gateway "127.0.0.1:$PORT" --scheduler "127.0.0.1:$((PORT + 1))"
   --registry "127.0.0.1:$((PORT + 2))" --resources "127.0.0.1:$((PORT + 3))" --monitor "127.0.0.1:$((PORT + 5))")
suite_branch() {
  local s i
  s=$(date +%s)
  # Two models on one GPU: the first (SmolLM2) leases half the device and fills it with its KV cache; the 1B
  # one then leases the registry's estimate (weights and LLMOS_WORKER_KV_CACHE_TOKENS' cache).
  LLMOS_WORKER_GPU_MEMORY_FRACTION=${GPU_MEMORY_FRACTION:-0.5} \
  LLMOS_WORKER_DEVICE=$DEVICE LLMOS_WORKER_MAX_RUNNING=$SLOTS LLMOS_WORKER_MAX_SEQ_LEN=1024 \
  LLMOS_REGISTRY_KV_SLOTS=$SLOTS LLMOS_REGISTRY_KV_MAX_SEQ_LEN=1024 LLMOS_REGISTRY_ALLOWED_ROOTS="$WORK/models" \
  LLMOS_SCHEDULER_SLOTS_PER_WORKER=$SLOTS LLMOS_SCHEDULER_MAX_QUEUE=$((SLOTS * 4)) \
    "$PY" tools/gpu/up.py smollm2-random "$WORK/models/smollm2-random" \
      --data-dir "$WORK/data" up --model smollm2-random --port-base "$PORT" --metrics-port 0 \
      > "$WORK/up.log" 2>&1 < /dev/null &
  echo $! > "$WORK/up.pid"
  for i in $(seq 400); do
    grep -q "serving;" "$WORK/up.log" 2>/dev/null && break
    kill -0 "$(cat "$WORK/up.pid")" 2>/dev/null || break
    (( $(left) < 10 )) && break
    sleep 1
  done
  cat "$WORK/up.log"
  if ! grep -q "serving;" "$WORK/up.log"; then note "up: NOT serving after $(( $(date +%s) - s ))s"; return 1; fi
  note "up: serving in $(( $(date +%s) - s ))s"
  if [[ " $MODELS " == *" llama1b "* ]]; then
    step import-llama1b 150 "$PY" -m llmos.cli "${G[@]}" models import llama1b-random "$WORK/models/llama1b-random"
    step load-llama1b 150 "$PY" -m llmos.cli "${G[@]}" models load llama1b-random
  fi
  within 30 "$PY" -m llmos.cli "${G[@]}" ps
}
( suite_branch; echo "branch rc=$?" ) > "$OUT/up.txt" 2>&1 &
BRANCH=$!

LLMOS_TEST_DEVICE=$DEVICE PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \
  step engine-tests "$TEST_TIMEOUT" "$PY" -m pytest -p pytest_asyncio.plugin -p pytest_timeout -p no:cacheprovider \
    -q -rfE --tb=short --timeout 90 -m "not smollm2" tests/integration/test_gpu_kernels.py \
    tests/integration/test_engine.py tests/integration/test_prefix_cache.py tests/integration/test_determinism.py \
    tests/integration/test_generic.py tests/integration/test_lora.py tests/integration/test_structured.py \
    tests/integration/test_paged.py > "$OUT/engine-tests.txt" 2>&1
ENDLINE=$(grep -E '^=+ .*(passed|failed|error).* =+$|^[0-9]+ (passed|failed)' "$OUT/engine-tests.txt" | tail -1 | tr -d '=')
note "engine tests: ${ENDLINE:-cut short}"
grep -E '^(FAILED|ERROR) ' "$OUT/engine-tests.txt" | head -30 | sed 's/^/    /' >> "$SUMMARY"

# 5. The benchmarks, one at a time, each cut to the time left.
while kill -0 "$BRANCH" 2>/dev/null && (( $(left) > 10 )); do sleep 1; done
[ -s "$WORK/up.pid" ] && UP=$(cat "$WORK/up.pid")
: > "$OUT/bench.txt"
for b in $BENCHES; do
  IFS=: read -r name c flag <<< "$b"
  model=$name-random
  f=$WORK/bench-$model-$c.txt
  s=$(date +%s)
  baselines=(--baseline-device "$DEVICE" --baseline-requests "$BASELINE_REQUESTS")
  [ "$flag" = nobase ] && baselines=(--no-baselines)
  within 120 "$PY" -m llmos.cli "${G[@]}" bench --model "$model" --target both --fixed --max-tokens "$MAX_TOKENS" \
    --concurrency "$c" --requests $((c * 4)) "${baselines[@]}" > "$f" 2>&1
  rc=$?
  { echo "===== bench $model C=$c (rc=$rc, $(( $(date +%s) - s ))s)"; cat "$f"; } >> "$OUT/bench.txt"
  "$PY" tools/gpu/summarize.py "$f" "$model" "$c" "$rc" "$(( $(date +%s) - s ))" >> "$SUMMARY" 2>&1
done
exit 0
