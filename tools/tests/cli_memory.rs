//! The planner's per-rank memory figure is an upper bound of what a rank really allocates:
//! `ember train --measure-memory` under `ember launch` (one rank per process, each counting its
//! heap with the counting allocator of `ember_engine::heap`) reports every rank's measured heap
//! peak over construction and training next to the plan's figure; for the `bench` model on the
//! grids 1x8, 2x4, 4x2 and 8x1 and every sharding type, measured ≤ planned ≤ 1.15 × measured.
use std::process::Command;

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().filter(|l| l.contains("{\"")).last().expect("a JSON line");
    serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap()
}

/// The `bench` preset (8 tables × 64 wide, 20 ids per bag, row-wise AdaGrad) with tables capped
/// at 20 000 rows and a batch of 1024, so that 8 processes fit any test machine.
const ROWS: u64 = 20_000;

#[test]
fn planned_memory_bounds_the_measured_heap_peak_of_every_rank() {
    let bin = env!("CARGO_BIN_EXE_ember");
    for grid in ["1x8", "2x4", "4x2", "8x1"] {
        let n: u64 = grid[2..].parse().unwrap();
        for sharding in ["table", "row", "column", "table-row"] {
            let rows = ROWS.to_string();
            let args = [
                "launch", "-n", "8", "--timeout-ms", "60000", "--", bin, "train", "--preset", "bench", "--max-rows", &rows, "--batch-size", "1024",
                "--steps", "2", "--grid", grid, "--sharding", sharding, "--measure-memory", "--json", "--quiet",
            ];
            let v = json_of(&Command::new(bin).args(args).output().unwrap());
            let mem = &v["memory"];
            let measured: Vec<u64> = mem["measured"].as_array().expect("measured").iter().map(|x| x.as_u64().unwrap()).collect();
            let planned: Vec<u64> = mem["planned"].as_array().expect("planned").iter().map(|x| x.as_u64().unwrap()).collect();
            assert_eq!((measured.len(), planned.len()), (8, 8), "{grid} {sharding}: one figure per rank");
            // The counter sees real allocations: some rank holds at least its share of the
            // group's tables (weights and one AdaGrad float per row).
            let share = 8 * ROWS * (64 + 1) * 4 / n;
            assert!(*measured.iter().max().unwrap() >= share, "{grid} {sharding}: measured {measured:?} below the table share {share}");
            for (w, (&m, &p)) in measured.iter().zip(&planned).enumerate() {
                assert!(m <= p, "{grid} {sharding} rank {w}: measured {m} above the planned {p} ({})", mem["planned_peak_phase"][w]);
                assert!(p as f64 <= 1.15 * m as f64, "{grid} {sharding} rank {w}: planned {p} more than 1.15 × the measured {m}");
            }
        }
    }
}

#[test]
fn measuring_memory_needs_one_rank_per_process() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(["train", "--grid", "2x2", "--steps", "2", "--measure-memory"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--measure-memory") && err.contains("ember launch -n 4"), "{err}");
}
