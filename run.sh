#!/usr/bin/env bash
# Sets up .venv (first time only) and starts all six services; Ctrl-C stops them.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'USAGE'
usage: ./run.sh [--setup | --service-config FILE] [--monitor [LOG]]

Sets up .venv the first time (CPython 3.8 to 3.12; PYTHON=/path/to/python3.X picks one),
then starts every service of the config, storage first; Ctrl-C stops them all.

  --setup                  set up .venv only, start nothing
  --service-config FILE    the config to start (default: service_config.json;
                           docs/pause_config.json makes agents pause for seconds)
  --monitor [LOG]          show the live monitor; the services' output goes to LOG
                           (default: launch.log)
  -h, --help               show this help
USAGE
}

case "${1:-}" in
  -h | --help)
    usage
    exit 0
    ;;
esac
. tools/env.sh
ensure_venv .venv requirements.txt
if [ "${1:-}" = "--setup" ]; then
  exit 0
fi
exec .venv/bin/python -m tools.launch "$@"
