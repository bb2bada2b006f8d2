#!/usr/bin/env bash
# Install Debian's chromium at /usr/bin/chromium for the browser check (tests/test_ui.py), if it is missing.
# Playwright drives this system browser; its own browser downloads are not used.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "error: /usr/bin/chromium is missing and this is not a Debian-like system: install Chromium so that it is at /usr/bin/chromium" >&2
    exit 1
fi
SUDO=()
if [[ $(id -u) != 0 ]]; then
    SUDO=(sudo)
fi
echo "Installing chromium with apt-get (for the browser check)"
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
