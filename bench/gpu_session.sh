#!/usr/bin/env bash
# One GPU session on the lent machine (run from the project root, with .devsite carried):
# the single-device sweep (torch, CPU vs GPU, fp32 and fp16), the stream on every GPU (cached, cold,
# lru), and the dispatch benchmarks.  Everything lands in $OUT/gpu-session.tar.gz; the tables print last.
set -uo pipefail
mkdir -p /tmp/site && tar xzf .devsite/site.tar.gz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
PY=${PY:-python3}
W=/tmp/cb; OUT=${OUT:-/tmp/out}; mkdir -p "$W" "$OUT"
STEPS=${STEPS:-export,single,stream,bench}
cat > "$W/config.json" <<JSON
{"models": ["imagenet"], "img_dir": "$W/images", "result_dir": "$W/results", "model_dir": "$W/models",
 "gpu_num": "auto", "batchsize": [1, 8, 64], "times": 20000, "backend": "torch",
 "single": {"devices": ["cpu", "gpu:0"], "warmup_runs": 2, "min_runs": 3, "max_seconds": 1.0},
 "stream": {"modes": ["cached"], "warmup": 2000, "concurrency": 64, "metrics_port": 8000}}
JSON
log() { echo "== $(date +%T) $*"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
if has export; then
  log export
  $PY -m cortexbench.models export --backend torch --models imagenet,null --model-dir "$W/models" --quiet
  $PY -m cortexbench.images synth --count 2000 --out "$W/images" 2>&1 | tail -2
fi
if has single; then
  log single fp32 cpu+gpu
  $PY -m cortexbench.single --config "$W/config.json" --quiet 2>&1 | tail -40
  log single fp16 gpu
  $PY -m cortexbench.single --config "$W/config.json" --devices gpu:0 --precision fp16 --batch-sizes 1,8,64 --quiet 2>&1 | tail -20
fi
if has stream; then
  log stream cached fp16
  $PY -m cortexbench.stream --config "$W/config.json" --precision fp16 --mode cached --images 30000 2>&1 | tail -12
  if [ -n "${ALSO_COMPILED:-}" ]; then
    log stream cached fp16, compiled dispatch
    $PY -m cortexbench.stream --config "$W/config.json" --precision fp16 --mode cached --images 20000 --dispatch compiled 2>&1 | tail -5
  fi
  SLOW_MODES=${SLOW_MODES:-cold,lru:4}
  if [ "$SLOW_MODES" != none ]; then
    log stream $SLOW_MODES fp16
    $PY -m cortexbench.stream --config "$W/config.json" --precision fp16 --mode "$SLOW_MODES" --images 1200 --warmup 50 --concurrency 16 2>&1 | tail -12
  fi
fi
if has bench; then
  log bench
  ${BENCH_CMD:-true}
fi
tar czf "$OUT/gpu-session.tar.gz" --exclude='*.csv.gz' -C "$W" results 2>/dev/null
ls -la "$OUT"
