#!/usr/bin/env bash
# A real browser for the UI and HTML-report tests (tests/browser.py; idempotent; Debian bookworm,
# run as root or via sudo):
#   chromium         Debian's Chromium, driven headless
#   chromium-driver  its ChromeDriver (/usr/bin/chromedriver), which Selenium talks to
# Selenium itself comes from the test extra; it is pointed at these two files and never
# downloads a browser or driver of its own.
set -euo pipefail
packages=(chromium chromium-driver)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "browser peers: missing ${missing[*]} and no apt-get here; install them by hand" >&2
  exit 1
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  SUDO=(sudo)
fi
echo "browser peers: installing ${missing[*]}" >&2
apt=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600)
"${apt[@]}" update -qq
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
