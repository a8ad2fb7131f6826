#!/bin/bash
# spool-bench client against a release `spool serve` (SQLite, sync = always):
# fire-and-forget throughput and ingest_sync latency, with the client's CPU per
# entry as a ratio of the server's (both processes measured in the same run).
# Usage: bench/client-bench.sh [SECONDS]   (loopback only)
set -euo pipefail
secs=${1:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
source "$root/bench/serve.sh"
work=$(mktemp -d)
port=7172
pid=
trap '[ -n "$pid" ] && kill -TERM $pid 2>/dev/null; rm -rf "$work"' EXIT
for run in "fire 64 5" "fire 64 0" "sync 64 5" "sync 64 0" "sync 1 5" "sync 1 0"; do
  set -- $run
  start_spool "$work/data" $port always
  "$root/target/release/spool-bench" client --url "http://127.0.0.1:$port" --mode "$1" \
    --producers "$2" --seconds "$secs" --server-pid "$pid" --max-delay-ms "$3"
  stop_spool
done
