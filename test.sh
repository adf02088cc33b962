#!/usr/bin/env bash
# Sets up .venv (first time only) and runs the test suite; arguments go to pytest.
#   ./test.sh                  the suite, in .venv
#   ./test.sh --all-pythons    the suite on every other supported Python found (3.8-3.12)
set -euo pipefail
cd "$(dirname "$0")"
. tools/env.sh
if [ "${1:-}" != "--all-pythons" ]; then
  ensure_venv .venv requirements-dev.txt
  exec .venv/bin/python -m pytest "$@"
fi
shift
# The Python of .venv is what ./test.sh itself tests.
in_venv=$(.venv/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
ran=() skipped=() failed=()
for version in 3.8 3.9 3.10 3.11 3.12; do
  if [ "$version" = "$in_venv" ]; then
    continue
  fi
  if ! command -v "python$version" >/dev/null 2>&1; then
    skipped+=("$version")
    continue
  fi
  echo "=== Python $version" >&2
  if ensure_venv ".venv-$version" requirements-dev.txt "python$version" &&
    ".venv-$version/bin/python" -m pytest "$@"; then
    ran+=("$version")
  else
    failed+=("$version")
  fi
done
echo "Python versions passed: ${ran[*]:-none}; failed: ${failed[*]:-none}; not found: ${skipped[*]:-none}" >&2
[ ${#failed[@]} -eq 0 ] && [ ${#ran[@]} -gt 0 ]
