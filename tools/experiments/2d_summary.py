#!/usr/bin/env python3
"""Markdown tables of docs/2d.md from the JSON lines that tools/experiments/2d.sh writes."""
import json, os, statistics, sys
from collections import OrderedDict

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ember-2d"


def load(name):
    p = os.path.join(out, name)
    if not os.path.exists(p):
        return []
    return [json.loads(l) for l in open(p) if l.strip()]


def groups(rows):
    g = OrderedDict()
    for r in rows:
        g.setdefault(r["tag"], []).append(r)
    return g


q = groups(load("quality.jsonl"))
if q:
    print("### Model quality (tiny preset, B = 256, 600 steps, seeds 1-3)\n")
    ref = q.get("1x8 full sharding")
    refm = statistics.mean(r["ne"] for r in ref) if ref else None
    print("| configuration | NE seed 1 | seed 2 | seed 3 | mean | min | max | mean vs full sharding | AUC mean |")
    print("|---|---|---|---|---|---|---|---|---|")
    for tag, rs in q.items():
        ne = [r["ne"] for r in sorted(rs, key=lambda r: r["args"])]
        by_seed = {int(r["args"].split("--seed ")[1].split()[0]): r["ne"] for r in rs}
        m = statistics.mean(ne)
        rel = f"{(m / refm - 1) * 100:+.3f} %" if refm else ""
        auc = statistics.mean(r["auc"] for r in rs)
        print(f"| {tag} | " + " | ".join(f"{by_seed.get(s, float('nan')):.5f}" for s in (1, 2, 3))
              + f" | {m:.5f} | {min(ne):.5f} | {max(ne):.5f} | {rel} | {auc:.5f} |")
    o = next(iter(q.values()))
    print(f"\nplanted oracle NE (seeds 1-3): " + ", ".join(f"{r['oracle_ne']:.5f}" for r in o))
    if ref:
        lo, hi = min(r["ne"] for r in ref), max(r["ne"] for r in ref)
        print("\nverdict per configuration (mean NE inside [min, max] of full sharding; |mean diff| <= 0.2 %; per-seed diff):")
        for tag, rs in q.items():
            m = statistics.mean(r["ne"] for r in rs)
            paired = []
            for r in rs:
                s = r["args"].split("--seed ")[1].split()[0]
                f = [x for x in ref if x["args"].split("--seed ")[1].split()[0] == s][0]
                paired.append((r["ne"] / f["ne"] - 1) * 100)
            print(f"- {tag}: inside spread {lo <= m <= hi}; within 0.2 % {abs(m / refm - 1) <= 0.002}; "
                  f"per-seed diff vs full sharding " + ", ".join(f"{p:+.3f} %" for p in paired))
    print()

s = groups(load("speed.jsonl"))
fl = groups(load("floor.jsonl"))
if s:
    print("### Speed (bench preset, max-rows 100000, B = 4096, 20 steps; T = 8 in-process, or 2 processes)\n")
    print("| grid | samples/s (median) | runs | vs 1x8 | input_dist | lookup | output_dist | dense | backward | sync | sync floor | a2a B/step | sync B/step | load1 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    ref = {t[len("1x8"):]: statistics.median(r["samples_per_s"] for r in rs) for t, rs in s.items() if t.startswith("1x8")}
    for tag, rs in s.items():
        sps = [r["samples_per_s"] for r in rs]
        med = sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2]
        st = med["stages"]
        base = " base" if tag.endswith(" base") else ""
        vs = f"{statistics.median(sps) / ref[base]:.2f}" if base in ref and "process" not in tag else ""
        g = tag.split()[0]
        floor = ""
        if g in fl and "process" not in tag and med["sync_bytes_per_rank"] > 0:
            bw = statistics.median(r["algbw"] for r in fl[g]) * 1e9
            floor = f"{med['sync_bytes_per_rank'] / bw * 1e3:.1f}"
        print(f"| {tag} | {statistics.median(sps):.0f} | " + " / ".join(f"{x:.0f}" for x in sps) + f" | {vs}"
              + "".join(f" | {st[k]:.1f}" for k in ("input_dist", "lookup", "output_dist", "dense", "backward", "sync"))
              + f" | {floor} | {med['a2a_bytes_per_rank']:.0f} | {med['sync_bytes_per_rank']:.0f} | "
              + " / ".join(f"{r['load1']:.1f}" for r in rs) + " |")
    if fl:
        print("\nsync floor: the sync's bytes per step ÷ the replica group's all-reduce rate at 4 MiB with all "
              "8 ranks busy (`ember bench allreduce --ranks 8 --split MxN -b 4M -e 4M`), median over rounds: "
              + ", ".join(f"{g} {statistics.median(r['algbw'] for r in rs):.2f} GB/s" for g, rs in fl.items()))
    print()

b = groups(load("bytes.jsonl"))
p = {r["tag"]: r for r in load("plan.jsonl")}
if b:
    print("### Sparse-collective bytes per rank per step (bench, max-rows 100000, B = 4096; rank 0)\n")
    print("| sharding | grid | a2a_bytes_per_rank, 2 steps | 4 steps | steps 3 and 4, per step (4·a4 − 2·a2)/2 | plan: ids + 2 x outputs |")
    print("|---|---|---|---|---|---|")
    keys = sorted({t.rsplit(" steps=", 1)[0] for t in b}, key=lambda t: list(b).index(t + " steps=2"))
    for k in keys:
        a2, a4 = b[k + " steps=2"][0]["a2a_bytes_per_rank"], b[k + " steps=4"][0]["a2a_bytes_per_rank"]
        sh = k.split()[0]
        pr = p.get(k)
        pc = "no plan row"
        if pr:
            v = pr["a2a_mean_bytes_per_rank"].get(sh.replace("-", "_") + "_wise", {"ids": 0, "outputs": 0})
            pc = f"{v['ids'] + 2 * v['outputs']:.0f}"
        print(f"| {sh} | {k.split()[1]} | {a2:.0f} | {a4:.0f} | {(4 * a4 - 2 * a2) / 2:.0f} | {pc} |")
    print()

lr = groups(load("lr.jsonl"))
if lr:
    print("### Control: embedding learning rate (tiny as a config file; lr 0.05 = the preset)\n")
    print("| run | NE seed 1 | seed 2 | seed 3 | mean |")
    print("|---|---|---|---|---|")
    for tag, rs in lr.items():
        ne = [r["ne"] for r in rs]
        print(f"| {tag} | " + " | ".join(f"{x:.5f}" for x in ne) + f" | {statistics.mean(ne):.5f} |")
    print()

y = groups(load("sync.jsonl"))
if y:
    print("### Replica-sync bytes per rank per step (grid 4x2)\n")
    print("| run | sync_bytes_per_rank | sync ms/step (rank 0) | NE |")
    print("|---|---|---|---|")
    for tag, rs in y.items():
        r = rs[0]
        print(f"| {tag} | {r['sync_bytes_per_rank']:.0f} | {r['stages']['sync']:.2f} | {r['ne']:.5f} |")
