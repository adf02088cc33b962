#!/usr/bin/env bash
# Sets up .venv (first time only) and starts all six services; Ctrl-C stops them.
#   ./run.sh [--service-config FILE] [--monitor]
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh
ensure_venv .venv requirements.txt
exec .venv/bin/python launch.py "$@"
