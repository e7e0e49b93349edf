#!/usr/bin/env python3
"""The ratio table of tools/experiments/transport_vs_mpi.sh: per case, collective, method and
size, Ember's and Open MPI's median algbw over rounds, Open MPI's min-max, the ratio, and whether
the size is met (Ember's median >= Open MPI's median, or inside Open MPI's min-max range); the
geometric mean of the ratios per table. Then the same from each side's best round: on a host
whose runs fall into a fast and a slow phase (a VM sharing memory bandwidth), which side drew
more slow runs decides a median of 5, while the best rounds compare the two in the same phase.
Last, the paired view: per size, the median over rounds of Ember's algbw over Open MPI's in the
same round (runs next to each other share more of the host's state than runs of other rounds),
and at how many sizes Ember is at least Open MPI's in most rounds."""
import glob, json, os, statistics, sys
from collections import defaultdict

out = sys.argv[1] if len(sys.argv) > 1 else "/tmp/ember-vs-mpi"
for p in sorted(glob.glob(os.path.join(out, "*.jsonl"))):
    case, coll, method = os.path.basename(p)[:-6].split(".")
    bw = defaultdict(lambda: defaultdict(list))  # side -> size -> [algbw]
    us = defaultdict(lambda: defaultdict(list))  # side -> size -> [time_us]
    by_round = defaultdict(dict)  # (side, size) -> round -> algbw
    loads = []
    for line in open(p):
        d = json.loads(line)
        if d.get("wrong", 0):
            print(f"WRONG values in {p}: {line.strip()}")
        bw[d["side"]][d["size"]].append(d["algbw"])
        us[d["side"]][d["size"]].append(d["time_us"])
        by_round[(d["side"], d["size"])][d["round"]] = d["algbw"]
        loads.append(d["load1"])
    e, m = bw["ember"], bw["openmpi"]
    sizes = sorted(set(e) & set(m))
    if not sizes:
        continue
    rounds = min(len(v) for v in list(e.values()) + list(m.values()))
    print(f"\n### {case} {coll}, {'per operation after a barrier' if method == 'per-op' else 'back-to-back'} "
          f"({rounds} rounds, load1 {min(loads):.1f}-{max(loads):.1f})\n")
    b = bw.get("base", {})
    hb = bool(b) and all(s in b for s in sizes)
    print("| size | Ember µs |" + (" base µs |" if hb else "") + " Open MPI µs | Ember algbw GB/s | Open MPI algbw GB/s | Open MPI min-max | Ember / MPI |" + (" base / MPI |" if hb else "") + " met |")
    print("|---:|---:|" + ("---:|" if hb else "") + "---:|---:|---:|---:|---:|" + ("---:|" if hb else "") + ":---:|")
    ratios, met = [], 0
    for s in sizes:
        em, mm = statistics.median(e[s]), statistics.median(m[s])
        ok = em >= mm or min(m[s]) <= em <= max(m[s])
        met += ok
        ratios.append(em / mm)
        eu, mu = statistics.median(us["ember"][s]), statistics.median(us["openmpi"][s])
        bu = f" {statistics.median(us['base'][s]):.1f} |" if hb else ""
        br = f" {statistics.median(b[s]) / mm:.2f} |" if hb else ""
        print(f"| {s} | {eu:.1f} |{bu} {mu:.1f} | {em:.4g} | {mm:.4g} | {min(m[s]):.4g}-{max(m[s]):.4g} | {em / mm:.2f} |{br} {'yes' if ok else 'no'} |")
    g = statistics.geometric_mean(ratios)
    line = f"\nmet at {met} of {len(sizes)} sizes; geometric mean of Ember / MPI: {g:.2f}"
    if hb:
        bm = [statistics.median(b[s]) for s in sizes]
        bmet = sum(x >= statistics.median(m[s]) or min(m[s]) <= x <= max(m[s]) for x, s in zip(bm, sizes))
        gbm = statistics.geometric_mean(x / statistics.median(m[s]) for x, s in zip(bm, sizes))
        line += f" (base: {bmet}, {gbm:.2f})"
    print(line)
    best = [max(e[s]) / max(m[s]) for s in sizes]
    gb = statistics.geometric_mean(best)
    line = f"best rounds: Ember's at least Open MPI's at {sum(r >= 1 for r in best)} of {len(sizes)} sizes; geometric mean {gb:.2f}"
    if hb:
        bb = [max(b[s]) / max(m[s]) for s in sizes]
        line += f" (base: {sum(r >= 1 for r in bb)}, {statistics.geometric_mean(bb):.2f})"
    print(line)

    def paired(side):
        """Per size, the rounds' ratios of `side` to Open MPI in the same round."""
        out = []
        for s in sizes:
            a, o = by_round[(side, s)], by_round[("openmpi", s)]
            out.append([a[k] / o[k] for k in sorted(set(a) & set(o))])
        return out

    def paired_line(rs):
        meds = [statistics.median(r) for r in rs if r]
        most = sum(sum(x >= 1 for x in r) * 2 > len(r) for r in rs if r)
        return most, statistics.geometric_mean(meds), meds

    most, gp, meds = paired_line(paired("ember"))
    line = f"paired rounds: Ember's at least Open MPI's in most rounds at {most} of {len(sizes)} sizes; geometric mean of the per-size medians {gp:.2f}"
    if hb:
        bmost, bgp, _ = paired_line(paired("base"))
        line += f" (base: {bmost}, {bgp:.2f})"
    print(line)
    print("paired median Ember / MPI by size: " + ", ".join(f"{s}: {x:.2f}" for s, x in zip(sizes, meds)))
