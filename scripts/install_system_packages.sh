#!/usr/bin/env bash
# Debian packages the project needs on a fresh machine (CI runs this from .ci/run before `make setup`).
# Idempotent: `apt-get update` and `apt-get install` run only when a listed package is missing.
# Needs root (CI and the development machines run as root); prefixes sudo otherwise.
set -euo pipefail

PACKAGES=(
    chromium          # headless browser for the Airflow UI tests (tests/integration/ui_browser.py)
    chromium-driver   # its WebDriver/CDP companion (/usr/bin/chromedriver)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages: all installed (${PACKAGES[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "system packages: installing ${missing[*]}"
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
