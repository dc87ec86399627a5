#!/usr/bin/env bash
# Sets up (first run only) and serves Tarry on the embedded SmolLM2 at http://127.0.0.1:8000
# (WebSocket sessions at /v1/sessions, OpenAI-compatible HTTP at /v1).
# Usage: ./scripts/serve.sh [tarry serve options, e.g. --port 8080 --redis-url redis://...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
exec .venv/bin/tarry serve "$@"
