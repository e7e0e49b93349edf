//! Collective times on a machine's links: an all-to-all or all-reduce over a group of ranks, some
//! of them on the caller's node, read from the link's measured curve when it holds that many
//! peers and derived from its bandwidth and latency otherwise. Each answer also says how many
//! bytes the rank puts on each link class.
//!
//! Derived forms (α = latency, β = 1/bandwidth, p peers, X bytes per rank):
//! - all-to-all, pairwise exchange: `(p−1)·α + X·(p−1)/p·β`; across nodes, the on-node part
//!   and the off-node part (`X·(p−q)/p` for q peers on the node) run at once on their links.
//! - all-reduce in one node, ring: `2(p−1)·α + 2·X·(p−1)/p·β`; across nodes, hierarchical: a
//!   reduce-scatter and an all-gather in the node (ring) around an all-reduce of X/q between
//!   the nodes, every rank on its own NIC (ring bandwidth, tree latency `2·log2(nodes)·α`).
//! - the replica sync's all-reduce: its own measured curve (`sync_all_reduce`: the engine's
//!   f64-accumulating mean, every rank busy) where the link has one, else the all-reduce above.
use super::machine::{CurvePoint, Link, Machine};

/// A collective's time and the bytes one rank puts on each link class.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub seconds: f64,
    pub intra_bytes: f64,
    pub inter_bytes: f64,
}

/// Time of `bytes` on the measured curve at exactly `peers` (None: no such points): between
/// points log-log linear, below the smallest its time, above the largest at its bandwidth.
pub fn from_curve(curve: &[CurvePoint], peers: usize, bytes: f64) -> Option<f64> {
    let mut pts: Vec<&CurvePoint> = curve.iter().filter(|p| p.peers == peers && p.bytes > 0).collect();
    if pts.is_empty() {
        return None;
    }
    pts.sort_by_key(|p| p.bytes);
    let first = pts[0];
    let last = pts[pts.len() - 1];
    if bytes <= first.bytes as f64 {
        return Some(first.seconds);
    }
    if bytes >= last.bytes as f64 {
        return Some(last.seconds * bytes / last.bytes as f64);
    }
    let i = pts.iter().position(|p| p.bytes as f64 >= bytes).expect("inside the range");
    let (a, b) = (pts[i - 1], pts[i]);
    let (xa, xb) = ((a.bytes as f64).ln(), (b.bytes as f64).ln());
    let t = (bytes.ln() - xa) / (xb - xa);
    Some((a.seconds.ln() + t * (b.seconds.ln() - a.seconds.ln())).exp())
}

fn a2a_flat(l: &Link, peers: usize, bytes: f64) -> f64 {
    if peers <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let p = peers as f64;
    from_curve(&l.all_to_all, peers, bytes).unwrap_or((p - 1.0) * l.latency_s + bytes * (p - 1.0) / p / l.bw)
}

fn ar_ring(l: &Link, peers: usize, bytes: f64) -> f64 {
    if peers <= 1 || bytes <= 0.0 {
        return 0.0;
    }
    let p = peers as f64;
    from_curve(&l.all_reduce, peers, bytes).unwrap_or(2.0 * (p - 1.0) * l.latency_s + 2.0 * bytes * (p - 1.0) / p / l.bw)
}

/// An all-to-all in which each of `peers` ranks sends `bytes` in total (own block included,
/// blocks of equal size), `on_node` of the peers (the caller included) on its node.
pub fn all_to_all(m: &Machine, peers: usize, on_node: usize, bytes: f64) -> Cost {
    if peers <= 1 || bytes <= 0.0 {
        return Cost::default();
    }
    let q = on_node.clamp(1, peers);
    let p = peers as f64;
    if q == peers {
        return Cost { seconds: a2a_flat(&m.intra_node, peers, bytes), intra_bytes: bytes * (p - 1.0) / p, inter_bytes: 0.0 };
    }
    let on = bytes * (q as f64 - 1.0) / p;
    let off = bytes * (p - q as f64) / p;
    let t_on = if q > 1 { a2a_flat(&m.intra_node, q, bytes * q as f64 / p) } else { 0.0 };
    let t_off = from_curve(&m.inter_node.all_to_all, peers, bytes).unwrap_or((p - q as f64) * m.inter_node.latency_s + off / m.inter_node.bw);
    Cost { seconds: t_on.max(t_off), intra_bytes: on, inter_bytes: off }
}

/// An all-reduce of a `bytes` buffer over `peers` ranks, `on_node` of them on each node.
pub fn all_reduce(m: &Machine, peers: usize, on_node: usize, bytes: f64) -> Cost {
    if peers <= 1 || bytes <= 0.0 {
        return Cost::default();
    }
    let q = on_node.clamp(1, peers);
    let p = peers as f64;
    if q == peers {
        return Cost { seconds: ar_ring(&m.intra_node, peers, bytes), intra_bytes: 2.0 * bytes * (p - 1.0) / p, inter_bytes: 0.0 };
    }
    if let Some(t) = from_curve(&m.inter_node.all_reduce, peers, bytes) {
        let qf = q as f64;
        return Cost { seconds: t, intra_bytes: 2.0 * bytes * (qf - 1.0) / qf, inter_bytes: 2.0 * bytes / qf * (1.0 - qf / p) };
    }
    let qf = q as f64;
    let nodes = (p / qf).ceil();
    let il = &m.intra_node;
    let (rs, ag) = if q > 1 {
        let half = il.latency_s * (qf - 1.0) + bytes * (qf - 1.0) / qf / il.bw;
        (half, half)
    } else {
        (0.0, 0.0)
    };
    let part = bytes / qf;
    let el = &m.inter_node;
    let inter = 2.0 * nodes.log2().max(1.0) * el.latency_s + 2.0 * part * (nodes - 1.0) / nodes / el.bw;
    Cost { seconds: rs + inter + ag, intra_bytes: 2.0 * bytes * (qf - 1.0) / qf, inter_bytes: 2.0 * part * (nodes - 1.0) / nodes }
}

/// The replica sync's all-reduce of a `bytes` buffer over `peers` ranks, `on_node` of them on
/// each node: read from the link's `sync_all_reduce` curve where it holds `peers` (in one node:
/// `intra_node`'s; across nodes: `inter_node`'s), else [`all_reduce`].
pub fn sync_all_reduce(m: &Machine, peers: usize, on_node: usize, bytes: f64) -> Cost {
    let general = all_reduce(m, peers, on_node, bytes);
    if peers <= 1 || bytes <= 0.0 {
        return general;
    }
    let link = if on_node.clamp(1, peers) == peers { &m.intra_node } else { &m.inter_node };
    match from_curve(&link.sync_all_reduce, peers, bytes) {
        Some(seconds) => Cost { seconds, ..general },
        None => general,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::machine::{ComputeRates, EmbBackwardEff, MemoryRates};

    fn machine(curve: Vec<CurvePoint>) -> Machine {
        let link = |bw: f64, lat: f64, c: Vec<CurvePoint>| Link { bw, latency_s: lat, all_to_all: c, all_reduce: vec![], sync_all_reduce: vec![] };
        Machine {
            name: "t".into(),
            description: String::new(),
            ranks_per_node: 4,
            compute_units_per_node: 4,
            in_place_sync: false,
            memory_per_rank: 1 << 30,
            memory: MemoryRates { stream_bw: 1e10, gather_bw: 1e10 },
            compute: ComputeRates { gemm_flops: 1e10, emb_forward_eff: 1.0, emb_backward_eff: EmbBackwardEff { sgd: 1.0, rowwise_adagrad: 1.0, adagrad: 1.0 }, step_overhead_s: 0.0, interaction_flops: None },
            intra_node: link(1e9, 1e-6, curve),
            inter_node: link(1e8, 1e-5, vec![]),
            sources: vec![],
        }
    }

    #[test]
    fn curve_is_read_between_and_beyond_its_points() {
        let c = vec![CurvePoint { peers: 4, bytes: 1000, seconds: 1e-4 }, CurvePoint { peers: 4, bytes: 100_000, seconds: 1e-2 }];
        assert_eq!(from_curve(&c, 2, 5000.0), None);
        assert_eq!(from_curve(&c, 4, 10.0), Some(1e-4));
        assert!((from_curve(&c, 4, 10_000.0).unwrap() - 1e-3).abs() < 1e-12);
        assert!((from_curve(&c, 4, 200_000.0).unwrap() - 2e-2).abs() < 1e-12);
    }

    #[test]
    fn derived_times_follow_alpha_beta() {
        let m = machine(vec![]);
        // 4 peers on one node: 3 latencies + 3/4 of the bytes at 1 GB/s.
        let c = all_to_all(&m, 4, 4, 4e6);
        assert!((c.seconds - (3e-6 + 3e-3)).abs() < 1e-12, "{c:?}");
        assert_eq!(c.inter_bytes, 0.0);
        // 8 peers, 4 per node: half the bytes leave the node at 0.1 GB/s.
        let c = all_to_all(&m, 8, 4, 8e6);
        assert!((c.seconds - (4e-5 + 4e6 / 1e8)).abs() < 1e-12, "{c:?}");
        assert_eq!(c.inter_bytes, 4e6);
        // Ring all-reduce in a node: 2(p-1) latencies, 2(p-1)/p of the buffer.
        let c = all_reduce(&m, 4, 4, 4e6);
        assert!((c.seconds - (6e-6 + 6e-3)).abs() < 1e-12, "{c:?}");
        // One rank: nothing moves.
        assert_eq!(all_reduce(&m, 1, 1, 4e6), Cost::default());
    }

    #[test]
    fn the_sync_reads_its_own_curve_where_it_has_one() {
        let mut m = machine(vec![]);
        // No sync curve: the general all-reduce.
        assert_eq!(sync_all_reduce(&m, 4, 4, 4e6), all_reduce(&m, 4, 4, 4e6));
        m.intra_node.sync_all_reduce = vec![CurvePoint { peers: 4, bytes: 1 << 20, seconds: 2e-3 }];
        let c = sync_all_reduce(&m, 4, 4, 4.0 * (1 << 20) as f64);
        assert!((c.seconds - 8e-3).abs() < 1e-12, "{c:?}");
        assert_eq!(c.intra_bytes, all_reduce(&m, 4, 4, 4.0 * (1 << 20) as f64).intra_bytes);
        // Other peer counts, and groups across nodes, fall back.
        assert_eq!(sync_all_reduce(&m, 2, 2, 4e6), all_reduce(&m, 2, 2, 4e6));
        assert_eq!(sync_all_reduce(&m, 8, 4, 4e6), all_reduce(&m, 8, 4, 4e6));
    }

    #[test]
    fn hierarchical_all_reduce_is_slower_than_in_node() {
        let m = machine(vec![]);
        let one = all_reduce(&m, 4, 4, 4e6).seconds;
        let many = all_reduce(&m, 64, 4, 4e6);
        assert!(many.seconds > one && many.inter_bytes > 0.0, "{one} {many:?}");
    }
}
