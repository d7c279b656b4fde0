#!/usr/bin/env bash
# make demo: a throwaway PostgreSQL 15 cluster with outbox_pg preloaded and a local Tansu broker;
# emits events in a committed and a rolled-back transaction, then prints what reached Kafka.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

PG_PORT="${DEMO_PG_PORT:-54329}"
KAFKA_PORT="${DEMO_KAFKA_PORT:-19092}"
DIR="$(mktemp -d /tmp/outbox_pg_demo.XXXXXX)"
BIN=/usr/lib/postgresql/15/bin
as_pg() { runuser -u postgres -- "$@"; }
[ "$(id -u)" -eq 0 ] || as_pg() { sudo -u postgres "$@"; }

cleanup() {
    as_pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    [ -n "${TANSU_PID:-}" ] && kill "$TANSU_PID" 2>/dev/null || true
    rm -rf "$DIR"
}
trap cleanup EXIT

echo "==> Kafka: Tansu on 127.0.0.1:$KAFKA_PORT"
tansu broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$DIR/tansu.log" 2>&1 &
TANSU_PID=$!
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null && break; sleep 0.2; done
tansu topic create --broker "tcp://127.0.0.1:$KAFKA_PORT" --partitions 3 order.created >/dev/null

echo "==> PostgreSQL 15 on port $PG_PORT with shared_preload_libraries = 'outbox_pg'"
chown postgres "$DIR"
as_pg "$BIN/initdb" -D "$DIR/data" -A trust -U postgres >/dev/null
cat >>"$DIR/data/postgresql.conf" <<CONF
port = $PG_PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'outbox_pg'
outbox.brokers = '127.0.0.1:$KAFKA_PORT'
CONF
as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null

psql_demo() { psql -X -h "$DIR" -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
echo "==> emitting: one committed transaction, one rolled back"
psql_demo <<'SQL'
CREATE EXTENSION outbox_pg;
CREATE TABLE orders (id bigint PRIMARY KEY, customer text, total numeric);

BEGIN;
INSERT INTO orders VALUES (1, 'ada', 42.00), (2, 'grace', 17.50);
SELECT outbox.emit('order.created', o.id, to_jsonb(o)) FROM orders o;
COMMIT;

BEGIN;
INSERT INTO orders VALUES (3, 'mallory', 1000000);
SELECT outbox.emit('order.created', 3, '{"never": "published"}');
ROLLBACK;
SQL
for _ in $(seq 100); do
    left=$(psql_demo -Atc "SELECT count(*) FROM outbox.events WHERE published_at IS NULL")
    [ "$left" = 0 ] && break
    sleep 0.1
done
psql_demo -c "SELECT seq, event_type, aggregate_id, published_at IS NOT NULL AS published, kafka_partition, kafka_offset FROM outbox.events ORDER BY seq"

echo "==> messages on Kafka topic order.created"
cargo run -q --release -p outbox_pg_harness --bin outbox-consume -- "127.0.0.1:$KAFKA_PORT" order.created

echo "==> SELECT * FROM outbox.status"
psql_demo -x -c "SELECT * FROM outbox.status"
