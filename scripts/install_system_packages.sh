#!/usr/bin/env bash
# Debian packages the project needs beyond its Python venv (CI runs this through `make setup` on a fresh
# machine). Idempotent: installs only what is missing, and runs `apt-get update` only then.
# Services are not started here: the code that needs one starts it (sum_pipeline/postgres.py starts the
# PostgreSQL cluster with pg_ctlcluster).
set -euo pipefail

PACKAGES=(
    postgresql        # the PostgreSQL profile of the Airflow metadata DB (airflow.metadata_db: postgresql)
    redis-server      # the Redis profile of the Feast online store (feature_store.online_store: redis)
    chromium          # headless browser for the Airflow UI test (tests/integration/ui_browser.py)
    chromium-driver   # its WebDriver companion (/usr/bin/chromedriver)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" != "installed" ]; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages: all installed (${PACKAGES[*]})"
    exit 0
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi
echo "system packages: installing ${missing[*]}"
"${as_root[@]}" apt-get update
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
