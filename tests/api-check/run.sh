#!/bin/bash
# make api-check: schemathesis (PyPI) generates requests from docs/openapi.yaml
# against a running `spool serve` (embedded default, temp dir, loopback): no 5xx,
# and the server is still up afterwards.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
command -v schemathesis >/dev/null || python3 -m pip install --quiet schemathesis
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/spool.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[wal]
dir = "$work/wal"
min_free_bytes = 0
TOML
RUST_LOG=warn "$root/target/debug/spool" serve --config "$work/spool.toml" & pid=$!
trap 'kill $pid 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
cd "$here"
SCHEMATHESIS_HOOKS=hooks timeout 600 schemathesis run "$root/docs/openapi.yaml" \
  --url "http://127.0.0.1:$port" --checks not_a_server_error --max-examples "${API_CHECK_EXAMPLES:-30}"
curl -sf "127.0.0.1:$port/healthz" >/dev/null || { echo "the server did not survive the run" >&2; exit 1; }
echo "api-check: no server errors; server still up"
