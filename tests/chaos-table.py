#!/usr/bin/env python3
"""Render the rows `make chaos` collected (JSON lines) as docs/reliability.md tables."""
import json
import sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
cols = ["scenario", "load", "cycles", "acknowledged", "lost", "duplicates", "5xx", "result"]
print("| scenario | load | cycles / duration | acknowledged | lost | duplicates | 5xx | result |")
print("|---|---|---|---:|---:|---:|---:|---|")
for r in rows:
    print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
for r in rows:
    extra = {k: v for k, v in r.items() if k not in cols and k != "inputs"}
    if extra:
        print(f"\n{r['scenario']}: " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in extra.items()))
    if "inputs" in r:
        print("\n| hostile input | status | ms |\n|---|---:|---:|")
        for i in r["inputs"]:
            print(f"| {i['input']} | {i['status']} | {i['ms']} |")
