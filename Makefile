# outbox_pg — build, test and demo on Debian bookworm with PostgreSQL 15.
#   make demo   install what is missing, build, and show events reaching Kafka
#   make test   lint, #[pg_test]s, end-to-end tests and the fault suite, against real Postgres
#               and real Kafka-protocol brokers
#   make bench  the benchmark against a classic polling relay (bench/RESULTS.md)

PG_CONFIG   ?= /usr/bin/pg_config
PGTEST_DIR  ?= /tmp/outbox_pg_pgtest
export PATH := $(HOME)/.cargo/bin:$(PATH)
SUDO        := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all deps install lint pgtest e2e test test-faults demo bench clean

all: install

deps:
	scripts/install-deps.sh

# Release build of the extension into the server's lib and extension directories.
install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(if $(SUDO),--sudo)
	$(SUDO) cp sql/released/*.sql sql/upgrades/*.sql $$($(PG_CONFIG) --sharedir)/extension/

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# #[pg_test]s and unit tests, in a throwaway cluster run as the postgres OS user.
pgtest: deps
	$(SUDO) mkdir -p $(PGTEST_DIR)
	$(SUDO) chown postgres $(PGTEST_DIR)
	cargo pgrx test pg15 --runas postgres --pgdata $(PGTEST_DIR)/data

# End-to-end tests: clusters with the extension preloaded, Tansu and librdkafka's mock cluster.
E2E_TESTS := publishing failures configuration operations ecosystem bad_input security durability copies_and_freezes lifecycle gap_free docs_examples
e2e: install
	rm -f target/lifecycle-figures.md
	cargo test -p outbox_pg_e2e --lib --bins $(addprefix --test ,$(E2E_TESTS)) -- --test-threads=1
	@echo
	@echo "| lifecycle scenario | measured | required |"
	@echo "|---|---|---|"
	@cat target/lifecycle-figures.md

# The fault suite: crashes, shutdowns, broker outages, 2PC, poison events, config faults.
# Prints lost / phantoms / order violations / duplicates per scenario.
test-faults: install
	rm -f target/fault-figures.md
	cargo test -p outbox_pg_e2e --test faults -- --test-threads=1
	@echo
	@echo "| scenario | committed | rolled back | in-doubt committed | received | lost | phantoms | order violations | duplicates (bound) | notes |"
	@echo "|---|---|---|---|---|---|---|---|---|---|"
	@sort target/fault-figures.md

test: deps lint pgtest e2e test-faults

demo: install
	scripts/demo.sh

# outbox_pg against the classic polling relay, one machine, one run (about 30 minutes);
# prints the results table and writes bench/RESULTS.md. `make bench BENCH_ARGS=--quick` for a smoke run.
bench: install
	cargo build --release -p outbox_pg_bench
	target/release/outbox-bench $(BENCH_ARGS)

clean:
	cargo clean
	rm -rf $(PGTEST_DIR) /tmp/outbox_pg_e2e
