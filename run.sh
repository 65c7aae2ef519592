#!/usr/bin/env bash
# One entry point for newcomers and CI; each command sets itself up.
#   ./run.sh serve [ARGS]   the proxy on the built-in defaults (or ./pyproject.toml), on loopback
#   ./run.sh test [ARGS]    lint, types and the whole test suite (ARGS go to pytest)
#   ./run.sh fast [ARGS]    the test suite without the slow real-client tests
set -euo pipefail
cd "$(dirname "$0")"
VENV="${UPSTREAM_VENV:-.venv}"
PY="${PYTHON:-python3}"

setup() {  # $1: extras ("" or "[test]")
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ is needed"'
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  "$VENV/bin/python" -m pip install -q -e ".$1"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  serve)
    setup ""
    exec "$VENV/bin/upstream-proxy" serve "$@"
    ;;
  test|fast)
    setup "[test]"
    # The real registry servers (upstreams) and clients the protocol tests run (apt/npm; idempotent).
    for peer in scripts/peers/*.sh; do
      [ -e "$peer" ] && PATH="$PWD/$VENV/bin:$PATH" bash "$peer"
    done
    "$VENV/bin/ruff" check
    "$VENV/bin/ruff" format --check
    "$VENV/bin/mypy"
    marker=()
    [ "$cmd" = fast ] && marker=(-m "not slow")
    exec "$VENV/bin/python" -m pytest -n 2 "${marker[@]}" "$@"
    ;;
  *)
    # The comment block at the top is the usage: every line after the shebang up to the first
    # line that is not a comment, without its "# ".
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
    exit 2
    ;;
esac
