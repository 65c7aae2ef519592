#!/usr/bin/env bash
# Real npm peers for tests/test_npm.py (idempotent):
#   node + npm (Debian packages if missing), and verdaccio 6 installed project-locally
#   into .peers/npm/ (the upstream registry the tests publish to and then proxy).
# verdaccio 6.8 pins a node-fetch that some registry mirrors do not carry; the
# override picks the 2.x release it works with.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=.peers/npm
VERDACCIO="$DIR/node_modules/.bin/verdaccio"

if ! command -v npm >/dev/null || ! command -v node >/dev/null; then
  if ! command -v apt-get >/dev/null; then
    echo "npm peers: node/npm missing and no apt-get here; install Node.js 18+ by hand" >&2
    exit 1
  fi
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    SUDO=(sudo)
  fi
  echo "npm peers: installing nodejs npm" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 update -qq
  "${SUDO[@]}" apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

if [ -x "$VERDACCIO" ]; then
  exit 0
fi

echo "npm peers: installing verdaccio 6 into $DIR" >&2
mkdir -p "$DIR"
cat >"$DIR/package.json" <<'EOF'
{
  "name": "pytest-upstream-npm-peers",
  "private": true,
  "description": "verdaccio for tests/test_npm.py (installed by scripts/peers/npm.sh)",
  "dependencies": { "verdaccio": "^6.8.0" },
  "overrides": { "node-fetch": "2.7.0" }
}
EOF
(cd "$DIR" && npm install --no-audit --no-fund --loglevel=error)
"$VERDACCIO" --version >/dev/null
