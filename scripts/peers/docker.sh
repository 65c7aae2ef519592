#!/usr/bin/env bash
# Real OCI peers for tests/test_docker.py (idempotent; Debian bookworm, run as root or via sudo):
#   docker-registry  CNCF distribution 2.8 (the upstream registry, started by the tests)
#   skopeo           the client that pushes test images and pulls them through the proxy
#   htpasswd         (apache2-utils) the Basic-auth user file for the registry
#   openssl          key, certificate and RS256 signatures for the tests' token server
set -euo pipefail
need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v htpasswd >/dev/null || need+=(apache2-utils)
command -v openssl >/dev/null || need+=(openssl)
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
. "$(dirname "$0")/lib/apt.sh"
apt_install "docker peers" "${need[@]}"
