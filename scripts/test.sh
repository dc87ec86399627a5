#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs everything (Python packages, Debian's
# redis-server, chromium), lints, type-checks, tests. The tests start the redis-servers they use.
# Usage: ./scripts/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
# The session tests start real redis-server processes (Debian's package).
if ! command -v redis-server >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -qq redis-server >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq redis-server; }
fi
# The inspector tests drive a real headless Chromium (Debian's package; playwright only speaks
# the DevTools protocol to it and downloads nothing).
if ! command -v chromium >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get install -y -qq chromium >/dev/null 2>&1 \
    || { $sudo_cmd apt-get update -qq && $sudo_cmd apt-get install -y -qq chromium; }
fi
py=.venv/bin/python
$py -m ruff check .
$py -m ruff format --check .
$py -m mypy engine kernels sessions tools api
$py -m pytest "$@"
