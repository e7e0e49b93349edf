//! The synthetic generator: determinism by index, Zipf skew against the stated probabilities,
//! bag shapes, the oracle's AUC and the positive rate.
use ember_engine::config::{preset, TrainConfig};
use ember_engine::data::synthetic::{SyntheticData, EVAL_START};
use ember_engine::data::{Batch, DataSource};
use ember_engine::metrics::{auc, evaluate};

fn tiny() -> TrainConfig {
    preset("tiny", None).unwrap()
}

fn gen(cfg: &TrainConfig) -> SyntheticData {
    SyntheticData::new(cfg).unwrap()
}

#[test]
fn samples_are_a_pure_function_of_the_index() {
    let cfg = tiny();
    let (a, b) = (gen(&cfg), gen(&cfg));
    let whole = a.samples(0, 600);
    assert_eq!(whole.size(), 600);
    whole.validate(&cfg.model).unwrap();
    assert_eq!(whole, b.samples(0, 600));
    // Ranges concatenate, also across the generator's internal chunking (256).
    let mut cat = a.samples(0, 10);
    cat.extend(&a.samples(10, 10));
    assert_eq!(cat, a.samples(0, 20));
    let mut cat = a.samples(0, 255);
    cat.extend(&a.samples(255, 345));
    assert_eq!(cat, whole);
    assert_eq!(a.samples(300, 77), whole.slice(300..377));
    // Another seed gives other data.
    let mut other = cfg.clone();
    other.seed = 2;
    assert_ne!(gen(&other).samples(0, 50), whole.slice(0..50));
    assert_eq!(a.samples(5, 0).size(), 0);
}

#[test]
fn stream_position_skip_and_eval_set() {
    let cfg = tiny();
    let mut s = gen(&cfg);
    let ref_ = s.samples(0, 300);
    let b1 = s.next_batch(7).unwrap().unwrap();
    let b2 = s.next_batch(93).unwrap().unwrap();
    assert_eq!(s.position(), 100);
    let mut cat = b1;
    cat.extend(&b2);
    assert_eq!(cat, ref_.slice(0..100));
    s.skip(150).unwrap();
    assert_eq!(s.position(), 250);
    assert_eq!(s.next_batch(50).unwrap().unwrap(), ref_.slice(250..300));
    assert_eq!(s.len(), None);
    let ev = s.eval_set().unwrap();
    assert_eq!(ev.size(), cfg.synthetic.eval_samples);
    assert_eq!(ev.slice(0..100), s.samples(EVAL_START, 100));
    ev.validate(&cfg.model).unwrap();
}

/// Counts of each popularity rank of table `t` in `batch`.
fn rank_counts(g: &SyntheticData, batch: &Batch, t: usize, ranks: usize) -> (Vec<f64>, f64) {
    let mut c = vec![0.0; ranks];
    for &row in &batch.sparse[t].values {
        let r = g.rank_of(t, row) as usize;
        if r < ranks {
            c[r] += 1.0;
        }
    }
    (c, batch.sparse[t].values.len() as f64)
}

#[test]
fn zipf_skew_matches_the_stated_probabilities() {
    let cfg = tiny();
    assert_eq!(cfg.synthetic.zipf, 1.05);
    let g = gen(&cfg);
    let b = g.samples(0, 60_000);
    for t in [0usize, 4, 7] {
        let rows = cfg.model.tables[t].rows;
        // The permutation is a bijection and hides popularity from the id value.
        let top: Vec<u64> = (0..20).map(|r| g.row_of_rank(t, r)).collect();
        assert!(top.iter().filter(|&&r| r < 20).count() < 5, "table {t}: popular rows are small ids {top:?}");
        for r in (0..rows).step_by((rows / 97).max(1) as usize) {
            assert_eq!(g.rank_of(t, g.row_of_rank(t, r)), r);
        }
        let (c, n) = rank_counts(&g, &b, t, 64);
        for (r, &k) in c.iter().enumerate() {
            let p = g.rank_probability(t, r as u64);
            let sd = (n * p * (1.0 - p)).sqrt();
            assert!((k - n * p).abs() < 5.0 * sd + 1.0, "table {t} rank {r}: {k} draws, expected {}", n * p);
        }
        // Zipf(1.05): rank 0 is about 10^1.05 = 11.2 times as frequent as rank 9.
        let ratio = c[0] / c[9];
        assert!((8.0..15.5).contains(&ratio), "table {t}: rank0/rank9 = {ratio}");
        // Heavy skew: the top 1 % of rows take a large share of the draws.
        let top1: f64 = (0..(rows / 100) as u64).map(|r| g.rank_probability(t, r)).sum();
        let measured = b.sparse[t].values.iter().filter(|&&row| g.rank_of(t, row) < rows / 100).count() as f64 / n;
        assert!((measured - top1).abs() < 0.01, "table {t}: top-1% share {measured} vs {top1}");
        assert!(measured > 0.35, "table {t}: top 1% of rows hold only {measured} (uniform: 0.01)");
        // The stated probabilities sum to 1.
        let sum: f64 = (0..rows).map(|r| g.rank_probability(t, r)).sum();
        assert!((sum - 1.0).abs() < 1e-9, "table {t}: probabilities sum to {sum}");
    }
}

#[test]
fn zipf_zero_is_uniform() {
    let mut cfg = tiny();
    cfg.synthetic.zipf = 0.0;
    let g = gen(&cfg);
    let b = g.samples(0, 40_000);
    // Table 5: 50 rows, bag 3 → ~114k draws, ~2280 per row. Chi-square with 49 dof: mean 49, sd 9.9.
    let t = 5;
    let mut c = [0.0f64; 50];
    for &r in &b.sparse[t].values {
        c[r as usize] += 1.0;
    }
    let n: f64 = c.iter().sum();
    let e = n / 50.0;
    let chi2: f64 = c.iter().map(|k| (k - e).powi(2) / e).sum();
    assert!(chi2 < 100.0, "chi2 = {chi2}");
    let ora = g.oracle_eval();
    assert!(ora.auc > 0.7, "{ora:?}");
}

#[test]
fn bags_vary_around_bag_size_and_include_empty_ones() {
    let cfg = tiny();
    let b = gen(&cfg).samples(0, 20_000);
    for (t, tc) in cfg.model.tables.iter().enumerate() {
        let l = &b.sparse[t].lengths;
        let empty = l.iter().filter(|&&x| x == 0).count() as f64 / l.len() as f64;
        assert!((0.04..0.06).contains(&empty), "table {t}: {empty} empty bags");
        let mean = l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64;
        let want = 0.95 * tc.bag_size as f64;
        assert!((mean - want).abs() < 0.03 * want, "table {t}: mean bag {mean}, want {want}");
        let max = *l.iter().max().unwrap() as usize;
        assert_eq!(max, tc.bag_size + tc.bag_size / 2, "table {t}");
        if tc.bag_size > 1 {
            assert!(l.iter().filter(|&&x| x > 1).count() > l.len() / 2, "table {t}: multi-hot");
        }
    }
}

#[test]
fn dense_features_look_like_log_counts() {
    let cfg = tiny();
    let b = gen(&cfg).samples(0, 10_000);
    assert_eq!(b.num_dense, 13);
    assert!(b.dense.iter().all(|x| x.is_finite() && *x >= 0.0 && *x < 20.0));
    for j in 0..13 {
        let col: Vec<f32> = b.dense.iter().skip(j).step_by(13).copied().collect();
        let zeros = col.iter().filter(|&&x| x == 0.0).count() as f64 / col.len() as f64;
        assert!(zeros >= 0.08, "feature {j}: {zeros} zeros (10 % missing at least)");
        // Values are ln(1 + integer): exp(x) - 1 is an integer.
        for &x in col.iter().take(200) {
            let k = (x as f64).exp() - 1.0;
            assert!((k - k.round()).abs() < 1e-3 * (1.0 + k), "feature {j}: {x} is not ln(1 + count)");
        }
    }
    let mean = b.dense.iter().map(|&x| x as f64).sum::<f64>() / b.dense.len() as f64;
    assert!((1.0..5.0).contains(&mean), "mean dense value {mean}");
}

#[test]
fn oracle_auc_and_positive_rate_in_range() {
    let cfg = tiny();
    let g = gen(&cfg);
    let ev = g.eval_batch();
    let logits = g.oracle_logits(&ev);
    let r = evaluate(&logits, &ev.labels);
    eprintln!("tiny oracle on the eval set: {r:?}");
    assert!((0.75..0.85).contains(&r.auc), "oracle AUC {}", r.auc);
    assert!(r.ne < 0.9, "oracle NE {}", r.ne);
    assert_eq!(r, g.oracle_eval());
    let train = g.samples(0, 30_000);
    for (name, b) in [("train", &train), ("eval", &ev)] {
        let rate = b.labels.iter().map(|&y| y as f64).sum::<f64>() / b.size() as f64;
        assert!((0.20..0.35).contains(&rate), "{name} positive rate {rate}");
    }
    // Labels are Bernoulli(sigmoid(oracle logit)): the mean probability matches the rate
    // (sd of the difference ≈ sqrt(0.2/30000) = 0.0026).
    let lt = g.oracle_logits(&train);
    let mean_p = lt.iter().map(|&x| 1.0 / (1.0 + (-x as f64).exp())).sum::<f64>() / lt.len() as f64;
    let rate = train.labels.iter().map(|&y| y as f64).sum::<f64>() / train.size() as f64;
    assert!((mean_p - rate).abs() < 0.012, "mean p {mean_p} vs rate {rate}");
    // Calibrated: high-probability samples are positive more often, bucket by bucket.
    for (lo, hi) in [(0.0, 0.1), (0.1, 0.3), (0.3, 0.6), (0.6, 1.0)] {
        let (mut n, mut pos, mut ps) = (0.0, 0.0, 0.0);
        for (&x, &y) in lt.iter().zip(&train.labels) {
            let p = 1.0 / (1.0 + (-x as f64).exp());
            if p >= lo && p < hi {
                n += 1.0;
                pos += y as f64;
                ps += p;
            }
        }
        if n > 500.0 {
            let (obs, exp) = (pos / n, ps / n);
            assert!((obs - exp).abs() < 4.0 * (exp * (1.0 - exp) / n).sqrt() + 0.005, "bucket {lo}-{hi}: {obs} vs {exp}");
        }
    }
}

#[test]
fn signal_controls_difficulty() {
    let mut aucs = vec![];
    for s in [0.0f32, 0.5, 1.0, 2.0] {
        let mut cfg = tiny();
        cfg.synthetic.signal = s;
        cfg.synthetic.eval_samples = 30_000;
        let g = gen(&cfg);
        let ev = g.eval_batch();
        let rate = ev.labels.iter().map(|&y| y as f64).sum::<f64>() / ev.size() as f64;
        assert!((0.2..0.35).contains(&rate), "signal {s}: rate {rate}");
        aucs.push(auc(&g.oracle_logits(&ev), &ev.labels));
    }
    // signal 0: the logits are constant: AUC exactly 0.5.
    assert_eq!(aucs[0], 0.5, "{aucs:?}");
    assert!(aucs[1] < aucs[2] && aucs[2] < aucs[3], "{aucs:?}");
}

#[test]
fn oracle_carries_its_signal_in_frequent_rows() {
    // The learnability design: the oracle with the effects of rare rows removed (ids seen < 5
    // times in 150k training samples replaced by an unseen row) keeps nearly all its AUC.
    let cfg = tiny();
    let g = gen(&cfg);
    let train = g.samples(0, 150_000);
    let mut ev = g.eval_batch();
    let full = auc(&g.oracle_logits(&ev), &ev.labels);
    let mut rare = 0usize;
    let mut total = 0usize;
    for (t, tc) in cfg.model.tables.iter().enumerate() {
        let mut cnt = std::collections::HashMap::<u64, u32>::new();
        for &r in &train.sparse[t].values {
            *cnt.entry(r).or_default() += 1;
        }
        // A row never drawn in 300k extra samples stands in for "no effect learned".
        let seen: std::collections::HashSet<u64> = g.samples(1 << 30, 300_000).sparse[t].values.iter().copied().collect();
        let Some(unseen) = (0..tc.rows).find(|r| !seen.contains(r) && !cnt.contains_key(r)) else { continue };
        for v in ev.sparse[t].values.iter_mut() {
            total += 1;
            if cnt.get(v).copied().unwrap_or(0) < 5 {
                *v = unseen;
                rare += 1;
            }
        }
    }
    let pruned = auc(&g.oracle_logits(&ev), &ev.labels);
    eprintln!("oracle AUC {full}, without rare rows {pruned} ({rare} of {total} ids rare)");
    assert!((pruned - 0.5) >= 0.95 * (full - 0.5), "full {full}, pruned {pruned}");
}

#[test]
fn presets_build_with_valid_batches() {
    for name in ["tiny", "kaggle", "terabyte", "dlrmv2", "bench"] {
        let cfg = preset(name, Some(100_000)).unwrap();
        let g = gen(&cfg);
        let b = g.samples(123, 64);
        b.validate(&cfg.model).unwrap();
        let rate = b.labels.iter().sum::<f32>();
        assert!(rate < 64.0);
    }
    let mut bad = tiny();
    bad.synthetic.zipf = -1.0;
    assert!(SyntheticData::new(&bad).is_err());
}
