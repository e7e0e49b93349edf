//! Id statistics of the tables the planner prices with: ids per sample, the share of ids per
//! row range (a row histogram) and the distinct rows among a number of samples (a measured
//! curve), from the config alone or measured on sample batches.
use crate::config::{ModelConfig, TableConfig};
use crate::data::Batch;
use serde::Serialize;
use std::collections::HashMap;
use std::ops::Range;

/// Buckets of the per-table row histogram that [`stats_from_batches`] measures.
pub const HIST_BUCKETS: usize = 1024;

/// Id-frequency statistics of one table, per sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableStats {
    /// Mean number of ids per sample (bag length, empty bags included).
    pub lookups_per_sample: f64,
    /// Distinct ids / ids in the measured sample (1.0: every lookup a different row).
    pub distinct_fraction: f64,
    /// Share of the lookups that hit the most frequent row.
    pub top_row_fraction: f64,
    /// Share of the lookups per equal-width row bucket (`min(rows, HIST_BUCKETS)` buckets,
    /// bucket i covers rows [i·rows/nb, (i+1)·rows/nb)); empty means uniform over the rows.
    pub row_histogram: Vec<f64>,
    /// Distinct rows among the ids of the first `samples` samples, as `[samples, rows]` points
    /// at sample counts growing by √2; empty means uniform ids (the expected distinct count).
    pub distinct_curve: Vec<[f64; 2]>,
}

impl TableStats {
    /// The default without data: `bag_size` lookups per sample, uniform over the rows.
    pub fn from_config(t: &TableConfig) -> Self {
        TableStats { lookups_per_sample: t.bag_size as f64, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new(), distinct_curve: Vec::new() }
    }

    /// Distinct rows among the ids of `samples` samples of a table of `rows` rows: the measured
    /// curve read between its points (linearly) and past its last (growing as the power of
    /// `samples` its last two points show); without one, the expectation for uniform ids.
    /// Never more than the rows or the ids.
    pub fn distinct_rows(&self, rows: u64, samples: f64) -> f64 {
        if samples <= 0.0 || rows == 0 {
            return 0.0;
        }
        let r = rows as f64;
        let ids = self.lookups_per_sample * samples;
        let c = &self.distinct_curve;
        let d = match c.iter().position(|p| p[0] >= samples) {
            _ if c.is_empty() => r * -(ids * (-1.0 / r).ln_1p()).exp_m1(),
            Some(0) => c[0][1] * samples / c[0][0],
            Some(i) => {
                let (a, b) = (c[i - 1], c[i]);
                a[1] + (b[1] - a[1]) * (samples - a[0]) / (b[0] - a[0])
            }
            None if c.len() >= 2 => {
                let (a, b) = (c[c.len() - 2], c[c.len() - 1]);
                let p = if a[1] > 0.0 && b[1] > a[1] { (b[1] / a[1]).ln() / (b[0] / a[0]).ln() } else { 0.0 };
                b[1] * (samples / b[0]).powf(p.clamp(0.0, 1.0))
            }
            None => c[0][1] * samples / c[0][0],
        };
        d.min(r).min(ids)
    }

    /// Share of this table's lookups that fall in `range` of its `rows` rows.
    pub fn row_fraction(&self, rows: u64, range: &Range<u64>) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let (a, b) = (range.start.min(rows) as f64, range.end.min(rows) as f64);
        if self.row_histogram.is_empty() {
            return (b - a) / rows as f64;
        }
        let nb = self.row_histogram.len();
        let w = rows as f64 / nb as f64;
        let first = ((a / w) as usize).min(nb - 1);
        let last = (((b / w).ceil() as usize).max(first + 1)).min(nb);
        let mut f = 0.0;
        for (i, &h) in self.row_histogram.iter().enumerate().take(last).skip(first) {
            let (lo, hi) = (i as f64 * w, (i + 1) as f64 * w);
            let overlap = (b.min(hi) - a.max(lo)).max(0.0);
            f += h * overlap / w;
        }
        f
    }

    /// Distinct rows in `range` among the ids of `samples` samples: the table's distinct rows
    /// apportioned over the histogram's buckets by the rows each would show with uniform ids
    /// inside it (a hot bucket saturates, a cold one does not); by rows without a histogram.
    pub fn distinct_in(&self, rows: u64, range: &Range<u64>, samples: f64) -> f64 {
        let total = self.distinct_rows(rows, samples);
        let (a, b) = (range.start.min(rows) as f64, range.end.min(rows) as f64);
        let share = if self.row_histogram.is_empty() || rows == 0 {
            (b - a) / rows.max(1) as f64
        } else {
            let nb = self.row_histogram.len();
            let w = rows as f64 / nb as f64;
            let ids = self.lookups_per_sample * samples;
            let (mut all, mut inside) = (0f64, 0f64);
            for (i, &h) in self.row_histogram.iter().enumerate() {
                let u = w * -(-ids * h / w).exp_m1();
                let (lo, hi) = (i as f64 * w, (i + 1) as f64 * w);
                let overlap = (b.min(hi) - a.max(lo)).max(0.0) / w;
                all += u;
                inside += u * overlap;
            }
            if all > 0.0 {
                inside / all
            } else {
                (b - a) / rows as f64
            }
        };
        (total * share).min(b - a).min(self.lookups_per_sample * samples * self.row_fraction(rows, range))
    }
}

/// Per-table statistics derived from the config alone (bag sizes, uniform ids).
pub fn default_stats(model: &ModelConfig) -> Vec<TableStats> {
    model.tables.iter().map(TableStats::from_config).collect()
}

/// Measures per-table statistics on sample batches (feature t looks up table t), the batches
/// taken in order as one stream of samples. Tables with no samples get the config default.
pub fn stats_from_batches(model: &ModelConfig, batches: &[Batch]) -> Vec<TableStats> {
    model
        .tables
        .iter()
        .enumerate()
        .map(|(t, tc)| {
            let samples: usize = batches.iter().map(|b| b.sparse.get(t).map_or(0, |j| j.num_bags())).sum();
            if samples == 0 {
                return TableStats::from_config(tc);
            }
            let nb = (tc.rows.min(HIST_BUCKETS as u64)).max(1) as usize;
            let mut hist = vec![0f64; nb];
            let mut counts: HashMap<u64, u64> = HashMap::new();
            let mut curve = Vec::new();
            let (mut ids, mut seen) = (0u64, 0usize);
            let mut next_point = 1.0f64;
            for b in batches {
                let Some(j) = b.sparse.get(t) else { continue };
                let mut pos = 0usize;
                for &l in &j.lengths {
                    for &id in &j.values[pos..pos + l as usize] {
                        let id = id.min(tc.rows - 1);
                        hist[((id as u128 * nb as u128) / tc.rows as u128) as usize] += 1.0;
                        *counts.entry(id).or_insert(0) += 1;
                        ids += 1;
                    }
                    pos += l as usize;
                    seen += 1;
                    if seen as f64 >= next_point.ceil() || seen == samples {
                        curve.push([seen as f64, counts.len() as f64]);
                        next_point = (seen as f64 * std::f64::consts::SQRT_2).max(seen as f64 + 1.0);
                    }
                }
            }
            if ids == 0 {
                return TableStats { lookups_per_sample: 0.0, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new(), distinct_curve: curve };
            }
            hist.iter_mut().for_each(|h| *h /= ids as f64);
            TableStats {
                lookups_per_sample: ids as f64 / samples as f64,
                distinct_fraction: counts.len() as f64 / ids as f64,
                top_row_fraction: *counts.values().max().unwrap_or(&0) as f64 / ids as f64,
                row_histogram: hist,
                distinct_curve: curve,
            }
        })
        .collect()
}

