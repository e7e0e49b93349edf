//! The self-test must catch a backend that is wrong: the CPU backend with one fault injected
//! (everything else delegated) fails exactly the checks that exercise the fault.
use super::*;
use crate::backend::{Bags, Buffers, RowGrads, Shard};

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// GEMM scales its product by 1 + 1e-3.
    Gemm,
    /// The fused embedding update applies each step's gradient as two half steps: the same
    /// for SGD, not for AdaGrad (the accumulator grows differently).
    HalfSteps,
}

struct Faulty(Fault);

fn cpu_shard(s: &Shard<Faulty>) -> Shard<Cpu> {
    Shard { spec: s.spec.clone(), weights: s.weights.clone(), state: s.state.clone() }
}
fn cpu_bags(b: &Bags<Faulty>) -> Bags<Cpu> {
    Bags { num_bags: b.num_bags, offsets: b.offsets.clone(), ids: b.ids.clone(), scale: b.scale.clone() }
}
fn cpu_rg(r: &RowGrads<Faulty>) -> RowGrads<Cpu> {
    RowGrads { rows: r.rows.clone(), num_rows: r.num_rows, grads: r.grads.clone(), sq: r.sq.clone() }
}

impl Buffers for Faulty {
    type Buf = Vec<f32>;
    type Ids = Vec<u64>;
    type Staging = Vec<f32>;

    fn name(&self) -> &'static str {
        "faulty cpu"
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Cpu.zeros(n)
    }

    fn upload(&self, h: &[f32]) -> Result<Vec<f32>> {
        Cpu.upload(h)
    }

    fn download(&self, b: &Vec<f32>) -> Result<Vec<f32>> {
        Cpu.download(b)
    }

    fn upload_ids(&self, h: &[u64]) -> Result<Vec<u64>> {
        Cpu.upload_ids(h)
    }

    fn download_ids(&self, i: &Vec<u64>) -> Result<Vec<u64>> {
        Cpu.download_ids(i)
    }

    fn len(&self, b: &Vec<f32>) -> usize {
        b.len()
    }

    fn download_into(&self, b: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        Cpu.download_into(b, out)
    }

    fn upload_into(&self, src: &[f32], b: &mut Vec<f32>) -> Result<()> {
        Cpu.upload_into(src, b)
    }

    fn copy_2d(&self, src: &Vec<f32>, so: usize, ss: usize, dst: &mut Vec<f32>, d_o: usize, ds: usize, rows: usize, cols: usize) -> Result<()> {
        Cpu.copy_2d(src, so, ss, dst, d_o, ds, rows, cols)
    }

    fn gather_rows(&self, src: &Vec<f32>, rows: &Vec<u64>, n: usize, cols: usize, dst: &mut Vec<f32>, off: usize) -> Result<()> {
        Cpu.gather_rows(src, rows, n, cols, dst, off)
    }

    fn put_rows(&self, src: &Vec<f32>, off: usize, rows: &Vec<u64>, n: usize, cols: usize, dst: &mut Vec<f32>) -> Result<()> {
        Cpu.put_rows(src, off, rows, n, cols, dst)
    }

    fn staging(&self, n: usize) -> Result<Vec<f32>> {
        Cpu.staging(n)
    }

    fn addr(&self, b: &Vec<f32>) -> u64 {
        Cpu.addr(b)
    }

    unsafe fn copy_addr(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        // SAFETY: our caller meets this method's contract (live, non-overlapping ranges),
        // which is the whole of what the CPU backend's asks.
        unsafe { Cpu.copy_addr(src, dst, len) }
    }

    unsafe fn sum_from(&self, parts: u64, n: usize, len: usize, out: u64, acc: crate::backend::Accumulate) -> Result<()> {
        // SAFETY: as for copy_addr: the same contract as the CPU backend's.
        unsafe { Cpu.sum_from(parts, n, len, out, acc) }
    }

    fn direct_copy(&self) -> ember_transport::fabric::DirectCopy {
        Cpu.direct_copy()
    }
}

impl Numerics for Faulty {
    fn gemm(&self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        let g = if self.0 == Fault::Gemm { Gemm { alpha: g.alpha * 1.001, ..g } } else { g };
        Cpu.gemm(g, a, b, c)
    }

    fn bias_act(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize, act: Act) -> Result<()> {
        Cpu.bias_act(x, bias, rows, cols, act)
    }

    fn act_backward(&self, y: &Vec<f32>, dy: &mut Vec<f32>, act: Act) -> Result<()> {
        Cpu.act_backward(y, dy, act)
    }

    fn col_sum(&self, x: &Vec<f32>, rows: usize, cols: usize, beta: f32, out: &mut Vec<f32>) -> Result<()> {
        Cpu.col_sum(x, rows, cols, beta, out)
    }

    fn copy_block(&self, n: &mut Vec<f32>, w: &mut Vec<f32>, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()> {
        Cpu.copy_block(n, w, rows, cols, dst, to_wide)
    }

    fn scale_rows(&self, x: &mut Vec<f32>, off: usize, stride: usize, rows: usize, cols: usize, s: &Vec<f32>) -> Result<()> {
        Cpu.scale_rows(x, off, stride, rows, cols, s)
    }

    fn axpy(&self, a: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        Cpu.axpy(a, x, y)
    }

    fn scale(&self, x: &mut Vec<f32>, a: f32) -> Result<()> {
        Cpu.scale(x, a)
    }

    fn dot_interaction(&self, x: &Vec<f32>, batch: usize, f: usize, d: usize, out: &mut Vec<f32>) -> Result<()> {
        Cpu.dot_interaction(x, batch, f, d, out)
    }

    fn dot_interaction_backward(&self, x: &Vec<f32>, dout: &Vec<f32>, batch: usize, f: usize, d: usize, dx: &mut Vec<f32>) -> Result<()> {
        Cpu.dot_interaction_backward(x, dout, batch, f, d, dx)
    }

    fn cross_combine(&self, x0: &Vec<f32>, uv: &Vec<f32>, bias: &Vec<f32>, xl: &Vec<f32>, rows: usize, cols: usize, out: &mut Vec<f32>) -> Result<()> {
        Cpu.cross_combine(x0, uv, bias, xl, rows, cols, out)
    }

    fn cross_combine_backward(&self, x0: &Vec<f32>, uv: &Vec<f32>, bias: &Vec<f32>, dout: &Vec<f32>, rows: usize, cols: usize, duv: &mut Vec<f32>, dx0: &mut Vec<f32>) -> Result<()> {
        Cpu.cross_combine_backward(x0, uv, bias, dout, rows, cols, duv, dx0)
    }

    fn bce_with_logits(&self, logits: &Vec<f32>, labels: &Vec<f32>, scale: f32, d: &mut Vec<f32>) -> Result<f64> {
        Cpu.bce_with_logits(logits, labels, scale, d)
    }

    fn dense_update(&self, p: &mut Vec<f32>, g: &Vec<f32>, s: &mut Vec<f32>, upd: &DenseUpdate) -> Result<()> {
        Cpu.dense_update(p, g, s, upd)
    }

    fn embedding_forward(&self, shard: &Shard<Self>, bags: &Bags<Self>, out: &mut Vec<f32>, layout: Layout, acc: bool) -> Result<()> {
        Cpu.embedding_forward(&cpu_shard(shard), &cpu_bags(bags), out, layout, acc)
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Self>, bags: &Bags<Self>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        let mut cs = cpu_shard(shard);
        if self.0 == Fault::HalfSteps {
            let half: Vec<f32> = grad.iter().map(|g| g * 0.5).collect();
            Cpu.embedding_backward_update(&mut cs, &cpu_bags(bags), &half, layout, upd)?;
            Cpu.embedding_backward_update(&mut cs, &cpu_bags(bags), &half, layout, upd)?;
        } else {
            Cpu.embedding_backward_update(&mut cs, &cpu_bags(bags), grad, layout, upd)?;
        }
        shard.weights = cs.weights;
        shard.state = cs.state;
        Ok(())
    }

    fn embedding_row_grads(&self, shard: &Shard<Self>, bags: &Bags<Self>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Self>> {
        let r = Cpu.embedding_row_grads(&cpu_shard(shard), &cpu_bags(bags), grad, layout, upd)?;
        Ok(RowGrads { rows: r.rows, num_rows: r.num_rows, grads: r.grads, sq: r.sq })
    }

    fn embedding_apply(&self, shard: &mut Shard<Self>, rg: &RowGrads<Self>, row_sq: Option<&Vec<f32>>, upd: &EmbUpdate) -> Result<()> {
        let mut cs = cpu_shard(shard);
        Cpu.embedding_apply(&mut cs, &cpu_rg(rg), row_sq, upd)?;
        shard.weights = cs.weights;
        shard.state = cs.state;
        Ok(())
    }
}

fn failed(fault: Fault) -> Vec<String> {
    let rep = selftest(&Faulty(fault)).unwrap();
    assert!(rep.checks.len() > 60, "{} checks", rep.checks.len());
    rep.checks.into_iter().filter(|c| !c.ok).map(|c| c.name).collect()
}

#[test]
fn a_faithful_backend_passes() {
    assert_eq!(failed(Fault::None), Vec::<String>::new());
}

#[test]
fn a_gemm_off_by_one_part_in_a_thousand_fails_the_gemm_and_training_checks() {
    let f = failed(Fault::Gemm);
    assert_eq!(f.iter().filter(|n| n.starts_with("gemm")).count(), 4, "{f:?}");
    assert!(f.iter().any(|n| n.starts_with("training")), "{f:?}");
    assert!(f.iter().all(|n| n.starts_with("gemm") || n.starts_with("training")), "{f:?}");
}

#[test]
fn half_steps_fail_every_fused_adagrad_check_and_no_sgd_one() {
    let f = failed(Fault::HalfSteps);
    let fused: Vec<&String> = f.iter().filter(|n| n.starts_with("fused backward")).collect();
    assert!(!fused.is_empty() && fused.iter().all(|n| n.contains("adagrad")), "{f:?}");
    for kind in ["row-wise adagrad c=1", "row-wise adagrad c=4 eps-inside", "adagrad c=2"] {
        assert!(fused.iter().any(|n| n.starts_with(&format!("fused backward {kind} "))), "{kind}: {f:?}");
    }
}
