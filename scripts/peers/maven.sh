#!/usr/bin/env bash
# Real Maven peers for tests/test_maven.py (idempotent; Debian bookworm, run as root or via sudo):
#   mvn (Debian maven 3.8.7) on OpenJDK 17; the plugin packages a tiny build and a SNAPSHOT
#   deploy need (they land in /usr/share/maven-repo, which nginx serves as the test upstream);
#   nginx (also the WebDAV upstream that SNAPSHOTs are deployed to).
set -euo pipefail

packages=(
  maven nginx
  libmaven-resources-plugin-java libmaven-compiler-plugin-java libmaven-jar-plugin-java
  libmaven-install-plugin-java libmaven-deploy-plugin-java libsurefire-java junit4
)
# maven itself only needs a JRE; the compiler plugin needs javac.
command -v javac >/dev/null || packages+=(default-jdk-headless)

. "$(dirname "$0")/lib/apt.sh"
mapfile -t missing < <(apt_missing "${packages[@]}")
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
apt_install "maven peers" "${missing[@]}"
# The tests start their own nginx; the package's service is not needed.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  if [ "$(id -u)" -ne 0 ]; then sudo systemctl disable --now nginx >/dev/null 2>&1 || true
  else systemctl disable --now nginx >/dev/null 2>&1 || true; fi
fi
