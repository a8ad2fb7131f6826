#!/usr/bin/env python3
"""spool against what users would pick instead, at the same durability (fsync
before acknowledgement), on this machine, in one run (`make bench-peers`).

- spool, wal.sync=always: single-entry requests and 100-entry requests (spool-bench http)
- spool, wal.sync=never: the same server without durability (the ceiling)
- Postgres: single-row INSERT commits, synchronous_commit=on, fsync=on (pgbench,
  custom script) against a throwaway server
- Redis: appendonly yes, appendfsync always, LPUSH of the same payload (redis-benchmark)

All bound to 127.0.0.1, in temp dirs, torn down after. Prints a table with the
ratios spool ÷ peer and writes docs/benchmarks/peers.json and peers-*.png.
Usage: bench/peers.py [--seconds S] [--conns 1,16,64,256]
"""
import argparse
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = os.path.join(ROOT, "target", "release")
PAYLOAD = '{"pad":"' + "x" * 246 + '"}'  # 256 bytes, as spool-bench's entries


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=30):
    end = time.time() + limit
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on {port}")


def percentile(sorted_vals, p):
    if not sorted_vals:
        return 0.0
    return sorted_vals[min(len(sorted_vals) - 1, round((len(sorted_vals) - 1) * p))]


def ensure_debian(binary, package):
    if shutil.which(binary):
        return
    print(f"installing {package} (Debian) for {binary}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env)
    # Debian starts the service on install: this benchmark runs its own.
    subprocess.run(["service", "redis-server", "stop"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


# --- spool ------------------------------------------------------------------

def serve(d, port, sync, capacity, destination):
    """Start a release `spool serve` in `d` (config written there) and wait for it."""
    cfg = os.path.join(d, "spool.toml")
    with open(cfg, "w") as f:
        f.write(f"""[server]
listen = "127.0.0.1:{port}"
[wal]
dir = "{d}/wal"
sync = "{sync}"
min_free_bytes = 0
[queue]
capacity = {capacity}
[[destination]]
name = "main"
{destination}
""")
    srv = subprocess.Popen([os.path.join(REL, "spool"), "serve", "--config", cfg],
                           env=dict(os.environ, RUST_LOG="warn"))
    try:
        wait_port(port)
    except BaseException:
        srv.kill()
        raise
    return srv


def spool_runs(work, sync, conns, seconds, batch):
    port = free_port()
    d = os.path.join(work, f"spool-{sync}-{conns}-{batch}")
    os.makedirs(d)
    srv = serve(d, port, sync, 1000000, f'kind = "sqlite"\npath = "{d}/spool.db"')
    try:
        out = subprocess.run([os.path.join(REL, "spool-bench"), "http", "--url", f"http://127.0.0.1:{port}",
                              "--connections", str(conns), "--batch", str(batch), "--seconds", str(seconds)],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        return {"per_sec": r["accepted_per_sec"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                "errors": r["errors"], "shed": r["shed"]}
    finally:
        srv.terminate()
        srv.wait(60)
        shutil.rmtree(d, ignore_errors=True)


def scrape(port, name):
    """The sum of a metric's samples on a running server's /metrics."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines()
               if l.startswith(name + "{") or l.startswith(name + " "))


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for l in f:
            if l.startswith("VmHWM:"):
                return round(int(l.split()[1]) / 1024, 1)
    return 0.0


def sustained(work, conns, batch, seconds, drain_limit=600):
    """Closed-loop load with delivery watched: accepted vs delivered during the
    load, the backlog when the load stops, and the time to drain it."""
    port = free_port()
    d = os.path.join(work, f"sustained-{conns}-{batch}")
    os.makedirs(d)
    srv = serve(d, port, "always", 5000000, f'kind = "sqlite"\npath = "{d}/spool.db"')
    try:
        out = subprocess.run([os.path.join(REL, "spool-bench"), "http", "--url", f"http://127.0.0.1:{port}",
                              "--connections", str(conns), "--batch", str(batch), "--seconds", str(seconds),
                              "--delivery"], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        start = time.time()
        backlog = scrape(port, "spool_queue_depth")
        while scrape(port, "spool_queue_depth") > 0 and time.time() - start < drain_limit:
            time.sleep(0.1)
        drain = round(time.time() - start, 1)
        return {"connections": conns, "batch": batch, "accepted_per_sec": r["accepted_per_sec"],
                "delivered_per_sec": r["delivered_per_sec"], "backlog_at_end": int(backlog),
                "drain_seconds": drain, "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
                "peak_rss_mib": rss_mib(srv.pid)}
    finally:
        srv.terminate()
        srv.wait(120)
        shutil.rmtree(d, ignore_errors=True)


def replay_rate(work, entries=1000000):
    """`spool replay` of `entries` retained (delivered) entries into an empty
    SQLite, as an operator rebuilding a lost destination would."""
    port = free_port()
    d = os.path.join(work, "replay")
    os.makedirs(d)
    srv = serve(d, port, "never", 5000000, f'kind = "sqlite"\npath = "{d}/spool.db"')
    try:
        while scrape(port, "spool_entries_accepted_total") < entries:
            subprocess.run([os.path.join(REL, "spool-bench"), "http", "--url", f"http://127.0.0.1:{port}",
                            "--connections", "16", "--batch", "100", "--seconds", "2"],
                           check=True, capture_output=True)
        while scrape(port, "spool_queue_depth") > 0:
            time.sleep(0.2)
        stored = int(scrape(port, "spool_entries_accepted_total"))
    finally:
        srv.terminate()
        srv.wait(120)
    for f in glob.glob(os.path.join(d, "spool.db*")):
        os.remove(f)
    start = time.time()
    out = subprocess.run([os.path.join(REL, "spool"), "replay", "--config", os.path.join(d, "spool.toml"),
                          "--destination", "main", "--json"], check=True, capture_output=True, text=True).stdout
    took = time.time() - start
    r = json.loads(out.strip().splitlines()[-1])
    shutil.rmtree(d, ignore_errors=True)
    return {"entries": stored, "replayed": r.get("replayed"), "seconds": round(took, 1),
            "per_sec": round(r.get("replayed", 0) / took)}


def wrk_cell(work, conns, seconds):
    """One cell measured with wrk (Debian), so readers can reproduce it with a
    tool they know: single-entry durable writes at `conns` connections."""
    ensure_debian("wrk", "wrk")
    port = free_port()
    d = os.path.join(work, f"wrk-{conns}")
    os.makedirs(d)
    script = os.path.join(d, "post.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                f"wrk.body = '{PAYLOAD}'\n"
                'done = function(summary, latency, requests)\n'
                '  io.write(string.format("WRKJSON {\\"non2xx\\":%d,\\"errors\\":%d}\\n",\n'
                '    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))\n'
                'end\n')
    srv = serve(d, port, "always", 1000000, f'kind = "sqlite"\npath = "{d}/spool.db"')
    try:
        out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{int(seconds)}s", "--latency", "-s", script,
                              f"http://127.0.0.1:{port}/v1/default/entries"],
                             check=True, capture_output=True, text=True).stdout
    finally:
        srv.terminate()
        srv.wait(60)
        shutil.rmtree(d, ignore_errors=True)

    def ms(v):
        unit = v.lstrip("0123456789.")
        return round(float(v[: len(v) - len(unit)]) * {"us": 0.001, "ms": 1, "s": 1000}[unit], 2)
    rps = next(float(l.split()[1]) for l in out.splitlines() if l.startswith("Requests/sec:"))
    pct = {l.split()[0]: ms(l.split()[1]) for l in out.splitlines() if l.strip()[:3] in ("50%", "99%")}
    extra = json.loads(next(l for l in out.splitlines() if l.startswith("WRKJSON")).split(" ", 1)[1])
    return {"per_sec": round(rps), "p50_ms": pct.get("50%"), "p99_ms": pct.get("99%"), **extra}


# --- Postgres ---------------------------------------------------------------

def pg_bindir():
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    ensure_debian("pg_ctlcluster", "postgresql")
    return pg_bindir()


class Postgres:
    def __init__(self, work):
        self.bin = pg_bindir()
        self.dir = os.path.join(work, "pg")
        os.makedirs(self.dir)
        shutil.chown(work, "postgres")
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        as_pg = ["runuser", "-u", "postgres", "--"]
        subprocess.run(as_pg + [f"{self.bin}/initdb", "-D", self.dir, "-A", "trust", "-U", "postgres"],
                       check=True, capture_output=True)
        self.proc = subprocess.Popen(as_pg + [f"{self.bin}/postgres", "-D", self.dir, "-p", str(self.port),
                                              "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
                                              "-c", "synchronous_commit=on", "-c", "max_connections=300",
                                              "-c", "shared_buffers=256MB", "-k", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        time.sleep(0.5)
        self.psql("CREATE TABLE entries (id uuid PRIMARY KEY, payload jsonb NOT NULL, "
                  "created_at timestamptz NOT NULL DEFAULT now())")

    def psql(self, sql):
        subprocess.run([f"{self.bin}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                        "-X", "-q", "-c", sql], check=True)

    def bench(self, work, conns, seconds):
        self.psql("TRUNCATE entries")
        script = os.path.join(work, "insert.sql")
        with open(script, "w") as f:
            f.write(f"INSERT INTO entries (id, payload) VALUES (gen_random_uuid(), '{PAYLOAD}');\n")
        logs = os.path.join(work, f"pgbench-{conns}")
        os.makedirs(logs)
        out = subprocess.run([f"{self.bin}/pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                              "-n", "-M", "prepared", "-f", script, "-c", str(conns), "-j", str(min(conns, 2)),
                              "-T", str(seconds), "-l", "--log-prefix", os.path.join(logs, "tx"), "postgres"],
                             check=True, capture_output=True, text=True, cwd=logs).stdout
        tps = next(float(l.split("=")[1].split()[0]) for l in out.splitlines() if l.startswith("tps"))
        lat = []
        for p in glob.glob(os.path.join(logs, "tx*")):
            with open(p) as f:
                lat.extend(int(l.split()[2]) / 1000.0 for l in f if l.strip())
        lat.sort()
        shutil.rmtree(logs)
        return {"per_sec": round(tps), "p50_ms": round(percentile(lat, 0.5), 2),
                "p99_ms": round(percentile(lat, 0.99), 2)}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


# --- Redis ------------------------------------------------------------------

class Redis:
    def __init__(self, work):
        ensure_debian("redis-server", "redis-server")
        ensure_debian("redis-benchmark", "redis-tools")
        self.dir = os.path.join(work, "redis")
        os.makedirs(self.dir)
        self.port = free_port()
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--dir", self.dir, "--appendonly", "yes", "--appendfsync", "always",
                                      "--save", "", "--protected-mode", "yes"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def bench(self, conns, seconds, guess_rate):
        n = max(2000, int(guess_rate * seconds))
        out = subprocess.run(["redis-benchmark", "-p", str(self.port), "-h", "127.0.0.1", "-c", str(conns),
                              "-n", str(n), "-d", "256", "-t", "lpush", "--csv", "-q"],
                             check=True, capture_output=True, text=True).stdout
        rows = [l for l in out.splitlines() if l.startswith('"LPUSH')]
        cols = [c.strip('"') for c in rows[-1].split('","')]
        # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
        return {"per_sec": round(float(cols[1])), "p50_ms": float(cols[4]), "p99_ms": float(cols[6])}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(60)


def plot(results, conns, out_dir):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install matplotlib): no plots", file=sys.stderr)
        return
    for metric, label in (("per_sec", "writes acknowledged / s (log)"), ("p99_ms", "p99 latency, ms (log)")):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for system, by_c in results.items():
            xs = [c for c in conns if str(c) in by_c]
            ax.plot(xs, [by_c[str(c)][metric] for c in xs], marker="o", label=system)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(conns, [str(c) for c in conns])
        ax.set_xlabel("concurrent connections")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("spool vs peers, fsync before acknowledgement")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, f"peers-{metric.replace('_', '-')}.png"), dpi=110)
        plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--conns", default="1,16,64,256")
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks"))
    ap.add_argument("--replay-entries", type=int, default=1000000)
    ap.add_argument("--skip-sustained", action="store_true",
                    help="only the peer table (no sustained, replay or wrk runs)")
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",")]
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="spool-peers-")
    os.chmod(work, 0o755)
    results = {k: {} for k in ("spool durable", "spool durable, 100/request", "spool sync=never",
                               "Postgres INSERT commit", "Redis appendfsync always")}
    pg = redis = None
    extra = {}
    try:
        pg = Postgres(work)
        redis = Redis(work)
        for c in conns:
            s = a.seconds
            results["spool durable"][str(c)] = spool_runs(work, "always", c, s, 1)
            results["spool durable, 100/request"][str(c)] = spool_runs(work, "always", c, s, 100)
            results["spool sync=never"][str(c)] = spool_runs(work, "never", c, s, 1)
            results["Postgres INSERT commit"][str(c)] = pg.bench(work, c, int(s))
            guess = results["spool durable"][str(c)]["per_sec"]
            results["Redis appendfsync always"][str(c)] = redis.bench(c, s, guess)
            print(json.dumps({"connections": c, **{k: v[str(c)] for k, v in results.items()}}), flush=True)
        if not a.skip_sustained:
            ends = [sustained(work, 64, 1, a.seconds), sustained(work, 16, 100, a.seconds)]
            for r in ends:
                print(json.dumps({"sustained": r}), flush=True)
            extra["sustained"] = ends
            extra["replay"] = replay_rate(work, a.replay_entries)
            print(json.dumps({"replay": extra["replay"]}), flush=True)
            extra["wrk_64"] = {"wrk": wrk_cell(work, 64, a.seconds),
                               "spool-bench": results["spool durable"].get("64")}
            print(json.dumps({"wrk_64": extra["wrk_64"]}), flush=True)
    finally:
        if pg:
            pg.stop()
        if redis:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cpus, {machine}",
           "seconds": a.seconds, "payload_bytes": len(PAYLOAD), "results": results, **extra}
    with open(os.path.join(a.out, "peers.json"), "w") as f:
        json.dump(doc, f, indent=1)
    plot(results, conns, a.out)

    print("\n| connections | system | writes/s | p50 ms | p99 ms |")
    print("|---:|---|---:|---:|---:|")
    for c in conns:
        for system, by_c in results.items():
            r = by_c[str(c)]
            print(f"| {c} | {system} | {r['per_sec']:,.0f} | {r['p50_ms']} | {r['p99_ms']} |")
    print("\n| connections | spool ÷ Redis | spool ÷ Postgres | spool ÷ spool sync=never | spool 100/request entries/s ÷ Postgres |")
    print("|---:|---:|---:|---:|---:|")
    for c in conns:
        sp = results["spool durable"][str(c)]["per_sec"]
        ratio = lambda k: sp / max(results[k][str(c)]["per_sec"], 1)
        batch = results["spool durable, 100/request"][str(c)]["per_sec"] / max(results["Postgres INSERT commit"][str(c)]["per_sec"], 1)
        print(f"| {c} | {ratio('Redis appendfsync always'):.2f} | {ratio('Postgres INSERT commit'):.2f} | "
              f"{ratio('spool sync=never'):.2f} | {batch:.1f} |")
    if extra.get("sustained"):
        print("\n| sustained, SQLite | accepted entries/s | delivered/s during load | backlog at end | drain s | p50 / p99 ms | peak RSS MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in extra["sustained"]:
            print(f"| {r['batch']}/request, {r['connections']} conns | {r['accepted_per_sec']:,.0f} | "
                  f"{r['delivered_per_sec']:,.0f} | {r['backlog_at_end']:,} | {r['drain_seconds']} | "
                  f"{r['p50_ms']} / {r['p99_ms']} | {r['peak_rss_mib']} |")
        r = extra["replay"]
        print(f"\nreplay: {r['replayed']:,} entries into an empty SQLite in {r['seconds']} s = {r['per_sec']:,.0f}/s")
        w = extra["wrk_64"]
        print(f"wrk cross-check, durable single entries @64: wrk {w['wrk']['per_sec']:,}/s "
              f"(p50 {w['wrk']['p50_ms']} ms, p99 {w['wrk']['p99_ms']} ms, non-2xx {w['wrk']['non2xx']}) vs "
              f"spool-bench {w['spool-bench']['per_sec']:,.0f}/s" if w.get("spool-bench") else "")


if __name__ == "__main__":
    main()
