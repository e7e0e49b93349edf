//! The RDMA transport's selection and bootstrap: what can be checked without RDMA
//! hardware, with and without the `rdma` feature (`cargo test -p ember-transport --test rdma_ib`
//! and `... --features rdma --test rdma_ib`). On a host with an active RDMA port and the feature,
//! the same tests also run real all-to-alls over it. The protocol itself is tested over the
//! emulation (rdma_a2a.rs).
use ember_transport::bootstrap::{
    decode_rdma_table, free_port, rdma_available, rdma_config_from_vars, threads_world, QpInfo, RdmaPeerInfo, RDMA_INFO_LEN,
};
use ember_transport::rdma::RemoteSlots;
use ember_transport::{Comm, Error, JoinConfig, Rendezvous, Transport};
use std::time::{Duration, Instant};

fn entry(src: usize, dst: usize) -> RdmaPeerInfo {
    RdmaPeerInfo {
        src,
        dst,
        qp: QpInfo { qpn: 0x00ab_cdef, psn: 0x0012_3456, lid: 17, gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], mtu: 5 },
        slots: RemoteSlots { addr: 0x7f00_1234_5000, rkey: 0xdead_beef, slots: 8, slot_size: 64 + (256 << 10) },
    }
}

#[test]
fn connection_entry_round_trips() {
    for (s, d) in [(0, 1), (1, 0), (5, 127), (127, 3)] {
        let e = entry(s, d);
        assert_eq!(RdmaPeerInfo::decode(&e.encode()).unwrap(), e);
    }
    let mut e = entry(2, 3);
    e.qp.lid = 0; // RoCE
    e.qp.gid = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 7];
    assert_eq!(RdmaPeerInfo::decode(&e.encode()).unwrap(), e);
}

#[test]
fn truncated_or_corrupted_connection_entries_are_errors() {
    let good = entry(1, 2).encode();
    for len in 0..RDMA_INFO_LEN {
        assert!(RdmaPeerInfo::decode(&good[..len]).is_err(), "truncated to {len}");
    }
    let mut long = good.to_vec();
    long.push(0);
    assert!(RdmaPeerInfo::decode(&long).is_err());
    // Every single-bit flip anywhere is caught (magic, version, checksum, reserved bytes).
    for i in 0..RDMA_INFO_LEN {
        for bit in 0..8 {
            let mut b = good;
            b[i] ^= 1 << bit;
            assert!(RdmaPeerInfo::decode(&b).is_err(), "flip of byte {i} bit {bit} accepted");
        }
    }
    // Well-formed (checksummed) entries with hostile values.
    let hostile = |f: &dyn Fn(&mut RdmaPeerInfo)| {
        let mut e = entry(1, 2);
        f(&mut e);
        RdmaPeerInfo::decode(&e.encode())
    };
    assert!(hostile(&|e| e.slots.slots = 0).is_err());
    assert!(hostile(&|e| e.slots.slots = 257).is_err());
    assert!(hostile(&|e| e.slots.slot_size = 64).is_err(), "slot without room for a payload");
    assert!(hostile(&|e| e.slots.slot_size = (1 << 30) + 65).is_err());
    assert!(hostile(&|e| e.slots.addr = u64::MAX - 100).is_err(), "region wrapping the address space");
    assert!(hostile(&|e| e.qp.qpn = 1 << 24).is_err());
    assert!(hostile(&|e| e.qp.psn = 1 << 24).is_err());
    assert!(hostile(&|e| e.qp.mtu = 0).is_err());
    assert!(hostile(&|e| e.qp.mtu = 6).is_err());
    assert!(hostile(&|e| e.src = 128).is_err());
}

#[test]
fn connection_table_checks_who_sent_what() {
    let n = 3;
    let me = 1;
    let mut b = vec![0u8; n * RDMA_INFO_LEN];
    for p in [0, 2] {
        b[p * RDMA_INFO_LEN..(p + 1) * RDMA_INFO_LEN].copy_from_slice(&entry(p, me).encode());
    }
    let t = decode_rdma_table(&b, me, n).unwrap();
    assert_eq!(t[0], Some(entry(0, me)));
    assert_eq!(t[1], None, "own slot ignored");
    assert_eq!(t[2], Some(entry(2, me)));
    // An entry meant for another rank, or sent by the wrong one: a protocol error naming the sender.
    let mut bad = b.clone();
    bad[2 * RDMA_INFO_LEN..].copy_from_slice(&entry(2, 0).encode());
    let e = decode_rdma_table(&bad, me, n).unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 2, .. }), "{e}");
    let mut bad = b.clone();
    bad[..RDMA_INFO_LEN].copy_from_slice(&entry(2, me).encode());
    assert!(matches!(decode_rdma_table(&bad, me, n).unwrap_err(), Error::Protocol { peer: 0, .. }));
    // Garbage from rank 0, a table of the wrong length.
    let mut bad = b.clone();
    bad[5] ^= 0x40;
    assert!(matches!(decode_rdma_table(&bad, me, n).unwrap_err(), Error::Protocol { peer: 0, .. }));
    assert!(decode_rdma_table(&b[..b.len() - 1], me, n).is_err());
    assert!(decode_rdma_table(&b, 3, n).is_err());
}

#[test]
fn protocol_geometry_from_the_environment() {
    let get = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string());
    let d = rdma_config_from_vars(get(&[])).unwrap();
    assert_eq!((d.slots, d.chunk), (8, 256 << 10));
    let c = rdma_config_from_vars(get(&[("EMBER_RDMA_SLOTS", "16"), ("EMBER_RDMA_CHUNK", "1048576")])).unwrap();
    assert_eq!((c.slots, c.chunk), (16, 1 << 20));
    let c = rdma_config_from_vars(get(&[("EMBER_RDMA_SLOTS", "256"), ("EMBER_RDMA_CHUNK", "1073741824")])).unwrap();
    assert_eq!((c.slots, c.chunk), (256, 1 << 30));
    let bad: [(&str, &str, &str); 8] = [
        ("EMBER_RDMA_SLOTS", "0", "slots from 1 to 256"),
        ("EMBER_RDMA_SLOTS", "300", "slots from 1 to 256"),
        ("EMBER_RDMA_SLOTS", "-1", "slots from 1 to 256"),
        ("EMBER_RDMA_SLOTS", "", "slots from 1 to 256"),
        ("EMBER_RDMA_CHUNK", "x", "bytes from 1 to 1073741824"),
        ("EMBER_RDMA_CHUNK", "0", "bytes from 1 to 1073741824"),
        ("EMBER_RDMA_CHUNK", "256k", "bytes from 1 to 1073741824"),
        ("EMBER_RDMA_CHUNK", "1073741825", "bytes from 1 to 1073741824"),
    ];
    for (var, v, range) in bad {
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([(var, v)]));
        let e = rdma_config_from_vars(get(pairs)).unwrap_err();
        assert!(e.contains(&format!("{var}={v:?}")) && e.contains(range), "{var}={v:?}: {e}");
    }
}

/// A 4-rank job whose rendezvous nobody serves: only a check made before the rendezvous returns quickly.
fn unreachable_job(transport: Transport) -> JoinConfig {
    JoinConfig {
        rank: 1,
        size: 4,
        local_rank: 1,
        rendezvous: Rendezvous::Addr(format!("127.0.0.1:{}", free_port().unwrap())),
        token: "t".into(),
        transport,
        timeout: Duration::from_secs(20),
    }
}

#[test]
#[cfg(not(feature = "rdma"))]
fn rdma_without_the_feature_is_a_clear_error() {
    let why = rdma_available().unwrap_err();
    assert!(why.contains("--features rdma"), "{why}");
    let t0 = Instant::now();
    let e = Comm::connect(&unreachable_job(Transport::Rdma)).err().unwrap();
    assert!(matches!(e, Error::NotBuilt(_)) && e.to_string().contains("not built"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    let e = threads_world(2, Transport::Rdma, Duration::from_secs(10)).err().unwrap();
    assert!(e.to_string().contains("not built"), "{e}");
}

#[test]
#[cfg(feature = "rdma")]
fn device_configuration_errors_are_clear() {
    use ember_transport::rdma::ib::{probe, IbConfig, IbVerbs, Queues};
    let get = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string());
    assert!(IbConfig::from_vars(get(&[("EMBER_IB_PORT", "x")]), 0).unwrap_err().contains("EMBER_IB_PORT"));
    assert!(IbConfig::from_vars(get(&[("EMBER_IB_PORT", "0")]), 0).is_err());
    assert!(IbConfig::from_vars(get(&[("EMBER_IB_GID_INDEX", "-1")]), 0).unwrap_err().contains("EMBER_IB_GID_INDEX"));
    let c = IbConfig::from_vars(get(&[("EMBER_IB_DEVICE", "mlx5_0, mlx5_1 ,mlx5_2"), ("EMBER_IB_PORT", "2"), ("EMBER_IB_GID_INDEX", "3")]), 4).unwrap();
    assert_eq!((c.wanted_device().as_deref(), c.port, c.gid_index), (Some("mlx5_1"), Some(2), Some(3)));
    // A device that does not exist: an error naming it (or saying there is no device at all), no panic.
    let c = IbConfig::from_vars(get(&[("EMBER_IB_DEVICE", "ember_no_such_dev0")]), 0).unwrap();
    let why = probe(&c).unwrap_err();
    assert!(why.contains("ember_no_such_dev0") || why.contains("no RDMA device"), "{why}");
    let why = IbVerbs::open(0, 2, &c, Queues::for_slots(8)).err().unwrap();
    assert!(why.contains("ember_no_such_dev0") || why.contains("no RDMA device"), "{why}");
}

#[test]
#[cfg(feature = "rdma")]
fn rdma_without_a_usable_port_is_a_clear_error_before_the_rendezvous() {
    let avail = rdma_available();
    eprintln!("rdma_available: {avail:?}");
    match avail {
        Err(why) => {
            assert!(why.contains("RDMA") || why.contains("EMBER_IB"), "{why}");
            let t0 = Instant::now();
            let e = Comm::connect(&unreachable_job(Transport::Rdma)).err().unwrap();
            assert!(matches!(e, Error::Bootstrap(_)) && e.to_string().contains("transport 'rdma'"), "{e}");
            assert!(t0.elapsed() < Duration::from_secs(5), "waited for the rendezvous: {:?}", t0.elapsed());
            let e = threads_world(2, Transport::Rdma, Duration::from_secs(10)).err().unwrap();
            assert!(e.to_string().contains("transport 'rdma'"), "{e}");
        }
        Ok(_) => {
            // A host with a port gets as far as the rendezvous, which this made-up job never
            // completes: an error within its deadline.
            let job = JoinConfig { timeout: Duration::from_millis(500), ..unreachable_job(Transport::Rdma) };
            let e = Comm::connect(&job).err().unwrap();
            assert!(matches!(e, Error::Bootstrap(_)) && e.to_string().contains("rendezvous"), "{e}");
        }
    }
}

#[test]
#[cfg(feature = "rdma")]
#[ignore = "needs an RDMA port"]
fn rdma_over_a_real_port() {
    if let Err(why) = rdma_available() {
        panic!("needs an RDMA port: {why}");
    }
    let comms = threads_world(3, Transport::Rdma, Duration::from_secs(20)).unwrap();
    let hs: Vec<_> = comms.into_iter().map(|c| std::thread::spawn(move || exchange(&c, 100_000))).collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), "rdma");
    }
}

/// An all-to-all of `k` floats per peer, checked; returns the transport's name.
fn exchange(c: &Comm, k: usize) -> &'static str {
    let (r, n) = (c.rank(), c.size());
    let send: Vec<f32> = (0..n * k).map(|i| (r * 1_000_000 + i) as f32).collect();
    let mut recv = vec![0f32; n * k];
    c.all_to_all(&send, &mut recv).unwrap();
    for p in 0..n {
        for j in [0, k / 2, k - 1] {
            assert_eq!(recv[p * k + j], (p * 1_000_000 + r * k + j) as f32, "from rank {p}, element {j}");
        }
    }
    c.transport()
}

#[test]
fn auto_picks_rdma_when_usable_else_shared_memory_on_one_host() {
    let want = if rdma_available().is_ok() { "rdma" } else { "shm" };
    let comms = threads_world(3, Transport::Auto, Duration::from_secs(20)).unwrap();
    let hs: Vec<_> = comms.into_iter().map(|c| std::thread::spawn(move || exchange(&c, 1000))).collect();
    for h in hs {
        assert_eq!(h.join().unwrap(), want);
    }
}

#[test]
#[cfg(feature = "rdma")]
fn port_descriptions_and_queue_geometry() {
    use ember_transport::rdma::ib::{PortInfo, Queues};
    let ib = PortInfo { device: "mlx5_0".into(), port: 1, roce: false, lid: 12, mtu: 5, gid_index: 0, gid: [0; 16], rate: "400 Gb/sec (4X NDR)".into() };
    assert_eq!(ib.to_string(), "mlx5_0 port 1 (InfiniBand, LID 12, MTU 4096, 400 Gb/sec (4X NDR))");
    let mut gid = [0u8; 16];
    gid[10..].copy_from_slice(&[0xff, 0xff, 10, 1, 2, 3]);
    let roce = PortInfo { device: "mlx5_2".into(), port: 1, roce: true, lid: 0, mtu: 3, gid_index: 3, gid, rate: String::new() };
    assert_eq!(roce.to_string(), "mlx5_2 port 1 (RoCE, GID index 3 ::ffff:10.1.2.3, MTU 1024)");
    // Receive queue: room for `slots` data writes + `slots` credit returns + an abort, with margin.
    for slots in [1, 8, 256] {
        let q = Queues::for_slots(slots);
        assert!(q.rq_depth as usize > 2 * slots && q.sq_depth >= 1, "{slots}: {q:?}");
    }
}
