# Shared helpers for the scripts: cached virtualenvs that a rerun (or a fresh clone on the same
# machine) reuses, built with uv from the pinned constraints files.
# shellcheck shell=bash

UV_VERSION=0.13.9
CACHE_ROOT=${CONVSVC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/convsvc}

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# find_python VERSION: prints an interpreter for VERSION (e.g. 3.12), preferring pyenv's.
find_python() {
  local want=$1 found=""
  if command -v pyenv >/dev/null 2>&1; then
    local v
    v=$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}(\.[0-9]+)?$" | sort -V | tail -n1)
    if [ -n "$v" ]; then found=$(PYENV_VERSION=$v pyenv which "python$want" 2>/dev/null || true); fi
  fi
  if [ -z "$found" ]; then found=$(command -v "python$want" 2>/dev/null || true); fi
  if [ -z "$found" ] && python3 -c "import sys; sys.exit(f'{sys.version_info[0]}.{sys.version_info[1]}' != '$want')"; then
    found=$(command -v python3)
  fi
  [ -n "$found" ] || { log "no Python $want found (install it, e.g. with pyenv)"; return 1; }
  printf '%s\n' "$found"
}

# uv_bin: prints a uv binary, installing the pinned uv into a small cached venv on first use.
uv_bin() {
  local tools="$CACHE_ROOT/tools"
  if [ ! -x "$tools/bin/uv" ] || [ "$("$tools/bin/uv" --version | awk '{print $2}')" != "$UV_VERSION" ]; then
    log "installing uv $UV_VERSION into $tools"
    python3 -m venv "$tools" >&2
    "$tools/bin/python" -m pip install -q "uv==$UV_VERSION" >&2
  fi
  printf '%s\n' "$tools/bin/uv"
}

# The checkout these scripts belong to. Cached venvs hold it as an editable install, so each
# checkout gets venvs of its own: two checkouts never repoint each other's (uv's cache makes a
# new venv take seconds).
CHECKOUT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECKOUT_ID=$(printf '%s' "$CHECKOUT" | sha256sum | cut -c1-10)

# venv_path NAME PYTHON_VERSION: where this checkout's cached venv of that name lives.
venv_path() { printf '%s\n' "$CACHE_ROOT/venv-$1-py$2-$CHECKOUT_ID"; }

# ensure_venv NAME PYTHON_VERSION CONSTRAINTS REQUIREMENT...: creates (once) and updates a cached
# venv, then prints its path. uv makes the update a fast no-op when nothing changed.
ensure_venv() {
  local name=$1 pyver=$2 constraints=$3; shift 3
  local venv uv py
  venv=$(venv_path "$name" "$pyver")
  uv=$(uv_bin)
  if [ ! -x "$venv/bin/python" ]; then
    py=$(find_python "$pyver")
    log "creating $venv with $py"
    "$uv" venv -q --python "$py" "$venv" >&2
  fi
  "$uv" pip install -q --python "$venv/bin/python" -c "$constraints" "$@" >&2
  printf '%s\n' "$venv"
}

# ensure_debian_packages TEST PACKAGE...: installs the Debian packages unless TEST (a shell
# command) already succeeds.
ensure_debian_packages() {
  local check=$1; shift
  if ! eval "$check" >/dev/null 2>&1; then
    log "installing $* (Debian packages)"
    local sudo_cmd
    sudo_cmd=$([ "$(id -u)" -eq 0 ] || echo sudo)
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "$@" >&2
  fi
}
