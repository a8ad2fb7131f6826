#!/bin/bash
# spool-bench http against a release `spool serve` (SQLite destination) with
# wal.sync = always and = never, in one run, so the ratio is measured on one
# machine state. Usage: bench/http-bench.sh [SECONDS]   (loopback only)
set -euo pipefail
secs=${1:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/bench/serve.sh"
work=$(mktemp -d)
port=7171
pid=
trap '[ -n "$pid" ] && kill -TERM $pid 2>/dev/null; rm -rf "$work"' EXIT
for mode in always never; do
  for shape in "64 1" "64 100" "16 100"; do
    set -- $shape
    start_spool "$work/$mode" $port $mode
    "$root/target/release/spool-bench" http --url "http://127.0.0.1:$port" --connections "$1" --batch "$2" --seconds "$secs" \
      | sed "s/^{/{\"sync\":\"$mode\",/"
    stop_spool
  done
done
