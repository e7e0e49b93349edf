//! Placement of world ranks on the 2D grid (BRIEF.md §2), with M ≠ N so that swapping any two
//! formulas fails: the exact sharding-group and replica-group member lists, the communicators
//! every rank gets (their members and its rank in each), and each rank's samples of the global
//! batch, for both placements on 2x3 and 3x2. The expected lists are written out by hand.
use ember_engine::grid::{Grid, GridComms, Placement};

struct Want {
    m: usize,
    n: usize,
    placement: Placement,
    /// Sharding group g's world ranks, by rank in the group.
    sharding: &'static [&'static [usize]],
    /// Replica group r's world ranks, by replica index.
    replica: &'static [&'static [usize]],
    /// World rank w's samples of a global batch of 12: [start, end).
    samples: &'static [(usize, usize)],
}

const B: usize = 12;

const CASES: [Want; 4] = [
    // Replicas inside a node: sharding group i = {i, M+i, 2M+i, ...}; replica group j = {jM, ..., jM+M−1}.
    Want {
        m: 2,
        n: 3,
        placement: Placement::ReplicasInNode,
        sharding: &[&[0, 2, 4], &[1, 3, 5]],
        replica: &[&[0, 1], &[2, 3], &[4, 5]],
        // (g, r) of w = (w mod 2, w div 2); samples [g·6 + r·2, +2).
        samples: &[(0, 2), (6, 8), (2, 4), (8, 10), (4, 6), (10, 12)],
    },
    Want {
        m: 3,
        n: 2,
        placement: Placement::ReplicasInNode,
        sharding: &[&[0, 3], &[1, 4], &[2, 5]],
        replica: &[&[0, 1, 2], &[3, 4, 5]],
        // (g, r) = (w mod 3, w div 3); samples [g·4 + r·2, +2).
        samples: &[(0, 2), (4, 6), (8, 10), (2, 4), (6, 8), (10, 12)],
    },
    // Replicas across nodes: sharding group i = {iN, ..., iN+N−1}; replica groups strided.
    Want {
        m: 2,
        n: 3,
        placement: Placement::ReplicasAcrossNodes,
        sharding: &[&[0, 1, 2], &[3, 4, 5]],
        replica: &[&[0, 3], &[1, 4], &[2, 5]],
        // (g, r) = (w div 3, w mod 3): the stream in world-rank order.
        samples: &[(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)],
    },
    Want {
        m: 3,
        n: 2,
        placement: Placement::ReplicasAcrossNodes,
        sharding: &[&[0, 1], &[2, 3], &[4, 5]],
        replica: &[&[0, 2, 4], &[1, 3, 5]],
        samples: &[(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 12)],
    },
];

#[test]
fn group_members_and_sample_ranges_are_the_briefs() {
    for w in &CASES {
        let g = Grid::new(w.m, w.n, w.placement).unwrap();
        let what = format!("{}x{} {:?}", w.m, w.n, w.placement);
        for (i, want) in w.sharding.iter().enumerate() {
            assert_eq!(g.sharding_group(i), *want, "{what}: sharding group {i}");
        }
        for (j, want) in w.replica.iter().enumerate() {
            assert_eq!(g.replica_group(j), *want, "{what}: replica group {j}");
        }
        for (rank, &(a, b)) in w.samples.iter().enumerate() {
            assert_eq!(g.sample_range(rank, B), a..b, "{what}: samples of world rank {rank}");
        }
    }
}

#[test]
fn every_rank_gets_the_communicators_of_its_groups() {
    for w in &CASES {
        let grid = Grid::new(w.m, w.n, w.placement).unwrap();
        let what = format!("{}x{} {:?}", w.m, w.n, w.placement);
        let got: Vec<(usize, usize, usize, Vec<u64>, usize, Vec<u64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = ember_transport::local_world(w.m * w.n)
                .into_iter()
                .map(|c| {
                    s.spawn(move || {
                        let me = c.rank();
                        let gc = GridComms::new(grid, c).unwrap();
                        // The members of each communicator, in its rank order: every member's world rank.
                        let mut shard = vec![0u64; gc.shard.size()];
                        gc.shard.all_gather(&[me as u64], &mut shard).unwrap();
                        let mut replica = vec![0u64; gc.replica.size()];
                        gc.replica.all_gather(&[me as u64], &mut replica).unwrap();
                        (me, gc.coords().0, gc.shard.rank(), shard, gc.replica.rank(), replica)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (me, g, shard_rank, shard, replica_rank, replica) in got {
            let sg = w.sharding.iter().position(|grp| grp.contains(&me)).unwrap();
            let rg = w.replica.iter().position(|grp| grp.contains(&me)).unwrap();
            assert_eq!(g, sg, "{what}: world rank {me}'s sharding group");
            assert_eq!(shard, w.sharding[sg].iter().map(|&x| x as u64).collect::<Vec<_>>(), "{what}: world rank {me}'s sharding-group communicator");
            assert_eq!(replica, w.replica[rg].iter().map(|&x| x as u64).collect::<Vec<_>>(), "{what}: world rank {me}'s replica-group communicator");
            assert_eq!(shard_rank, rg, "{what}: world rank {me}'s rank in its sharding group (its shard index)");
            assert_eq!(replica_rank, sg, "{what}: world rank {me}'s rank in its replica group (its replica index)");
        }
    }
}
