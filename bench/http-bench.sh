#!/bin/bash
# spool-bench http against a release `spool serve` (SQLite destination) with
# wal.sync = always and = never, in one run, so the ratio is measured on one
# machine state. Usage: bench/http-bench.sh [SECONDS]   (loopback only)
set -euo pipefail
secs=${1:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
port=7171
for mode in always never; do
  for shape in "64 1" "64 100" "16 100"; do
    set -- $shape
    rm -rf "$work/$mode"; mkdir -p "$work/$mode"
    cat > "$work/$mode.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[wal]
dir = "$work/$mode/wal"
sync = "$mode"
min_free_bytes = 0
[queue]
capacity = 100000
[[destination]]
name = "main"
kind = "sqlite"
path = "$work/$mode/spool.db"
TOML
    RUST_LOG=warn "$root/target/release/spool" serve --config "$work/$mode.toml" & pid=$!
    for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
    "$root/target/release/spool-bench" http --url "http://127.0.0.1:$port" --connections "$1" --batch "$2" --seconds "$secs" \
      | sed "s/^{/{\"sync\":\"$mode\",/"
    kill -TERM $pid; wait $pid
  done
done
