//! Helpers of the 2D tests: plans using every sharding type, whole tables reassembled from the
//! ranks' shards, and the relative error the equivalence tests bound.
use ember_engine::config::TrainConfig;
use ember_engine::parallel::driver::RankState;
use ember_engine::plan::{Plan, ShardingType};

/// `Plan::cycling` (table t as `kinds[t % kinds.len()]`), which must succeed.
pub fn cycling_plan(cfg: &TrainConfig, n: usize, kinds: &[ShardingType]) -> Plan {
    Plan::cycling(&cfg.model, n, kinds).expect("a valid plan")
}

/// Whole tables assembled from the shards of replica `replica`.
pub fn assemble(cfg: &TrainConfig, states: &[RankState], replica: usize) -> Vec<Vec<f32>> {
    let mut tables: Vec<Vec<f32>> = cfg.model.tables.iter().map(|t| vec![f32::NAN; t.rows as usize * t.dim]).collect();
    for st in states.iter().filter(|s| s.coords.0 == replica) {
        for (spec, w, _) in &st.shards {
            let cols = spec.num_cols();
            for (i, r) in (spec.rows.start..spec.rows.end).enumerate() {
                let dst = r as usize * spec.dim + spec.cols.start;
                tables[spec.table][dst..dst + cols].copy_from_slice(&w[i * cols..(i + 1) * cols]);
            }
        }
    }
    tables
}

/// ‖a − b‖ / ‖b‖ in f64.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Two runs trained bitwise alike: the same per-step losses and, on every rank, the same shard
/// weights, optimizer state and dense parameters, bit for bit. `what` names the comparison.
pub fn assert_bitwise_same(what: &str, losses: (&[f64], &[f64]), a: &[RankState], b: &[RankState]) {
    let lb = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(lb(losses.0), lb(losses.1), "{what}: losses {:?} vs {:?}", losses.0, losses.1);
    assert_eq!(a.len(), b.len(), "{what}: rank counts differ");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.shards.len(), y.shards.len(), "{what}: rank {} shard counts differ", x.world_rank);
        for (i, ((sa, wa, va), (sb, wb, vb))) in x.shards.iter().zip(&y.shards).enumerate() {
            assert_eq!(sa, sb, "{what}: rank {} shard {i} specs differ", x.world_rank);
            assert!(bits(wa) == bits(wb), "{what}: rank {} shard {i} weights differ", x.world_rank);
            assert!(bits(va) == bits(vb), "{what}: rank {} shard {i} optimizer state differs", x.world_rank);
        }
        for (i, (pa, pb)) in x.dense.iter().zip(&y.dense).enumerate() {
            assert!(bits(pa) == bits(pb), "{what}: rank {} dense param {i} differs", x.world_rank);
        }
    }
}
