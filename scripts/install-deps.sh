#!/usr/bin/env bash
# Installs what outbox_pg needs to build and test on Debian bookworm, skipping what is present:
# PostgreSQL 15 and its headers, clang, cargo-pgrx 0.18.0 (initialised for pg15), Tansu 0.6.0, and
# pgaudit (the tests show emit() is audited).
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang cmake libssl-dev pkg-config sudo openssl socat
          libpostgresql-jdbc-java golang-go golang-github-jackc-pgx-v4-dev postgresql-15-pgaudit)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.0'; then
    echo "==> cargo install cargo-pgrx 0.18.0 (about 7 minutes, once)"
    cargo install cargo-pgrx --version 0.18.0 --locked
fi
if ! grep -qs '^pg15 *=' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "==> cargo pgrx init --pg15 /usr/bin/pg_config"
    cargo pgrx init --pg15 /usr/bin/pg_config
fi
if ! tansu --version 2>/dev/null | grep -q '0\.6\.0'; then
    echo "==> cargo install tansu 0.6.0 (about 17 minutes, once)"
    cargo install tansu --version 0.6.0 --locked --features dynostore
fi

# Client libraries for the documentation examples, which the tests run (docs/examples).
TOOLS="${OUTBOX_TOOLS:-$HOME/.cache/outbox_pg}"
if [ ! -x "$TOOLS/venv/bin/python" ] || ! "$TOOLS/venv/bin/python" -c "import psycopg, confluent_kafka" 2>/dev/null; then
    echo "==> Python venv with psycopg and confluent-kafka in $TOOLS/venv"
    python3 -m venv "$TOOLS/venv"
    "$TOOLS/venv/bin/pip" install --quiet "psycopg[binary]>=3.1" "confluent-kafka>=2.3"
fi
if [ ! -d "$TOOLS/node/node_modules/pg" ]; then
    echo "==> npm install pg in $TOOLS/node"
    mkdir -p "$TOOLS/node"
    npm install --silent --prefix "$TOOLS/node" pg@8
fi
