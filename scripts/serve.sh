#!/usr/bin/env bash
# Sets up (first run only) and runs Tarry on the embedded SmolLM2.
# Usage: ./scripts/serve.sh ["your prompt"] [tarry generate options]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
prompt="${1:-What is the capital of France? Answer in one sentence.}"
shift || true
exec .venv/bin/tarry generate "$prompt" "$@"
