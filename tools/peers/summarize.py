"""Medians over rounds of tools/peers/compare.sh's JSON lines, as Markdown tables (embedding,
then DLRM).

  python3 tools/peers/summarize.py OUT.jsonl
"""
import json
import statistics
import sys


def main():
    runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip().startswith("{")]
    every = runs
    runs = [r for r in runs if r["ids"] != "dlrm"]
    who_order = []
    for r in runs:
        if r["who"] not in who_order:
            who_order.append(r["who"])
    print("| ids | who | rounds | steps/s | fwd ms | bwd+opt ms | U | floor ms | bwd / floor | 1-min load at start |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ids in ("uniform", "zipf"):
        for who in who_order:
            rs = [r for r in runs if r["who"] == who and r["ids"] == ids]
            if not rs:
                continue
            med = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
            rng = lambda k: f"{min(r[k] for r in rs):.2f}–{max(r[k] for r in rs):.2f}"  # noqa: E731
            has_floor = all(r.get("floor_ms") for r in rs)
            floor = f"{med('floor_ms'):.1f}" if has_floor else "—"
            ratio = f"{med('backward_over_floor'):.2f}" if has_floor else "—"
            u = f"{med('unique_rows'):.0f}" if all("unique_rows" in r for r in rs) else "—"
            print(f"| {ids} | {who} | {len(rs)} | {med('steps_per_s'):.2f} | {med('forward_ms'):.2f} ({rng('forward_ms')}) "
                  f"| {med('backward_ms'):.2f} ({rng('backward_ms')}) | {u} | {floor} | {ratio} "
                  f"| {min(r['load'] for r in rs):.2f}–{max(r['load'] for r in rs):.2f} |")
    dlrm(every)


def dlrm(runs):
    """The DLRM rows: samples/s medians (min–max) per who, and each one's step over the floor
    (a peer's step over the floor of its round's first Ember run: a round is the Ember runs and
    then the peers, as compare.sh appends them)."""
    rows = [r for r in runs if r["ids"] == "dlrm"]
    if not rows:
        return
    floor, peer_seen = None, True
    for r in rows:
        if r.get("floor_ms"):
            if peer_seen:
                floor, peer_seen = r["floor_ms"], False
        elif r.get("samples_per_s"):
            peer_seen = True
            if floor:
                r["step_over_floor"] = 4096 / r["samples_per_s"] * 1e3 / floor
    print()
    print("| DLRM, global batch 4096 | rounds | samples/s | step / floor | 1-min load at start |")
    print("|---|---|---|---|---|")
    for who in dict.fromkeys(r["who"] for r in rows):
        rs = [r for r in rows if r["who"] == who]
        sps = [r["samples_per_s"] for r in rs]
        fl = [r["step_over_floor"] for r in rs if r.get("step_over_floor")]
        ratio = f"{statistics.median(fl):.2f} ({min(fl):.2f}–{max(fl):.2f})" if fl else "—"
        print(f"| {who} | {len(rs)} | {statistics.median(sps):.0f} ({min(sps):.0f}–{max(sps):.0f}) | {ratio} "
              f"| {min(r['load'] for r in rs):.2f}–{max(r['load'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()
