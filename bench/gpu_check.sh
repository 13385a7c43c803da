#!/usr/bin/env bash
# The GPU checks of issue 14 in one run (< 10 minutes on an H100/H200), results under $OUT:
#   1. every `gpu`-marked test (graph capture and replay equal to eager, Triton kernels on CUDA),
#   2. bench/engine.py --quick (Gemma-2-2B shapes, batch 32 x 32 adapters) with CUDA graphs and
#      without, so the graphs' effect on the decode step is measured, not assumed,
#   3. bench/op_count.py with the GPU's own SM count (launches per layer as this GPU configures them).
# Run from the repository root:  OUT=/tmp/gpu-check bash bench/gpu_check.sh
# PY picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
OUT=${OUT:-/tmp/loraplex-gpu-check}
mkdir -p "$OUT"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
status=0
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name" | tee -a "$OUT/summary.txt"
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "ok" | tee -a "$OUT/summary.txt"
    else
        echo "FAILED (exit $?), see $name.log" | tee -a "$OUT/summary.txt"
        status=1
    fi
    tail -5 "$OUT/$name.log" >>"$OUT/summary.txt"
}
{ date -u; git rev-parse --short HEAD 2>/dev/null; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
    >"$OUT/env.txt" 2>&1
step pytest-gpu 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step engine-graphs 150 "$PY" bench/engine.py --quick --json "$OUT/engine_graphs.json" --markdown "$OUT/engine_graphs.md"
step engine-eager 120 "$PY" bench/engine.py --quick --cuda-graphs false \
    --json "$OUT/engine_eager.json" --markdown "$OUT/engine_eager.md"
SMS=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).multi_processor_count)" 2>/dev/null || echo 132)
step op-count 60 "$PY" bench/op_count.py --layers 2 --sms "$SMS" --json "$OUT/op_count.json"
cat "$OUT/summary.txt"
exit $status
