//! Choosing the grid: for T ranks, every M that divides T (N = T/M) and every sync interval K
//! of a list is predicted (`super::model`); the fastest one that fits the machine's memory wins,
//! and every other candidate keeps the reason it lost.
use super::model::{predict, Prediction, Scenario};
use super::Machine;
use crate::config::TrainConfig;
use crate::Result;
use serde::Serialize;

/// Sync intervals `ember plan --auto` weighs.
pub const SYNC_INTERVALS: [usize; 4] = [1, 2, 4, 8];

/// One (M, K) candidate: its prediction, or why it could not be predicted.
#[derive(Clone, Debug, Serialize)]
pub struct Candidate {
    pub m: usize,
    pub n: usize,
    pub sync_every: usize,
    pub prediction: Option<Prediction>,
    /// Why it is not the choice (None for the choice).
    pub rejected: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Choice {
    pub world: usize,
    pub batch_size: usize,
    /// Index of the chosen candidate in `candidates` (None: nothing fits).
    pub best: Option<usize>,
    pub candidates: Vec<Candidate>,
}

/// Every M dividing `world` (and the batch over the world), every K of `ks` (K matters only
/// for M > 1, so M = 1 is tried once), predicted with `base`'s other settings.
pub fn choose(cfg: &TrainConfig, machine: &Machine, world: usize, base: &Scenario, ks: &[usize]) -> Result<Choice> {
    let batch = base.batch_size;
    let mut cands = Vec::new();
    for m in (1..=world).filter(|m| world % m == 0) {
        let n = world / m;
        let ks_m: &[usize] = if m == 1 { &[1] } else { ks };
        for &k in ks_m {
            if batch % world != 0 {
                cands.push(Candidate { m, n, sync_every: k, prediction: None, rejected: Some(format!("global batch {batch} does not split over {world} ranks")) });
                continue;
            }
            let sc = Scenario { m, n, sync_every: k, ..base.clone() };
            let p = predict(cfg, machine, &sc)?;
            cands.push(Candidate { m, n, sync_every: k, prediction: Some(p), rejected: None });
        }
    }
    let best = cands
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.prediction.as_ref().filter(|p| p.fits).map(|p| (i, p.samples_per_s)))
        .fold(None, |acc: Option<(usize, f64)>, (i, s)| if acc.map_or(true, |(_, b)| s > b) { Some((i, s)) } else { acc })
        .map(|(i, _)| i);
    let best_rate = best.and_then(|i| cands[i].prediction.as_ref()).map(|p| p.samples_per_s);
    for (i, c) in cands.iter_mut().enumerate() {
        if Some(i) == best || c.rejected.is_some() {
            continue;
        }
        let p = c.prediction.as_ref().expect("predicted");
        c.rejected = Some(if !p.fits {
            format!(
                "out of memory: {:.2} GiB per rank at its peak, {:.2} GiB available",
                p.peak_bytes_per_rank as f64 / (1u64 << 30) as f64,
                p.memory_per_rank as f64 / (1u64 << 30) as f64
            )
        } else {
            let b = best_rate.expect("a fitting candidate exists when this one fits");
            let slowest = p.parts.iter().max_by(|a, b| a.ms.total_cmp(&b.ms)).map_or("", |s| s.name);
            format!("{:.0} samples/s, {:.1} % below the choice (its longest stage: {slowest})", p.samples_per_s, 100.0 * (1.0 - p.samples_per_s / b))
        });
    }
    Ok(Choice { world, batch_size: batch, best, candidates: cands })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::preset;

    fn machine(memory: u64) -> Machine {
        Machine::for_tests(8, 8, memory)
    }

    #[test]
    fn picks_the_fastest_fitting_grid_and_says_why_the_others_lost() {
        let cfg = preset("bench", Some(100_000)).unwrap();
        let base = Scenario::new(1, 8, 4096, 1);
        let all = choose(&cfg, &machine(1 << 40), 8, &base, &SYNC_INTERVALS).unwrap();
        // M in {1, 2, 4, 8}: 1 + 3 x 4 candidates.
        assert_eq!(all.candidates.len(), 13);
        let best = &all.candidates[all.best.unwrap()];
        let rate = |c: &Candidate| c.prediction.as_ref().unwrap().samples_per_s;
        assert!(all.candidates.iter().all(|c| rate(c) <= rate(best)));
        assert!(best.rejected.is_none());
        assert!(all.candidates.iter().enumerate().all(|(i, c)| Some(i) == all.best || c.rejected.as_deref().unwrap().contains("below the choice")));
        // A budget between full sharding's peak and the replicated grids' rules the latter out.
        let peak = |m: usize| all.candidates.iter().find(|c| c.m == m).unwrap().prediction.as_ref().unwrap().peak_bytes_per_rank;
        assert!(peak(8) > peak(1));
        let tight = choose(&cfg, &machine(peak(1) + 1), 8, &base, &SYNC_INTERVALS).unwrap();
        let chosen = &tight.candidates[tight.best.unwrap()];
        assert!(chosen.prediction.as_ref().unwrap().fits);
        let oom: Vec<_> = tight.candidates.iter().filter(|c| c.m == 8).collect();
        assert!(oom.iter().all(|c| c.rejected.as_deref().unwrap().starts_with("out of memory")), "{:?}", oom[0].rejected);
        // Nothing fits: no choice.
        assert!(choose(&cfg, &machine(1 << 20), 8, &base, &[1]).unwrap().best.is_none());
    }
}
