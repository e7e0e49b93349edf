//! The 2D step's buffer transports (engine/src/parallel/xfer.rs) against each other on the CPU
//! backend: through the host transport zero-copy, staged through host copies (the path device
//! buffers take), and peer to peer (ranks copy out of each other's buffers, the path in-process
//! ranks sharing a GPU take). Same grid, plan and data: the runs must agree bitwise, for every
//! sharding type, mean pooling, row-wise AdaGrad with sync every 2 steps, and fully-sharded 2D.
//! The GPUDirect RDMA path (the RDMA protocol moving the buffers themselves, over the adversarial
//! verbs emulation) must agree bitwise with the host path too.
use ember_engine::backend::Cpu;
use ember_engine::config::{preset, EmbOptimizer, Pooling, TrainConfig};
use ember_engine::grid::{Grid, Placement};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::parallel::driver::{Job, RankState};
use ember_engine::parallel::{ParallelOptions, SyncMode, Xfer, XferKind};
use ember_engine::plan::ShardingType;
use ember_tests::two_d::{assert_bitwise_same, cycling_plan};

fn config(batch: usize) -> TrainConfig {
    let mut cfg = preset("tiny", Some(2000)).unwrap();
    cfg.batch_size = batch;
    cfg.optim.embedding = EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false };
    cfg.synthetic.eval_samples = 128;
    // Mean pooling on every other table exercises the per-sample scaling on both sides.
    for (t, tc) in cfg.model.tables.iter_mut().enumerate() {
        if t % 2 == 1 {
            tc.pooling = Pooling::Mean;
        }
    }
    cfg
}

fn run(m: usize, n: usize, xfer: XferKind, fully_sharded: bool) -> (Vec<f64>, Vec<RankState>) {
    run_with(m, n, ParallelOptions { sync_every: 2, xfer, fully_sharded, ..ParallelOptions::default() })
}

fn run_with(m: usize, n: usize, opts: ParallelOptions) -> (Vec<f64>, Vec<RankState>) {
    let cfg = config(8 * m * n);
    let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
    let plan = cycling_plan(&cfg, n, &ShardingType::ALL);
    let (report, states, _) = Job::new(&cfg, grid, &plan, &opts, 5).train(&|_| Ok(Cpu::new())).unwrap();
    (report.losses, states)
}

fn assert_same(what: &str, a: &(Vec<f64>, Vec<RankState>), b: &(Vec<f64>, Vec<RankState>)) {
    assert_bitwise_same(what, (&a.0, &b.0), &a.1, &b.1);
}

#[test]
fn host_staged_and_peer_transports_agree_bitwise() {
    for (m, n) in [(1, 4), (2, 2), (4, 1), (2, 3)] {
        let host = run(m, n, XferKind::Host, false);
        assert!(host.0.iter().all(|l| l.is_finite()));
        assert_same(&format!("{m}x{n} staged vs host"), &run(m, n, XferKind::Staged, false), &host);
        assert_same(&format!("{m}x{n} peers vs host"), &run(m, n, XferKind::Peers, false), &host);
    }
}

#[test]
fn peer_replica_sync_agrees_in_full_mode_and_with_delayed_state() {
    // Peer sync (packed rows through the in-process fabric on the buffers, summed in f64 by the
    // backend's reduce hook) in full mode, and with delayed state sync.
    for (sync, delayed) in [(SyncMode::Full, false), (SyncMode::Sparse, true)] {
        let opts = |xfer| ParallelOptions { sync_every: 2, sync, delayed_state_sync: delayed, xfer, ..ParallelOptions::default() };
        let host = run_with(4, 1, opts(XferKind::Host));
        assert_same(&format!("{sync:?} delayed={delayed}: peers vs host"), &run_with(4, 1, opts(XferKind::Peers)), &host);
    }
}

#[test]
fn staged_replica_sync_trains_bitwise_like_the_zero_copy_host_path() {
    // Device-resident-like buffers: every sync gathers the rows into a packed buffer, stages
    // that copy through host memory and puts the rows back; weights and state, and with delayed
    // state sync the packed state snapshot and its application at the next sync.
    for (m, n) in [(2, 2), (4, 1)] {
        for delayed in [false, true] {
            let opts = |xfer| ParallelOptions { sync_every: 2, delayed_state_sync: delayed, xfer, ..ParallelOptions::default() };
            let host = run_with(m, n, opts(XferKind::Host));
            assert_same(&format!("{m}x{n} delayed={delayed}: staged vs host"), &run_with(m, n, opts(XferKind::Staged)), &host);
        }
    }
}

#[test]
fn fully_sharded_2d_agrees_across_transports() {
    let host = run(2, 2, XferKind::Host, true);
    assert_same("fully-sharded peers vs host", &run(2, 2, XferKind::Peers, true), &host);
    assert_same("fully-sharded staged vs host", &run(2, 2, XferKind::Staged, true), &host);
}

#[test]
fn auto_resolution_and_refusals() {
    let cpu = Cpu::new();
    let local = ember_transport::local_world(1).pop().unwrap();
    // Host buffers need no peer copies: Auto goes through the host transport, zero-copy.
    assert_eq!(Xfer::resolve(XferKind::Auto, &cpu, &local).unwrap(), Xfer::Host { stage: false });
    assert_eq!(Xfer::resolve(XferKind::Peers, &cpu, &local).unwrap(), Xfer::Peers);
    // Peer copies need one address space: refused over a process transport.
    let tcp = ember_transport::bootstrap::threads_world(2, ember_transport::Transport::Tcp, std::time::Duration::from_secs(5)).unwrap().pop().unwrap();
    assert_eq!(tcp.transport(), "tcp");
    let e = Xfer::resolve(XferKind::Peers, &cpu, &tcp).unwrap_err().to_string();
    assert!(e.contains("in-process"), "{e}");
    assert_eq!(Xfer::resolve(XferKind::Auto, &cpu, &tcp).unwrap(), Xfer::Host { stage: false });
    assert!("bogus".parse::<XferKind>().is_err());
    // The CPU backend has no native (NCCL) collectives: asking for them is a clear error.
    let e = Xfer::resolve("nccl".parse().unwrap(), &cpu, &tcp).unwrap_err().to_string();
    assert!(e.contains("--features nccl"), "{e}");
}

/// The run of `run_with`, over an emulated RDMA world (adversarial verbs) instead of in-process
/// channels.
fn run_rdma(m: usize, n: usize, opts: ParallelOptions, seed: u64) -> (Vec<f64>, Vec<RankState>) {
    use ember_transport::rdma::{emu_world, EmuConfig, RdmaConfig};
    let cfg = config(8 * m * n);
    let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
    let plan = cycling_plan(&cfg, n, &ShardingType::ALL);
    let data = SyntheticData::new(&cfg).unwrap();
    let feed = |step: usize, w: usize| {
        let range = grid.sample_range(w, cfg.batch_size);
        Ok(data.samples((step * cfg.batch_size + range.start) as u64, range.len()))
    };
    let comms = emu_world(m * n, EmuConfig::adversarial(seed), RdmaConfig { slots: 4, chunk: 4096 }, std::time::Duration::from_secs(60)).unwrap();
    let (report, states, _) = Job::new(&cfg, grid, &plan, &opts, 5).data(&feed, &data.eval_batch()).comms(comms).train(&|_| Ok(Cpu::new())).unwrap();
    (report.losses, states)
}

#[test]
fn gpudirect_rdma_path_agrees_bitwise_with_the_host_path() {
    for (m, n) in [(1, 4), (2, 2), (2, 3)] {
        let opts = |xfer| ParallelOptions { sync_every: 2, xfer, ..ParallelOptions::default() };
        let host = run_with(m, n, opts(XferKind::Host));
        let direct = run_rdma(m, n, opts(XferKind::Direct), (m * 10 + n) as u64);
        assert_same(&format!("{m}x{n} direct over emulated RDMA"), &host, &direct);
        // And the host path over the same emulated RDMA world.
        let host_rdma = run_rdma(m, n, opts(XferKind::Host), 1);
        assert_same(&format!("{m}x{n} host over emulated RDMA"), &host, &host_rdma);
    }
}

#[test]
fn gpudirect_is_refused_where_the_transport_copies_with_the_cpu() {
    let cpu = Cpu::new();
    let local = ember_transport::local_world(1).pop().unwrap();
    let e = Xfer::resolve(XferKind::Direct, &cpu, &local).unwrap_err().to_string();
    assert!(e.contains("GPUDirect") && e.contains("rank 0") && e.contains("local"), "{e}");
    assert_eq!("direct".parse::<XferKind>().unwrap(), XferKind::Direct);
}
