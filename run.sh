#!/usr/bin/env bash
# Sets up .venv (first time only) and starts all six services; Ctrl-C stops them.
#   ./run.sh [--service-config FILE] [--monitor]   start the system
#   ./run.sh --setup                               only set up .venv
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh
ensure_venv .venv requirements.txt
if [ "${1:-}" = "--setup" ]; then
  exit 0
fi
exec .venv/bin/python launch.py "$@"
