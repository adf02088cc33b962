#!/usr/bin/env bash
# Sets up .venv (first time only) and starts all six services; Ctrl-C stops them.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  cat <<'USAGE'
usage: ./run.sh [--setup | --service-config FILE] [--restart] [--monitor [LOG]]

Sets up .venv the first time (CPython 3.8 to 3.12; PYTHON=python3.X picks one),
then starts every service of the config, storage first; Ctrl-C stops them all.
A service that dies leaves the others running.

  --setup                  set up .venv only, start nothing
  --service-config FILE    the config to start (default: service_config.json;
                           docs/pause_config.json makes agents pause for seconds)
  --restart                start a service that died again (1 s, 2 s, 4 s later;
                           not after 3 deaths in a row within 10 s of serving)
  --monitor [LOG]          show the live monitor; the services' output goes to LOG
                           (default: launch.log)
  -h, --help               show this help

Exit code: 0 after Ctrl-C if every service ran until then and stopped cleanly;
1 if one could not start, died or did not stop; 2 for a bad command line.
USAGE
}

refuse() {
  echo "error: $1 (./run.sh --help lists the options)" >&2
  exit 2
}

# Checked here, before a first set-up that takes a minute.
args=("$@")
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --setup | --restart) ;;
    --service-config) [ $# -ge 2 ] || refuse "--service-config needs a file"; shift ;;
    --service-config=*) ;;
    --monitor) if [ $# -ge 2 ] && [ "${2#-}" = "$2" ]; then shift; fi ;;
    --monitor=*) ;;
    -*) refuse "unknown option $1" ;;
    *) refuse "./run.sh takes no file name without an option: to start $1, run ./run.sh --service-config $1" ;;
  esac
  shift
done
set -- "${args[@]+"${args[@]}"}"

. tools/env.sh
ensure_venv .venv requirements.txt
if [ "${1:-}" = "--setup" ]; then
  exit 0
fi
exec .venv/bin/python -m tools.launch "$@"
