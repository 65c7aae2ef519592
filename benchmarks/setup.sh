#!/bin/sh
# Install what benchmarks/run.py needs: nginx (the peer to compare with) and wrk
# (the load generator).  Idempotent: does nothing when both are present.
set -eu
missing=""
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$missing nginx"
command -v wrk >/dev/null 2>&1 || missing="$missing wrk"
command -v curl >/dev/null 2>&1 || missing="$missing curl"
if [ -z "$missing" ]; then
    echo "benchmarks/setup.sh: nginx, wrk and curl already installed"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
echo "benchmarks/setup.sh: installing$missing"
$SUDO apt-get update
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends $missing
