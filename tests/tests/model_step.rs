//! The whole single-process Dlrm training step against an f64 oracle: the reference network
//! (`oracle::RefNet`) fed by f64 tables with sum/mean pooling, the gradient of the batch-mean
//! loss w.r.t. every table entry and every dense parameter by f64 central differences, then the
//! optimizers of BRIEF.md §3 applied in f64. After 1 and after 3 steps every weight and every
//! optimizer state matches; untouched embedding rows stay bitwise unchanged.
use ember_engine::backend::Cpu;
use ember_engine::config::*;
use ember_engine::data::Batch;
use ember_engine::model::Dlrm;
use ember_tests::oracle::*;

struct RefModel {
    net: RefNet,
    tables: Vec<Vec<f64>>,
    rows: Vec<usize>,
    mean: Vec<bool>,
    d: usize,
}

impl RefModel {
    fn loss(&self, net: &RefNet, tables: &[Vec<f64>], b: &Batch) -> f64 {
        let n = b.size();
        let width = net.width();
        let mut wide = vec![0.0; n * width];
        for (t, j) in b.sparse.iter().enumerate() {
            let offs = j.offsets();
            for i in 0..n {
                let ids = &j.values[offs[i] as usize..offs[i + 1] as usize];
                let s = if self.mean[t] && !ids.is_empty() { 1.0 / ids.len() as f64 } else { 1.0 };
                for c in 0..self.d {
                    wide[i * width + (t + 1) * self.d + c] = s * ids.iter().map(|&id| tables[t][id as usize * self.d + c]).sum::<f64>();
                }
            }
        }
        let logits = net.forward(&to_f64(&b.dense), &wide, n);
        RefNet::loss(&logits, &b.labels, 1.0 / n as f64)
    }

    /// Gradients (dense params, tables) of the batch-mean loss by central differences.
    fn grads(&self, b: &Batch) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let h = 1e-6;
        let mut net = self.net.clone();
        let mut gp = Vec::new();
        for p in 0..net.params.len() {
            let mut g = vec![0.0; net.params[p].len()];
            for e in 0..g.len() {
                let x = net.params[p][e];
                net.params[p][e] = x + h;
                let up = self.loss(&net, &self.tables, b);
                net.params[p][e] = x - h;
                let dn = self.loss(&net, &self.tables, b);
                net.params[p][e] = x;
                g[e] = (up - dn) / (2.0 * h);
            }
            gp.push(g);
        }
        let mut tables = self.tables.clone();
        let mut gt = Vec::new();
        for t in 0..tables.len() {
            let mut g = vec![0.0; tables[t].len()];
            for e in 0..g.len() {
                let x = tables[t][e];
                tables[t][e] = x + h;
                let up = self.loss(&self.net, &tables, b);
                tables[t][e] = x - h;
                let dn = self.loss(&self.net, &tables, b);
                tables[t][e] = x;
                g[e] = (up - dn) / (2.0 * h);
            }
            gt.push(g);
        }
        (gp, gt)
    }
}

fn check(embedding: EmbOptimizer, dense: DenseOptimizer, interaction: Interaction, seed: u64) {
    let be = Cpu::new();
    let d = 4;
    let tc = |rows: u64, pooling: Pooling| TableConfig { rows, dim: d, pooling, bag_size: 2 };
    let cfg = TrainConfig {
        model: ModelConfig {
            num_dense: 3,
            tables: vec![tc(6, Pooling::Sum), tc(4, Pooling::Mean), tc(9, Pooling::Sum)],
            bottom_mlp: vec![4],
            top_mlp: vec![5, 1],
            interaction,
        },
        optim: OptimConfig { embedding, dense, weight_decay: WeightDecay::None },
        batch_size: 5,
        steps: Some(3),
        seed,
        eval_every: 0,
        synthetic: SyntheticConfig::default(),
    };
    let tag = format!("{embedding:?} / {dense:?} / {interaction:?}");
    let mut m = Dlrm::new(&be, &cfg).unwrap();
    let mut r = RefModel {
        net: RefNet {
            num_dense: 3,
            bottom: cfg.model.bottom_mlp.clone(),
            top: cfg.model.top_mlp.clone(),
            f: 3,
            d,
            dcn: match interaction {
                Interaction::Dot => None,
                Interaction::Dcn { layers, rank } => Some((layers, rank)),
            },
            params: m.dense.params_mut().iter().map(|p| to_f64(&p.w)).collect(),
        },
        tables: m.tables.iter().map(|t| to_f64(&t.weights)).collect(),
        rows: cfg.model.tables.iter().map(|t| t.rows as usize).collect(),
        mean: cfg.model.tables.iter().map(|t| t.pooling == Pooling::Mean).collect(),
        d,
    };
    // Reference optimizer state.
    let mut dense_s: Vec<Vec<f64>> = r.net.params.iter().map(|p| vec![0.0; p.len()]).collect();
    let mut emb_v: Vec<Vec<f64>> = r
        .rows
        .iter()
        .map(|&n| match embedding {
            EmbOptimizer::Sgd { .. } => vec![],
            EmbOptimizer::RowWiseAdagrad { .. } => vec![0.0; n],
            EmbOptimizer::Adagrad { .. } => vec![0.0; n * d],
        })
        .collect();
    let batches = random_batches(&cfg.model, 5, 3, seed + 100);
    for (step, b) in batches.iter().enumerate() {
        let what = format!("{tag}: step {}", step + 1);
        let before: Vec<Vec<f32>> = m.tables.iter().map(|t| t.weights.clone()).collect();
        let want_loss = r.loss(&r.net, &r.tables, b);
        let (gp, gt) = r.grads(b);
        let loss = m.train_step(&be, b).unwrap();
        assert!((loss - want_loss).abs() <= 1e-5 * want_loss, "{what}: loss {loss} vs reference {want_loss}");
        // Dense update.
        for (p, g) in gp.iter().enumerate() {
            for e in 0..g.len() {
                match dense {
                    DenseOptimizer::Sgd { lr } => r.net.params[p][e] -= lr as f64 * g[e],
                    DenseOptimizer::Adagrad { lr, eps } => {
                        dense_s[p][e] += g[e] * g[e];
                        r.net.params[p][e] -= lr as f64 * g[e] / (dense_s[p][e].sqrt() + eps as f64);
                    }
                }
            }
        }
        // Embedding update: only rows that occur in the batch.
        for t in 0..r.tables.len() {
            let mut touched = vec![false; r.rows[t]];
            for &id in &b.sparse[t].values {
                touched[id as usize] = true;
            }
            for row in (0..r.rows[t]).filter(|&x| touched[x]) {
                let g = &gt[t][row * d..(row + 1) * d];
                let w = &mut r.tables[t][row * d..(row + 1) * d];
                match embedding {
                    EmbOptimizer::Sgd { lr } => w.iter_mut().zip(g).for_each(|(w, g)| *w -= lr as f64 * g),
                    EmbOptimizer::RowWiseAdagrad { lr, eps, .. } => {
                        emb_v[t][row] += g.iter().map(|x| x * x).sum::<f64>() / d as f64;
                        let k = lr as f64 / (emb_v[t][row].sqrt() + eps as f64);
                        w.iter_mut().zip(g).for_each(|(w, g)| *w -= k * g);
                    }
                    EmbOptimizer::Adagrad { lr, eps, .. } => {
                        for c in 0..d {
                            emb_v[t][row * d + c] += g[c] * g[c];
                            w[c] -= lr as f64 * g[c] / (emb_v[t][row * d + c].sqrt() + eps as f64);
                        }
                    }
                }
            }
            let shard = &m.tables[t];
            assert_close(&shard.weights, &r.tables[t], 1e-5, 2e-6, &format!("{what}: table {t} weights"));
            assert_close(&shard.state, &emb_v[t], 1e-4, 1e-9, &format!("{what}: table {t} optimizer state"));
            for row in (0..r.rows[t]).filter(|&x| !touched[x]) {
                assert_bitwise(&shard.weights[row * d..(row + 1) * d], &before[t][row * d..(row + 1) * d], &format!("{what}: table {t} untouched row {row}"));
            }
        }
        for (p, (param, want)) in m.dense.params_mut().iter().zip(&r.net.params).enumerate() {
            assert_close(&param.w, want, 1e-5, 2e-6, &format!("{what}: dense param {p}"));
        }
    }
}

#[test]
fn dlrm_step_sgd_dot() {
    check(EmbOptimizer::Sgd { lr: 0.5 }, DenseOptimizer::Sgd { lr: 0.3 }, Interaction::Dot, 1);
}

#[test]
fn dlrm_step_rowwise_adagrad_dot() {
    check(
        EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false },
        DenseOptimizer::Adagrad { lr: 0.05, eps: 1e-8 },
        Interaction::Dot,
        2,
    );
}

#[test]
fn dlrm_step_elementwise_adagrad_dcn() {
    check(
        EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-3, c: None, eps_inside: false },
        DenseOptimizer::Sgd { lr: 0.2 },
        Interaction::Dcn { layers: 2, rank: 3 },
        3,
    );
}
