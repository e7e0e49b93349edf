#!/usr/bin/env python3
"""This host's machine file for ranks as processes under `ember launch -n 2` (one rank per core,
each process its own "node"), derived from the file `ember simulate --calibrate` wrote for
in-process ranks: the same memory and compute rates (one core's), one rank and one compute unit
per node, the memory of half the host, and the links between the processes measured by
`ember launch -n 2 -- ember bench a2a|allreduce --json` (the transport `ember train` uses there).

usage: procs_machine.py CALIBRATED.toml A2A.jsonl ALLREDUCE.jsonl COMMAND > OUT.toml
"""
import json
import re
import sys
import tomllib

src, a2a_path, ar_path, command = sys.argv[1:5]
text = open(src).read()
m = tomllib.loads(text)


def rows(path):
    out = []
    for line in open(path):
        # `ember launch` prefixes each line with its rank ("[0] ").
        line = re.sub(r"^\[\d+\] ", "", line.strip())
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


a2a, ar = rows(a2a_path), rows(ar_path)
if not a2a or not ar:
    sys.exit("procs_machine.py: no bench rows")
transport = a2a[0]["transport"]
peers = a2a[0]["ranks"]
# All-to-all points record the rank's whole send buffer (size is per peer); all-reduce the buffer.
a2a_pts = sorted((r["size"] * peers, r["time_us"] * 1e-6) for r in a2a)
ar_pts = sorted((r["size"], r["time_us"] * 1e-6) for r in ar)
big_b, big_t = a2a_pts[-1]
bw = big_b * (peers - 1) / peers / big_t
lat = a2a_pts[0][1]

mem = m["memory_per_rank"] * m["ranks_per_node"] // 2
head, _, _ = text.partition("\n[inter_node]")
head = re.sub(r'(?m)^name = .*$', 'name = "this-host-procs"', head, count=1)
head = re.sub(r'(?m)^description = "(.*)"$', lambda g: f'description = "{g.group(1).split("; ")[0]}; ranks as 2 processes under ember launch, one per core, each its own node ({transport} transport)"', head, count=1)
head = re.sub(r'(?m)^ranks_per_node = .*$', 'ranks_per_node = 1', head, count=1)
head = re.sub(r'(?m)^compute_units_per_node = .*$', 'compute_units_per_node = 1', head, count=1)
head = re.sub(r"(?m)^in_place_sync = .*\n", "", head, count=1)
head = re.sub(r'(?m)^memory_per_rank = .*$', f'memory_per_rank = {mem}', head, count=1)
keep = []
for line in head.split("\n"):
    s = line.strip().lstrip('"')
    if any(s.startswith(k) for k in ("ranks_per_node:", "compute_units_per_node:", "in_place_sync:", "memory_per_rank:", "inter_node.")):
        continue
    keep.append(line)
head = "\n".join(keep)
new_sources = [
    f"ranks_per_node: assumption: one rank per process under `ember launch -n 2`, each process its own node (derived from {src} by tools/experiments/scale/procs_machine.py)",
    "compute_units_per_node: assumption: `ember launch` pins each process to one core",
    "memory_per_rank: the calibrated memory_per_rank x ranks_per_node / 2 (half the host's memory)",
    f"inter_node.all_to_all, inter_node.all_reduce: Ember's own measurement: `{command}`: ember launch -n 2 -- ember bench a2a|allreduce --json ({transport} transport, 2 processes pinned one per core)",
    "inter_node.bw: Ember's own measurement: the largest 2-process all-to-all above, bytes sent to the peer / time",
    "inter_node.latency_s: Ember's own measurement: the smallest 2-process all-to-all above",
]
head = head.replace("sources = [\n", "sources = [\n" + "".join(f"    {json.dumps(s)},\n" for s in new_sources), 1)
out = [head.rstrip("\n"), "", "[inter_node]", f"bw = {bw!r}", f"latency_s = {lat!r}"]
for name, pts in (("all_to_all", a2a_pts), ("all_reduce", ar_pts)):
    for b, t in pts:
        out += ["", f"[[inter_node.{name}]]", f"peers = {peers}", f"bytes = {b}", f"seconds = {t!r}"]
print("\n".join(out))
