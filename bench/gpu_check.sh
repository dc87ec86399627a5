#!/usr/bin/env bash
# GPU check for Tarry's kernels: run from the repository root on a machine with a CUDA GPU.
#
#   bash bench/gpu_check.sh
#
# Prints nvidia-smi, runs the kernel tests on the GPU, the decode bandwidth benchmark and, when
# present, the engine benchmark. Everything is teed into "${OUT:-/tmp}/gpu_check.log".
# Each step has its own time limit (worst case about 5.5 minutes in all); a failing step is
# reported and the script goes on. Exit status: 0 when every step passed or there is no GPU,
# 1 when a step failed.
set -u -o pipefail

LOG_DIR="${OUT:-/tmp}"
mkdir -p "$LOG_DIR"
LOG="$LOG_DIR/gpu_check.log"

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python3)}"
FAILED=()

step() {  # step NAME SECONDS CMD...: run CMD under a time limit; remember a failure
    local name="$1" limit="$2"
    shift 2
    echo
    echo "=== $name (limit ${limit}s): $* ==="
    local start=$SECONDS rc=0
    timeout --kill-after=5 "$limit" "$@" || rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start))s ==="
    if [ "$rc" -ne 0 ]; then
        FAILED+=("$name (exit $rc)")
    fi
}

main() {
    echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD, log $LOG"
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then
        echo "gpu_check: no NVIDIA GPU found (nvidia-smi missing or failing); nothing to check."
        return 0
    fi
    nvidia-smi
    if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: torch sees no CUDA device; nothing to check."
        return 0
    fi
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

    step "kernel tests" 180 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py
    step "kernel bench" 60 "$PYTHON" bench/kernel_bench.py
    if [ -f bench/engine_bench.py ]; then
        step "engine bench" 90 "$PYTHON" bench/engine_bench.py --device cuda --gpu-decode
    else
        echo
        echo "=== engine bench: bench/engine_bench.py not present, skipped ==="
    fi

    echo
    if [ "${#FAILED[@]}" -eq 0 ]; then
        echo "gpu_check: all steps passed"
        return 0
    fi
    echo "gpu_check: FAILED: ${FAILED[*]}"
    return 1
}

main "$@" 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
