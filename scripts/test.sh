#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs everything, lints, type-checks, tests.
# Usage: ./scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
py=.venv/bin/python
$py -m ruff check .
$py -m ruff format --check .
$py -m mypy engine kernels sessions tools api
$py -m pytest "$@"
