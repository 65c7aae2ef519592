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
  . scripts/peers/lib/apt.sh
  apt_install "npm peers" nodejs npm
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
