# Sourced by run.sh and test.sh: makes a virtual environment with a Python that
# farm-ng-core 2.3.2 supports (CPython 3.8-3.12) and installs a requirements file into
# it when that file changed. Quick when there is nothing to do.
#   ensure_venv DIR REQUIREMENTS [PYTHON]   then use "$DIR/bin/python"

supported_python() {
  # The first of $PYTHON, python3, python3.12 ... python3.8 whose version fits.
  local candidate
  for candidate in ${PYTHON:-} python3 python3.12 python3.11 python3.10 python3.9 python3.8; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(not (3, 8) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  local found
  found=$(python3 --version 2>&1 || echo "no python3")
  echo "error: farm-ng-core 2.3.2 needs CPython 3.8 to 3.12 (found: $found);" \
    "install one of those, or name it with PYTHON=/path/to/python3.X" >&2
  return 1
}

ensure_venv() {
  local dir=$1 requirements=$2 python=${3:-}
  if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c '' 2>/dev/null; then
    [ -n "$python" ] || python=$(supported_python) || return 1
    echo "Creating $dir with $("$python" --version 2>&1)" >&2
    rm -rf "$dir"
    "$python" -m venv "$dir" || return 1
  fi
  local stamp="$dir/.installed-$(basename "$requirements")"
  local wanted
  wanted=$(cat requirements*.txt | cksum)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Installing $requirements into $dir" >&2
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements" || return 1
    echo "$wanted" >"$stamp"
  fi
}
