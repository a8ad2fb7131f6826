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
    a = ap.parse_args()
    conns = [int(c) for c in a.conns.split(",")]
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="spool-peers-")
    os.chmod(work, 0o755)
    results = {k: {} for k in ("spool durable", "spool durable, 100/request", "spool sync=never",
                               "Postgres INSERT commit", "Redis appendfsync always")}
    pg = redis = None
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
    finally:
        if pg:
            pg.stop()
        if redis:
            redis.stop()
        shutil.rmtree(work, ignore_errors=True)

    machine = subprocess.run(["uname", "-srm"], capture_output=True, text=True).stdout.strip()
    doc = {"date": time.strftime("%Y-%m-%d"), "machine": f"{os.cpu_count()} cpus, {machine}",
           "seconds": a.seconds, "payload_bytes": len(PAYLOAD), "results": results}
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


if __name__ == "__main__":
    main()
