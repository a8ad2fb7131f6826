#!/usr/bin/env python3
"""Sustained end-to-end runs (`make bench-sustained`): spool-bench http at a fixed
rate (single-entry requests, 64 connections, open loop) against a release server
with a SQLite and then a Postgres destination (a throwaway server, fsync on).
For each rate: accepted/s, delivered/s, queue depth over the run and the
accept → delivered latency (from the server's histogram). The highest rate at
which accepted = offered = delivered with a flat queue is printed per destination.
Usage: bench/sustained.py [--seconds 60] [--rates 6000,10000,14000]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import REL, Postgres, free_port, serve  # noqa: E402


def run(work, dest, pg, rate, seconds, n):
    port = free_port()
    d = os.path.join(work, f"run{n}")
    os.makedirs(d)
    if dest == "sqlite":
        destination = f'kind = "sqlite"\npath = "{d}/spool.db"'
    else:
        pg.psql(f"CREATE DATABASE run{n}")
        destination = f'kind = "postgres"\nurl = "postgres://postgres@127.0.0.1:{pg.port}/run{n}"\npool_size = 8'
    srv = serve(d, port, "always", 200000, destination)
    try:
        out = subprocess.run([os.path.join(REL, "spool-bench"), "http", "--url", f"http://127.0.0.1:{port}",
                              "--connections", "64", "--rate", str(rate), "--seconds", str(seconds),
                              "--delivery"], check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        srv.terminate()
        srv.wait(120)
        shutil.rmtree(d, ignore_errors=True)
    r["destination"] = dest
    # Sustained: the offered rate is accepted and delivered, and the queue does
    # not grow (the second half never deeper than the first half, give or take).
    r["sustained"] = (r["accepted_per_sec"] >= 0.97 * rate and r["shed"] == 0 and r["errors"] == 0
                      and r["delivered_per_sec"] >= 0.97 * r["accepted_per_sec"]
                      and r["queue_depth_max_second_half"] <= max(1.5 * r["queue_depth_max_first_half"], 2000))
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rates", default="6000,10000,14000")
    a = ap.parse_args()
    rates = [int(r) for r in a.rates.split(",")]
    work = tempfile.mkdtemp(prefix="spool-sustained-")
    os.chmod(work, 0o755)
    pg = Postgres(work)
    rows = []
    try:
        n = 0
        for dest in ("sqlite", "postgres"):
            for rate in rates:
                n += 1
                r = run(work, dest, pg, rate, a.seconds, n)
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print("\n| destination | offered/s | accepted/s | delivered/s | queue depth max (1st / 2nd half) | end | delivery p50 / p99 ms (≤) | request p50 / p99 ms | sustained |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['destination']} | {r['rate']:,.0f} | {r['accepted_per_sec']:,.0f} | {r['delivered_per_sec']:,.0f} | "
              f"{r['queue_depth_max_first_half']:,.0f} / {r['queue_depth_max_second_half']:,.0f} | {r['queue_depth_end']:,.0f} | "
              f"{r['delivery_p50_ms_at_most']} / {r['delivery_p99_ms_at_most']} | {r['p50_ms']} / {r['p99_ms']} | "
              f"{'yes' if r['sustained'] else 'no'} |")
    for dest in ("sqlite", "postgres"):
        ok = [r["rate"] for r in rows if r["destination"] == dest and r["sustained"]]
        print(f"{dest}: highest sustained rate {max(ok) if ok else 'none'} entries/s")


if __name__ == "__main__":
    main()
