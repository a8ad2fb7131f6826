#!/bin/bash
# RSS per queued entry: a release `spool serve` whose destination is down (Postgres on a
# closed port, so everything stays queued), N entries of 256 bytes posted in
# 1,000-entry requests; prints (VmRSS after - before) / N.
# Usage: bench/queue-rss.sh [BIN (target/release/spool)] [N (1000000)]
set -euo pipefail
BIN=${1:-target/release/spool}
N=${2:-1000000}
d=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$d/spool.toml" <<EOT
[server]
listen = "127.0.0.1:$port"
[wal]
dir = "$d/wal"
min_free_bytes = 0
[queue]
capacity = $((N + 1000))
[[destination]]
name = "main"
kind = "postgres"
url = "postgres://nobody@127.0.0.1:1/none"
EOT
RUST_LOG=error "$BIN" serve --config "$d/spool.toml" > /dev/null 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$d"' EXIT
python3 - "$port" <<'PY'
import socket, sys, time
end = time.time() + 30
while time.time() < end:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.2).close()
        break
    except OSError:
        time.sleep(0.05)
PY
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; }
before=$(rss)
python3 - "$port" "$N" <<'PY'
import http.client, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
e = '{"pad":"' + "x" * 246 + '"}'
body = ("[" + ",".join([e] * 1000) + "]").encode()
c = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(n // 1000):
    c.request("POST", "/v1/default/entries", body, {"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    assert r.status == 202, r.status
PY
sleep 2
after=$(rss)
echo "{\"bench\":\"queue_rss\",\"queued\":$N,\"rss_before_kib\":$before,\"rss_after_kib\":$after,\"bytes_per_entry\":$(( (after - before) * 1024 / N ))}"
