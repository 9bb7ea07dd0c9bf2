#!/usr/bin/env bash
# Debian's headless Chromium + ChromeDriver for the playground's browser test
# (tests/test_playground_browser.py uses /usr/bin/chromium and /usr/bin/chromedriver).
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
    echo "install_chromium.sh: no apt-get; install Chromium and a matching ChromeDriver as /usr/bin/chromium and /usr/bin/chromedriver" >&2
    exit 1
fi
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
/usr/bin/chromedriver --version
