#!/usr/bin/env bash
# A real browser for the UI and HTML-report tests (tests/browser.py; idempotent; Debian bookworm,
# run as root or via sudo):
#   chromium         Debian's Chromium, driven headless
#   chromium-driver  its ChromeDriver (/usr/bin/chromedriver), which Selenium talks to
# Selenium itself comes from the test extra; it is pointed at these two files and never
# downloads a browser or driver of its own.
set -euo pipefail
. "$(dirname "$0")/lib/apt.sh"
mapfile -t missing < <(apt_missing chromium chromium-driver)
if [ "${#missing[@]}" -gt 0 ]; then
  apt_install "browser peers" "${missing[@]}"
fi
