//! Metrics against independent oracles: AUC against a brute-force pair count, log loss against
//! the f64 formula (extreme logits included), NE against hand-computed values.
use ember_engine::metrics::{auc, bce_with_logits, entropy, evaluate, log_loss, normalized_entropy, EvalResult};
use ember_engine::rng::Rng;

/// O(n²): P(score of a positive > score of a negative) + ½ P(tie).
fn brute_auc(s: &[f32], y: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for i in 0..s.len() {
        for j in 0..s.len() {
            if y[i] > 0.5 && y[j] < 0.5 {
                den += 1.0;
                if s[i] > s[j] {
                    num += 1.0;
                } else if s[i] == s[j] {
                    num += 0.5;
                }
            }
        }
    }
    num / den
}

#[test]
fn auc_matches_brute_force_with_ties() {
    let mut rng = Rng::new(7);
    for &(n, levels) in &[(2usize, 2u64), (3, 1), (17, 3), (100, 5), (500, 20), (1000, 1000), (3000, 7)] {
        for rep in 0..5 {
            let s: Vec<f32> = (0..n).map(|_| rng.below(levels) as f32 * 0.25 - 1.0).collect();
            // Labels correlated with the score, so the AUC is not always near 0.5.
            let y: Vec<f32> = s.iter().map(|&x| if rng.f32() < 0.3 + 0.2 * x.tanh() { 1.0 } else { 0.0 }).collect();
            let pos = y.iter().filter(|&&v| v > 0.5).count();
            if pos == 0 || pos == n {
                continue;
            }
            let (a, b) = (auc(&s, &y), brute_auc(&s, &y));
            assert!((a - b).abs() < 1e-12, "n={n} levels={levels} rep={rep}: auc {a} brute {b}");
        }
    }
}

#[test]
fn auc_known_values() {
    assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &[0.0, 0.0, 1.0, 1.0]), 1.0);
    assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &[0.0, 0.0, 1.0, 1.0]), 0.0);
    assert_eq!(auc(&[1.0; 6], &[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]), 0.5);
    // One positive (0.5) above 2 of 3 negatives, tied with none: 2/3.
    assert!((auc(&[0.5, 0.1, 0.2, 0.9], &[1.0, 0.0, 0.0, 0.0]) - 2.0 / 3.0).abs() < 1e-15);
    // A tie between the positive and one negative counts a half: (1 + 0.5) / 2.
    assert_eq!(auc(&[0.5, 0.5, 0.1], &[1.0, 0.0, 0.0]), 0.75);
    // Single class and empty: defined as 0.5.
    assert_eq!(auc(&[0.1, 0.9], &[1.0, 1.0]), 0.5);
    assert_eq!(auc(&[0.1, 0.9], &[0.0, 0.0]), 0.5);
    assert_eq!(auc(&[], &[]), 0.5);
    // -0.0 and 0.0 are a tie.
    assert_eq!(auc(&[-0.0, 0.0], &[1.0, 0.0]), 0.5);
}

#[test]
fn auc_large_input_uses_parallel_sort_correctly() {
    // 200k samples: score = label + noise with few levels; compare against a counting formula.
    let mut rng = Rng::new(3);
    let n = 200_000;
    let y: Vec<f32> = (0..n).map(|_| if rng.f32() < 0.25 { 1.0 } else { 0.0 }).collect();
    let s: Vec<f32> = y.iter().map(|&l| (l + rng.below(4) as f32) * 0.5).collect();
    // Exact by histogram over the 5 possible levels (0, 0.5, ..., 2.0).
    let mut hp = [0f64; 5];
    let mut hn = [0f64; 5];
    for (&sc, &l) in s.iter().zip(&y) {
        let k = (sc * 2.0) as usize;
        if l > 0.5 {
            hp[k] += 1.0
        } else {
            hn[k] += 1.0
        }
    }
    let mut num = 0.0;
    for i in 0..5 {
        for j in 0..5 {
            num += hp[i] * hn[j] * if i > j { 1.0 } else if i == j { 0.5 } else { 0.0 };
        }
    }
    let expect = num / (hp.iter().sum::<f64>() * hn.iter().sum::<f64>());
    assert!((auc(&s, &y) - expect).abs() < 1e-12);
}

/// The f64 textbook formula −y ln σ(x) − (1−y) ln(1−σ(x)), with ln σ(x) = −ln(1 + e^−x) and
/// ln(1 − σ(x)) = −ln(1 + e^x) (exact for |x| ≤ 30), written differently from the implementation.
fn ref_loss(x: f64, y: f64) -> f64 {
    y * (-x).exp().ln_1p() + (1.0 - y) * x.exp().ln_1p()
}

#[test]
fn log_loss_matches_formula_and_survives_extreme_logits() {
    let mut rng = Rng::new(11);
    for _ in 0..2000 {
        let x = (rng.f64() - 0.5) * 30.0;
        let y = if rng.f32() < 0.5 { 0.0 } else { 1.0 };
        let (a, b) = (bce_with_logits(x, y), ref_loss(x, y));
        assert!((a - b).abs() <= 1e-12 * (1.0 + b), "x={x} y={y}: {a} vs {b}");
    }
    assert!((bce_with_logits(0.0, 1.0) - std::f64::consts::LN_2).abs() < 1e-15);
    // Extreme logits: the naive formula gives inf/NaN; the loss is exactly |x| when wrong.
    assert_eq!(bce_with_logits(1e4, 0.0), 1e4);
    assert_eq!(bce_with_logits(-1e4, 1.0), 1e4);
    assert!(bce_with_logits(1e4, 1.0) >= 0.0 && bce_with_logits(1e4, 1.0) < 1e-300);
    assert!((bce_with_logits(-100.0, 0.0) - (-100f64).exp()).abs() < 1e-50);
    let l = log_loss(&[1e4, -1e4, 1e4, -1e4, 0.0], &[1.0, 0.0, 0.0, 1.0, 1.0]);
    assert!((l - (2e4 + std::f64::consts::LN_2) / 5.0).abs() < 1e-9, "{l}");
    let f32max = log_loss(&[f32::MAX, -f32::MAX], &[0.0, 1.0]);
    assert!((f32max - f32::MAX as f64).abs() / (f32::MAX as f64) < 1e-12);
}

#[test]
fn normalized_entropy_hand_values() {
    // Predicting the base rate exactly gives NE = 1.
    let p: f64 = 0.25;
    let logit = (p / (1.0 - p)).ln() as f32;
    let ne = normalized_entropy(&[logit; 4], &[1.0, 0.0, 0.0, 0.0]);
    assert!((ne - 1.0).abs() < 1e-6, "{ne}");
    assert!((normalized_entropy(&[0.0; 2], &[1.0, 0.0]) - 1.0).abs() < 1e-15);
    // labels [1, 0], logits [2, -1]: loss = (ln(1+e^-2) + ln(1+e^-1)) / 2 = (0.12692801104297 +
    // 0.31326168751822) / 2 = 0.22009484928060; H(0.5) = ln 2 = 0.69314718055995; NE = 0.31752945...
    let r = evaluate(&[2.0, -1.0], &[1.0, 0.0]);
    assert!((r.loss - 0.22009484928060).abs() < 1e-12, "{r:?}");
    assert!((r.ne - 0.22009484928060 / 0.69314718055995).abs() < 1e-11, "{r:?}");
    assert_eq!(r.auc, 1.0);
    assert_eq!(r.samples, 2);
    // entropy by hand: H(0.25) = 0.25 ln 4 + 0.75 ln(4/3) = 0.34657359 + 0.21576155 = 0.56233514.
    assert!((entropy(0.25) - 0.5623351446188083).abs() < 1e-12);
    assert_eq!(entropy(0.0), 0.0);
    assert_eq!(entropy(1.0), 0.0);
}

#[test]
fn single_class_and_empty_have_defined_values() {
    // All positive, n = 4: rate clamped to 1 − 1/8 = 0.875;
    // H = −0.875 ln 0.875 − 0.125 ln 0.125 = 0.11683997 + 0.25993019 = 0.37677016.
    let r = evaluate(&[0.0; 4], &[1.0; 4]);
    let h = -(0.875f64 * 0.875f64.ln()) - 0.125 * 0.125f64.ln();
    assert!((h - 0.3767701613).abs() < 1e-9);
    assert!((r.ne - std::f64::consts::LN_2 / h).abs() < 1e-12, "{r:?}");
    assert!(r.ne.is_finite() && r.loss.is_finite());
    assert_eq!(r.auc, 0.5);
    let r = evaluate(&[-5.0; 3], &[0.0; 3]);
    assert!(r.ne.is_finite() && r.ne > 0.0);
    assert_eq!(evaluate(&[], &[]), EvalResult::EMPTY);
    assert_eq!(EvalResult::EMPTY, EvalResult { loss: 0.0, ne: 1.0, auc: 0.5, samples: 0 });
}
