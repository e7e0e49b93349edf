#!/usr/bin/env python3
"""Medians over rounds of shm_vs_mpi.sh output: per size, each variant's time, the memcpy
ceiling (median over all ember runs of the round set), % of ceiling and the ratio to Open MPI."""
import glob, json, os, re, statistics, sys
from collections import defaultdict

out = sys.argv[1]
t = defaultdict(lambda: defaultdict(list))      # variant -> size -> [time_us]
pc = defaultdict(lambda: defaultdict(list))     # variant -> size -> [memcpy/time per run]
ceil = defaultdict(list)
for p in sorted(glob.glob(os.path.join(out, "r*.json"))):
    var = re.sub(r"^r\d+\.", "", os.path.basename(p))[:-5]
    for line in open(p):
        if "{" not in line:
            continue
        d = json.loads(line[line.index("{"):])
        t[var][d["size"]].append(d["time_us"])
        if d.get("base_us"):
            pc[var][d["size"]].append(d["base_us"] / d["time_us"])
            ceil[d["size"]].append(d["base_us"])
for p in sorted(glob.glob(os.path.join(out, "r*.mpi.txt"))):
    for line in open(p):
        f = line.split()
        if len(f) >= 4 and f[0].isdigit():
            t["mpi"][int(f[0])].append(float(f[3]))
med = statistics.median
vars_ = sorted(v for v in t if v != "mpi")
print("| size/peer | " + " | ".join(f"{v} µs" for v in vars_) + " | Open MPI µs | memcpy µs | " +
      " | ".join(f"{v} % ceil (median of runs)" for v in vars_) + " | " + " | ".join(f"{v} / MPI" for v in vars_) + " |")
print("|---:" * (2 + 3 * len(vars_) + 1) + "|")
for s in sorted(t["mpi"] or t[vars_[0]]):
    row = [f"{s}"]
    row += [f"{med(t[v][s]):.1f}" if t[v][s] else "-" for v in vars_]
    row.append(f"{med(t['mpi'][s]):.1f}" if t["mpi"][s] else "-")
    row.append(f"{med(ceil[s]):.1f}" if ceil[s] else "-")
    row += [f"{100 * med(pc[v][s]):.0f}" if pc[v][s] else "-" for v in vars_]
    row += [f"{med(t[v][s]) / med(t['mpi'][s]):.2f}" if t[v][s] and t["mpi"][s] else "-" for v in vars_]
    print("| " + " | ".join(row) + " |")
print("runs:", {v: max(len(x) for x in t[v].values()) for v in t})
