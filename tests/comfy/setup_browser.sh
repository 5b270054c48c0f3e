#!/usr/bin/env bash
# Headless-browser tools for tests/comfy/test_browser.py (idempotent; never downloads a browser build).
#
#   bash tests/comfy/setup_browser.sh
#
# Installs, only where missing:
#   - Debian's chromium (apt-get; as root or through sudo), at /usr/bin/chromium
#   - node + npm (apt-get), to run playwright-core
#   - playwright-core@1.64.1 from npm under <repo>/.comfy/pw/node_modules (git-ignored). playwright-core
#     carries no browser; the tests drive /usr/bin/chromium through it.
# Run bash tests/comfy/setup_comfy.sh as well: the browser tests load the page of a real ComfyUI server.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PW="$REPO/.comfy/pw"
PLAYWRIGHT_VERSION="1.64.1"

SUDO=()
if [ "$(id -u)" != 0 ]; then
    SUDO=(sudo)
fi
APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" = 0 ]; then
        "${SUDO[@]}" apt-get update
        APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y --no-install-recommends "$@"
}

if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm
fi

installed="$(node -p "require('$PW/node_modules/playwright-core/package.json').version" 2>/dev/null || true)"
if [ "$installed" != "$PLAYWRIGHT_VERSION" ]; then
    mkdir -p "$PW"
    [ -f "$PW/package.json" ] || echo '{"name": "dejaguard-browser-tests", "private": true}' > "$PW/package.json"
    (cd "$PW" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --save-exact \
        "playwright-core@$PLAYWRIGHT_VERSION")
fi
echo "browser tools ready: $(/usr/bin/chromium --version 2>/dev/null | head -1); playwright-core $PLAYWRIGHT_VERSION in $PW"
