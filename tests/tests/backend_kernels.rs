//! Dense CPU kernels against f64 references on random shapes: gemm (all transpose combinations,
//! alpha/beta), bias_act, act_backward, col_sum, copy_block, axpy/scale, dot_interaction
//! (+backward), cross_combine (+backward), bce_with_logits (extreme logits), dense_update.
use ember_engine::backend::{Act, Cpu, DenseUpdate, Gemm, Layout, Numerics};
use ember_engine::config::DenseOptimizer;
use ember_tests::oracle::*;

#[test]
fn gemm_all_transposes_alpha_beta() {
    let be = Cpu::new();
    let mut rng = TestRng::new(1);
    // Small shapes and a few that take the parallel path (m·n·k ≥ 2^18).
    let mut shapes: Vec<(usize, usize, usize)> = (0..40).map(|_| (rng.usize_in(1, 37), rng.usize_in(1, 41), rng.usize_in(1, 29))).collect();
    shapes.extend([(70, 90, 50), (128, 64, 33), (1, 300, 1000), (257, 1, 1100)]);
    for (idx, &(m, n, k)) in shapes.iter().enumerate() {
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.7, 0.0), (1.0, 1.0), (-1.3, 0.45)] {
                let a = rng.vec_f32(m * k, -1.0, 1.0);
                let b = rng.vec_f32(k * n, -1.0, 1.0);
                // With beta == 0, C's old contents (NaN here) must be ignored.
                let c0: Vec<f32> = if beta == 0.0 { vec![f32::NAN; m * n] } else { rng.vec_f32(m * n, -1.0, 1.0) };
                let mut c = c0.clone();
                be.gemm(Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha, beta }, &a, &b, &mut c).unwrap();
                let mut want = to_f64(&c0);
                gemm_ref(m, n, k, ta, tb, alpha as f64, &to_f64(&a), &to_f64(&b), beta as f64, &mut want);
                let tol = 1e-5 * (k as f64).sqrt() + 1e-6;
                assert_close(&c, &want, 1e-5, tol, &format!("gemm #{idx} {m}x{n}x{k} ta={ta} tb={tb} alpha={alpha} beta={beta}"));
            }
        }
    }
}

#[test]
fn gemm_empty_inner_dimension() {
    // k = 0: op(A)·op(B) is the zero matrix, so C = beta·C (all zeros when beta = 0).
    let be = Cpu::new();
    for beta in [0.0f32, 0.5] {
        let mut c = vec![3.0f32; 6];
        be.gemm(Gemm { m: 2, n: 3, k: 0, trans_a: false, trans_b: false, alpha: 1.0, beta }, &vec![], &vec![], &mut c).unwrap();
        assert_close(&c, &vec![3.0 * beta as f64; 6], 0.0, 0.0, &format!("gemm k=0 beta={beta}"));
    }
}

#[test]
fn bias_act_and_act_backward() {
    let be = Cpu::new();
    let mut rng = TestRng::new(2);
    for _ in 0..30 {
        let (rows, cols) = (rng.usize_in(1, 70), rng.usize_in(1, 45));
        for act in [Act::None, Act::Relu] {
            let x0 = rng.vec_f32(rows * cols, -1.0, 1.0);
            let bias = rng.vec_f32(cols, -0.5, 0.5);
            let mut x = x0.clone();
            be.bias_act(&mut x, &bias, rows, cols, act).unwrap();
            let want: Vec<f64> = (0..rows * cols)
                .map(|i| {
                    let y = x0[i] as f64 + bias[i % cols] as f64;
                    if act == Act::Relu { y.max(0.0) } else { y }
                })
                .collect();
            assert_close(&x, &want, 1e-6, 1e-7, &format!("bias_act {rows}x{cols} {act:?}"));

            // dy *= act'(y): ReLU passes the gradient where y > 0 only.
            let dy0 = rng.vec_f32(rows * cols, -1.0, 1.0);
            let mut dy = dy0.clone();
            be.act_backward(&x, &mut dy, act).unwrap();
            let want: Vec<f64> = (0..rows * cols)
                .map(|i| if act == Act::Relu && x[i] <= 0.0 { 0.0 } else { dy0[i] as f64 })
                .collect();
            assert_close(&dy, &want, 0.0, 0.0, &format!("act_backward {rows}x{cols} {act:?}"));
        }
    }
}

#[test]
fn col_sum_with_beta() {
    let be = Cpu::new();
    let mut rng = TestRng::new(3);
    for _ in 0..30 {
        let (rows, cols) = (rng.usize_in(1, 300), rng.usize_in(1, 40));
        for beta in [0.0f32, 1.0, 0.3] {
            let x = rng.vec_f32(rows * cols, -1.0, 1.0);
            let out0 = if beta == 0.0 { vec![f32::NAN; cols] } else { rng.vec_f32(cols, -1.0, 1.0) };
            let mut out = out0.clone();
            be.col_sum(&x, rows, cols, beta, &mut out).unwrap();
            let want: Vec<f64> = (0..cols)
                .map(|c| {
                    let s: f64 = (0..rows).map(|r| x[r * cols + c] as f64).sum();
                    if beta == 0.0 { s } else { beta as f64 * out0[c] as f64 + s }
                })
                .collect();
            assert_close(&out, &want, 1e-5, 1e-5 * (rows as f64).sqrt(), &format!("col_sum {rows}x{cols} beta={beta}"));
        }
    }
}

#[test]
fn copy_block_both_directions() {
    let be = Cpu::new();
    let mut rng = TestRng::new(4);
    for _ in 0..30 {
        let rows = rng.usize_in(1, 50);
        let cols = rng.usize_in(1, 20);
        let col = rng.usize_in(0, 10);
        let stride = col + cols + rng.usize_in(0, 7);
        let layout = Layout { stride, col };
        let wide0 = rng.vec_f32(rows * stride, -1.0, 1.0);
        let mut narrow = rng.vec_f32(rows * cols, -1.0, 1.0);
        let narrow0 = narrow.clone();
        let mut wide = wide0.clone();
        be.copy_block(&mut narrow, &mut wide, rows, cols, layout, true).unwrap();
        let mut want = wide0.clone();
        for r in 0..rows {
            want[r * stride + col..r * stride + col + cols].copy_from_slice(&narrow0[r * cols..(r + 1) * cols]);
        }
        assert_bitwise(&wide, &want, "copy_block to wide");
        assert_bitwise(&narrow, &narrow0, "copy_block to wide leaves narrow");
        // And back out of a different wide matrix.
        let wide2 = rng.vec_f32(rows * stride, -1.0, 1.0);
        let mut w2 = wide2.clone();
        be.copy_block(&mut narrow, &mut w2, rows, cols, layout, false).unwrap();
        let want: Vec<f32> = (0..rows * cols).map(|i| wide2[(i / cols) * stride + col + i % cols]).collect();
        assert_bitwise(&narrow, &want, "copy_block from wide");
        assert_bitwise(&w2, &wide2, "copy_block from wide leaves wide");
    }
}

#[test]
fn axpy_and_scale() {
    let be = Cpu::new();
    let mut rng = TestRng::new(5);
    for n in [1usize, 7, 8192, 20000] {
        let x = rng.vec_f32(n, -1.0, 1.0);
        let y0 = rng.vec_f32(n, -1.0, 1.0);
        let mut y = y0.clone();
        be.axpy(-0.75, &x, &mut y).unwrap();
        let want: Vec<f64> = (0..n).map(|i| y0[i] as f64 - 0.75 * x[i] as f64).collect();
        assert_close(&y, &want, 1e-6, 1e-7, "axpy");
        be.scale(&mut y, 2.5).unwrap();
        let want: Vec<f64> = want.iter().map(|v| v * 2.5).collect();
        assert_close(&y, &want, 1e-6, 1e-6, "scale");
    }
}

#[test]
fn dot_interaction_forward_and_backward() {
    let be = Cpu::new();
    let mut rng = TestRng::new(6);
    for _ in 0..25 {
        let batch = rng.usize_in(1, 20);
        let f = rng.usize_in(0, 7);
        let d = rng.usize_in(1, 13);
        let v = (f + 1) * d;
        let w = d + (f + 1) * f / 2;
        let x = rng.vec_f32(batch * v, -1.0, 1.0);
        let mut out = vec![f32::NAN; batch * w];
        be.dot_interaction(&x, batch, f, d, &mut out).unwrap();
        let xd = to_f64(&x);
        let want: Vec<f64> = (0..batch).flat_map(|i| dot_interaction_ref(&xd[i * v..(i + 1) * v], f, d)).collect();
        assert_close(&out, &want, 1e-5, 1e-6, &format!("dot_interaction b{batch} f{f} d{d}"));

        // Backward: dx = Jᵀ dout, the Jacobian of the reference written out by hand.
        let dout = rng.vec_f32(batch * w, -1.0, 1.0);
        let mut dx = vec![f32::NAN; batch * v];
        be.dot_interaction_backward(&x, &dout, batch, f, d, &mut dx).unwrap();
        let mut want = vec![0.0f64; batch * v];
        for s in 0..batch {
            let (xs, o, g) = (&xd[s * v..(s + 1) * v], &dout[s * w..(s + 1) * w], &mut want[s * v..(s + 1) * v]);
            for t in 0..d {
                g[t] += o[t] as f64;
            }
            let mut k = d;
            for i in 1..=f {
                for j in 0..i {
                    for t in 0..d {
                        g[i * d + t] += o[k] as f64 * xs[j * d + t];
                        g[j * d + t] += o[k] as f64 * xs[i * d + t];
                    }
                    k += 1;
                }
            }
        }
        assert_close(&dx, &want, 1e-5, 1e-5, &format!("dot_interaction_backward b{batch} f{f} d{d}"));

        // And the same gradient by f64 central differences of the reference (independent of the
        // hand-written Jacobian) for a few entries.
        for _ in 0..5 {
            let s = rng.usize_in(0, batch - 1);
            let e = rng.usize_in(0, v - 1);
            let h = 1e-6;
            let obj = |xp: &[f64]| -> f64 {
                dot_interaction_ref(xp, f, d).iter().zip(&dout[s * w..(s + 1) * w]).map(|(a, &b)| a * b as f64).sum()
            };
            let mut xp = xd[s * v..(s + 1) * v].to_vec();
            xp[e] += h;
            let up = obj(&xp);
            xp[e] -= 2.0 * h;
            let dn = obj(&xp);
            let fd = (up - dn) / (2.0 * h);
            assert_close(&dx[s * v + e..s * v + e + 1], &[fd], 1e-4, 1e-5, "dot_interaction_backward vs finite differences");
        }
    }
}

#[test]
fn cross_combine_forward_and_backward() {
    let be = Cpu::new();
    let mut rng = TestRng::new(7);
    for _ in 0..25 {
        let (rows, cols) = (rng.usize_in(1, 40), rng.usize_in(1, 50));
        let n = rows * cols;
        let x0 = rng.vec_f32(n, -1.0, 1.0);
        let uv = rng.vec_f32(n, -1.0, 1.0);
        let xl = rng.vec_f32(n, -1.0, 1.0);
        let bias = rng.vec_f32(cols, -1.0, 1.0);
        let mut out = vec![f32::NAN; n];
        be.cross_combine(&x0, &uv, &bias, &xl, rows, cols, &mut out).unwrap();
        let want: Vec<f64> = (0..n).map(|i| x0[i] as f64 * (uv[i] as f64 + bias[i % cols] as f64) + xl[i] as f64).collect();
        assert_close(&out, &want, 1e-6, 1e-6, "cross_combine");

        let dout = rng.vec_f32(n, -1.0, 1.0);
        let dx0_init = rng.vec_f32(n, -1.0, 1.0);
        let mut duv = vec![f32::NAN; n];
        let mut dx0 = dx0_init.clone();
        be.cross_combine_backward(&x0, &uv, &bias, &dout, rows, cols, &mut duv, &mut dx0).unwrap();
        let want_duv: Vec<f64> = (0..n).map(|i| dout[i] as f64 * x0[i] as f64).collect();
        // dx0 accumulates.
        let want_dx0: Vec<f64> = (0..n).map(|i| dx0_init[i] as f64 + dout[i] as f64 * (uv[i] as f64 + bias[i % cols] as f64)).collect();
        assert_close(&duv, &want_duv, 1e-6, 1e-7, "cross_combine_backward duv");
        assert_close(&dx0, &want_dx0, 1e-6, 1e-6, "cross_combine_backward dx0 (accumulated)");
    }
}

#[test]
fn bce_with_logits_including_extreme_logits() {
    let be = Cpu::new();
    let mut rng = TestRng::new(8);
    // Single samples at extreme and ordinary logits: each loss to relative precision.
    for &x in &[-50.0f32, -30.0, -10.0, -1.0, -1e-3, 0.0, 1e-3, 0.5, 10.0, 30.0, 50.0] {
        for y in [0.0f32, 1.0] {
            let mut dl = vec![f32::NAN];
            let loss = be.bce_with_logits(&vec![x], &vec![y], 0.25, &mut dl).unwrap();
            let want = bce_ref(x as f64, y as f64);
            assert!(loss.is_finite() && (loss - want).abs() <= 1e-6 * want.abs() + 1e-30, "bce loss at x={x} y={y}: {loss:e} vs {want:e}");
            let wg = 0.25 * (sigmoid(x as f64) - y as f64);
            assert_close(&dl, &[wg], 1e-5, 1e-8, &format!("bce dlogit at x={x} y={y}"));
        }
    }
    // A random batch: the sum and every gradient.
    for _ in 0..10 {
        let n = rng.usize_in(1, 500);
        let logits = rng.vec_f32(n, -8.0, 8.0);
        let labels: Vec<f32> = (0..n).map(|_| (rng.below(2)) as f32).collect();
        let scale = 1.0 / n as f32;
        let mut dl = vec![f32::NAN; n];
        let loss = be.bce_with_logits(&logits, &labels, scale, &mut dl).unwrap();
        let want: f64 = logits.iter().zip(&labels).map(|(&x, &y)| bce_ref(x as f64, y as f64)).sum();
        assert!((loss - want).abs() <= 1e-5 * want, "bce sum {loss} vs {want}");
        let wg: Vec<f64> = logits.iter().zip(&labels).map(|(&x, &y)| scale as f64 * (sigmoid(x as f64) - y as f64)).collect();
        // σ(x) − y near |σ − y| ≪ 1 cancels in f32: allow a few f32 ulps of 1, times the scale.
        assert_close(&dl, &wg, 1e-5, 2.5e-7 * scale as f64, "bce dlogits");
    }
}

#[test]
fn dense_update_sgd_adagrad_l2_several_steps() {
    let be = Cpu::new();
    let mut rng = TestRng::new(9);
    let cases = [
        (DenseOptimizer::Sgd { lr: 0.1 }, 0.0f32),
        (DenseOptimizer::Sgd { lr: 0.05 }, 0.01),
        (DenseOptimizer::Adagrad { lr: 0.1, eps: 1e-8 }, 0.0),
        (DenseOptimizer::Adagrad { lr: 0.03, eps: 0.1 }, 0.02),
    ];
    for (opt, l2) in cases {
        let n = rng.usize_in(1, 300);
        let mut p = rng.vec_f32(n, -1.0, 1.0);
        let mut s = vec![0.0f32; n];
        let mut rp = to_f64(&p);
        let mut rs = vec![0.0f64; n];
        let upd = DenseUpdate { opt, l2 };
        for step in 0..5 {
            let g = rng.vec_f32(n, -1.0, 1.0);
            be.dense_update(&mut p, &g, &mut s, &upd).unwrap();
            for i in 0..n {
                let gi = g[i] as f64 + l2 as f64 * rp[i];
                match opt {
                    DenseOptimizer::Sgd { lr } => rp[i] -= lr as f64 * gi,
                    DenseOptimizer::Adagrad { lr, eps } => {
                        rs[i] += gi * gi;
                        rp[i] -= lr as f64 * gi / (rs[i].sqrt() + eps as f64);
                    }
                }
            }
            assert_close(&p, &rp, 1e-5, 1e-6, &format!("dense_update {opt:?} l2={l2} step {step}"));
            if let DenseOptimizer::Adagrad { .. } = opt {
                assert_close(&s, &rs, 1e-5, 1e-6, &format!("dense_update state {opt:?} step {step}"));
            }
        }
    }
}
