#!/usr/bin/env bash
# GPU check for Tarry's kernels and engine: run from the repository root on a CUDA machine.
#
#   bash bench/gpu_check.sh [ASSETS_DIR]
#
# Prints nvidia-smi, runs the kernel tests and the greedy parity tests on the GPU (engine with
# the Triton path and CUDA graphs vs transformers generate() and vs the engine without graphs,
# tiny models of every architecture; tests/test_parity.py, test_decode_graph.py,
# bench/gpu_tests/test_cuda_graphs.py), then the engine decode benchmark, which prints issue 16's three
# figures: batch-1 decode vs HF static-cache generate(), batch-32 decode vs HF batch 1, and the
# per-step host time at batch 32. Everything is teed into "${OUT:-/tmp}/gpu_check.log". Each
# step has its own time limit (worst case under 10 minutes in all); a failing step is reported
# and the script goes on. Exit status: 0 when every step passed or there is no GPU, 1 when a
# step failed. Optional, off by default to fit one 10-minute run: GPU_CHECK_KERNEL_BENCH=1 adds
# the decode-attention bandwidth benchmark, GPU_CHECK_COMPILE=1 a second engine benchmark with
# torch.compile (inductor).
#
# ASSETS_DIR (default .gpu) serves machines that cannot install from an index or receive the
# embedded model: whl/*.whl are installed into /tmp/gpu-site (e.g. redis-py, which the test
# fixtures import), and smollm2/ (config.json and tokenizer files, no weights; see
# bench/random_weights.py) gives the parity tests their tokenizer and the engine benchmark a
# SmolLM2-shaped model with random weights. Without it the tests and benchmark use the embedded
# model, as on a developer machine. To prepare it here (it is ignored by git; carry it):
#
#   echo /.gpu/ >> .git/info/exclude; mkdir -p .gpu/smollm2 .gpu/whl
#   cp ~/.cache/tarry/models/SmolLM2-*/{config.json,tokenizer*.json,chat_template.jinja} .gpu/smollm2/
#   .venv/bin/pip download --no-deps --only-binary=:all: redis==8.1.0 -d .gpu/whl
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

    local assets="${1:-.gpu}" model_args=() parallel=()
    if compgen -G "$assets/whl/*.whl" >/dev/null; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu-site "$assets"/whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
    fi
    if [ -f "$assets/smollm2/config.json" ]; then
        export TARRY_TEST_TOKENIZER="$assets/smollm2"
        step "random-weight SmolLM2" 60 "$PYTHON" -m bench.random_weights \
            "$assets/smollm2" /tmp/gpu-smollm2-random
        model_args=(--model /tmp/gpu-smollm2-random)
    fi
    if "$PYTHON" -c "import xdist" 2>/dev/null; then
        parallel=(-n 8)  # Triton compiles each kernel variant once per process: spread them
    fi
    step "kernel tests" 100 "$PYTHON" -m pytest -q -p no:cacheprovider "${parallel[@]}" \
        tests/test_kernels.py
    # SmolLM2's own parity test needs its weights, which the GPU machine does not get.
    step "parity tests (CUDA graphs, eager, HF)" 240 env TARRY_TEST_DEVICE=cuda "$PYTHON" -m \
        pytest -q -rs -p no:cacheprovider "${parallel[@]}" -k "not smollm2" \
        tests/test_parity.py tests/test_decode_graph.py bench/gpu_tests/test_cuda_graphs.py
    if [ "${GPU_CHECK_KERNEL_BENCH:-0}" = 1 ]; then
        step "kernel bench" 60 "$PYTHON" bench/kernel_bench.py
    fi
    step "engine bench" 200 "$PYTHON" bench/engine_bench.py --device cuda --gpu-decode \
        "${model_args[@]}"
    if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
        step "engine bench, torch.compile" 200 "$PYTHON" bench/engine_bench.py --device cuda \
            --gpu-decode --compile "${model_args[@]}"
    fi

    echo
    echo "=== issue 16 figures ==="
    grep -E "^(engine ready|[123]\. )" "$LOG" || echo "(none: the engine bench did not finish)"
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
