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

missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null; then
  echo "maven peers: missing ${missing[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
echo "maven peers: installing ${missing[*]}" >&2
# (env: sudo would drop DEBIAN_FRONTEND; the lock timeout waits for another apt run)
apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The tests start their own nginx; the package's service is not needed.
if command -v systemctl >/dev/null && systemctl is-active --quiet nginx 2>/dev/null; then
  "${SUDO[@]}" systemctl disable --now nginx >/dev/null 2>&1 || true
fi
