# Sourced by run.sh and test.sh: makes a virtual environment with a Python that
# farm-ng-core 2.3.2 supports (CPython 3.8-3.12) and installs a requirements file into
# it when that file changed. Quick when there is nothing to do. Every problem is one
# "error:" line that says what to do.
#   ensure_venv DIR REQUIREMENTS [PYTHON]   then use "$DIR/bin/python"

SUPPORTED="CPython 3.8 to 3.12 (farm-ng-core 2.3.2 has wheels for those only)"

# pyenv's shims answer for python3.X only when that version is selected: select every
# installed one, the current one first (it stays python3), so that PYTHON=python3.10
# finds 3.10 when it is installed but not selected.
if command -v pyenv >/dev/null 2>&1 && [ -z "${PYENV_VERSION:-}" ]; then
  PYENV_VERSION=$({ pyenv version-name 2>/dev/null; pyenv versions --bare; } | awk 'NF && !seen[$0]++' | paste -sd: -)
  export PYENV_VERSION
fi

python_version() {
  # "3.11" for a Python that runs, nothing otherwise.
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

is_supported() {
  "$1" -c 'import sys; sys.exit(not (sys.implementation.name == "cpython" and (3, 8) <= sys.version_info[:2] <= (3, 12)))' 2>/dev/null
}

supported_python() {
  # $PYTHON if set (it must fit), else the first of python3, python3.12 ... python3.8 that fits.
  if [ -n "${PYTHON:-}" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
      echo "error: PYTHON=$PYTHON: no such program" >&2
      return 1
    fi
    if ! is_supported "$PYTHON"; then
      echo "error: PYTHON=$PYTHON is Python $(python_version "$PYTHON" || echo '?'); this example needs $SUPPORTED" >&2
      return 1
    fi
    echo "$PYTHON"
    return 0
  fi
  local candidate
  for candidate in python3 python3.12 python3.11 python3.10 python3.9 python3.8; do
    if command -v "$candidate" >/dev/null 2>&1 && is_supported "$candidate"; then
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
  if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c '' 2>/dev/null; then
    local have
    have=$(python_version "$dir/bin/python")
    if ! is_supported "$dir/bin/python"; then
      echo "error: $dir has Python $have; this example needs $SUPPORTED." \
        "Remove it (rm -rf $dir) and run again, or name a Python with PYTHON=/path/to/python3.X" >&2
      return 1
    fi
    if [ -z "$python" ] && [ -n "${PYTHON:-}" ]; then
      python=$(supported_python) || return 1
      if [ "$(python_version "$python")" != "$have" ]; then
        echo "error: PYTHON=$PYTHON is Python $(python_version "$python"), but $dir was made with $have:" \
          "remove it (rm -rf $dir) to make it again with PYTHON" >&2
        return 1
      fi
    fi
  else
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
