# Sourced by the bench scripts: start_spool DIR PORT SYNC starts a release
# `spool serve` on a fresh DIR (SQLite, queue capacity 100,000, loopback) and
# waits for /healthz; its pid is in $pid. stop_spool stops it (SIGTERM, drain).
start_spool() {
  local dir=$1 port=$2 sync=$3
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[wal]
dir = "$dir/wal"
sync = "$sync"
min_free_bytes = 0
[queue]
capacity = 100000
[[destination]]
name = "main"
kind = "sqlite"
path = "$dir/spool.db"
TOML
  RUST_LOG=warn "$root/target/release/spool" serve --config "$dir.toml" & pid=$!
  for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && return; sleep 0.1; done
  echo "spool did not come up on $port" >&2; return 1
}

stop_spool() {
  kill -TERM "$pid"; wait "$pid"; pid=
}
