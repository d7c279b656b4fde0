# outbox_pg — build, test and demo on Debian bookworm with PostgreSQL 14–18 (15 by default).
#   make demo   install what is missing, build, and show events reaching Kafka
#   make test   lint, #[pg_test]s, end-to-end tests and the fault suite, against real Postgres
#               and real Kafka-protocol brokers
#   make bench  the benchmark against a classic polling relay (bench/RESULTS.md)
#   make bench-hour  the old-snapshot scenario with a snapshot held an hour (bench/RESULTS-hour.md)
#
# The server: PG=14|15|16|17|18 (15, Debian's, by default; the others are fetched and cached in
# $(PG_SERVERS) by scripts/install-deps.sh), or PG_CONFIG=/path/to/pg_config for any install,
# whose version is then read from it.

PG_SERVERS  ?= /opt/outbox_pg
export OUTBOX_PG_SERVERS := $(PG_SERVERS)
comma       := ,
ifeq ($(origin PG_CONFIG),undefined)
PG          ?= 15
PG_CONFIG   := $(if $(filter 15,$(PG)),/usr/bin/pg_config,$(PG_SERVERS)/postgresql-$(PG)/bin/pg_config)
else
PG          := $(shell $(PG_CONFIG) --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
# A server of your own: nothing is fetched for it.
PG_OWN      := yes
endif
ifeq ($(filter $(PG),14 15 16 17 18),)
$(error PostgreSQL $(PG) is not supported: 14, 15, 16, 17 or 18)
endif
# Where the tests and the bench find initdb, pg_ctl, pg_dump, pgbench (read after deps ran).
export OUTBOX_PG_BIN = $(shell $(PG_CONFIG) --bindir)
PGTEST_DIR  ?= /tmp/outbox_pg_pgtest_$(PG)
export PATH := $(HOME)/.cargo/bin:$(PATH)
SUDO        := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: all deps install uninstall package lint unit pgtest e2e test test-faults test-core test-packages demo bench bench-hour clean

all: install

deps:
	scripts/install-deps.sh $(if $(PG_OWN),,$(PG))

# Release build of the extension into the server's lib and extension directories.
install: deps
	cargo pgrx install --release --pg-config $(PG_CONFIG) $(if $(SUDO),--sudo)
	$(SUDO) cp sql/released/*.sql sql/upgrades/*.sql $$($(PG_CONFIG) --sharedir)/extension/

# Removes what `make install` put into the server's directories (not files a package owns).
uninstall:
	@lib=$$($(PG_CONFIG) --pkglibdir); ext=$$($(PG_CONFIG) --sharedir)/extension; \
	for f in $$lib/outbox_pg.so $$ext/outbox_pg.control $$ext/outbox_pg--*.sql; do \
	    [ -e "$$f" ] || continue; \
	    if owner=$$(dpkg -S "$$f" 2>/dev/null); then \
	        echo "uninstall: $$f belongs to the package $${owner%%:*}; remove it with dpkg -r / apt remove" >&2; exit 1; \
	    fi; \
	    echo "rm $$f"; $(SUDO) rm -f "$$f"; \
	done

# Binary packages for every major present (PACKAGE_MAJORS to choose): target/package/*.deb and
# *.tar.gz. See scripts/package.sh.
package: deps
	scripts/package.sh $(PACKAGE_MAJORS)

# The crate without Postgres: envelope, validation, ordering, the producer (seconds).
unit:
	cargo test -p outbox_pg_core

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

# #[pg_test]s and unit tests, in a throwaway cluster run as the postgres OS user. One test at a
# time: several take ACCESS EXCLUSIVE on outbox.events (ALTER TABLE, CREATE INDEX), which can
# deadlock beside another test's transaction in the same database.
pgtest: deps
	$(SUDO) mkdir -p $(PGTEST_DIR)
	$(SUDO) chown postgres $(PGTEST_DIR)
	RUST_TEST_THREADS=1 cargo pgrx test pg$(PG) --runas postgres --pgdata $(PGTEST_DIR)/data

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

test: deps lint unit pgtest e2e test-faults $(if $(filter 15,$(PG)),test-packages)

# The core of the suite, for the other majors in CI: #[pg_test]s, publishing, both upgrades,
# and the fault suite's crash, failover, broker and 2PC scenarios.
CORE_FAULTS := kill_9 immediate_shutdown asynchronous_commit failover tansu_broker mock_broker_down two_phase permanent_failures
test-core: deps pgtest install
	cargo test -p outbox_pg_e2e --test publishing -- --test-threads=1
	cargo test -p outbox_pg_e2e --test ecosystem upgrading -- --test-threads=1
	rm -f target/fault-figures.md
	cargo test -p outbox_pg_e2e --test faults -- --test-threads=1 $(CORE_FAULTS)
	@sort target/fault-figures.md

# The packages as an operator installs them, on 15: the previous release's .deb (0.2.0, built from git),
# events flowing, the current .deb over it, the update; then the tarball on 17 with the
# publishing tests. Leaves the source build installed again.
PREVIOUS_RELEASE := ba7457549d8528498979d1d9cc8ee00c57847792
test-packages:
	scripts/install-deps.sh 17
	scripts/package.sh 15 17
	cd target/package && sha256sum *.deb *.tar.gz > SHA256SUMS
	scripts/package.sh 15 17 >/dev/null
	cd target/package && sha256sum --check SHA256SUMS
	rm -rf target/previous-release target/package-previous
	mkdir -p target/previous-release
	git archive $(PREVIOUS_RELEASE) | tar -x -C target/previous-release
	PACKAGE_SOURCE=target/previous-release PACKAGE_DIR=target/package-previous \
	    SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct $(PREVIOUS_RELEASE)) \
	    CARGO_TARGET_DIR=$(CURDIR)/target/previous-release-build scripts/package.sh 15
	$(MAKE) uninstall PG=15
	cargo test -p outbox_pg_e2e --test packages -- --test-threads=1 --nocapture
	$(SUDO) dpkg --purge postgresql-15-outbox-pg
	$(MAKE) uninstall PG=17
	rm -rf target/tarball && mkdir -p target/tarball
	tar -xzf target/package/outbox_pg-*-pg17-linux-amd64.tar.gz -C target/tarball
	$(SUDO) target/tarball/outbox_pg-*-pg17-linux-amd64/install.sh $(PG_SERVERS)/postgresql-17/bin/pg_config
	OUTBOX_PG_BIN=$(PG_SERVERS)/postgresql-17/bin cargo test -p outbox_pg_e2e --test publishing -- --test-threads=1
	$(MAKE) install PG=15

demo: install
	scripts/demo.sh

# outbox_pg against the classic polling relay, one machine, one run (about 1 h 50 min);
# prints the results table and writes bench/RESULTS.md. `make bench BENCH_ARGS=--quick` for a smoke run.
# `make bench-hour`: the old-snapshot scenario with a snapshot held an hour, then 20 minutes
# after it closed (about 80 min), written to bench/RESULTS-hour.md.
# Scenario 6 compares the majors in BENCH_VERSIONS (default 15,17), each installed here first.
BENCH_VERSIONS ?= 15,17
export BENCH_VERSIONS
# The commit the report names: taken when make starts, before it builds and installs.
export BENCH_COMMIT := $(shell git describe --always --dirty 2>/dev/null)
bench: install
	for v in $(subst $(comma), ,$(BENCH_VERSIONS)); do [ "$$v" = "$(PG)" ] || $(MAKE) install PG=$$v; done
	cargo build --release -p outbox_pg_bench
	target/release/outbox-bench $(BENCH_ARGS)

bench-hour: install
	cargo build --release -p outbox_pg_bench
	target/release/outbox-bench old-snapshot --minutes=60 --after=20 --report=bench/RESULTS-hour.md

clean:
	cargo clean
	rm -rf $(PGTEST_DIR) /tmp/outbox_pg_e2e
