//! RDMA connection entries, as a rank decodes what every peer sent it in the all-to-all of
//! connection data: `RdmaPeerInfo::decode` of 72 bytes (a decoded entry re-encodes to the same
//! bytes), an entry made by `RdmaPeerInfo::encode` from arbitrary fields (it decodes back to
//! itself exactly when every field is within its limit: ranks below 128, 24-bit QPN and PSN,
//! MTU code 1..=5, 1..=256 slots of more than a header and at most 2^30 + 64 bytes, a slot
//! region that does not wrap the address space), and `decode_rdma_table` of n entries (each
//! from the rank it claims, for this rank).
#![no_main]
use ember_fuzz::Input;
use ember_transport::rdma::RemoteSlots;
use ember_transport::wire::rendezvous::*;

fn fields(i: &mut Input) -> Option<RdmaPeerInfo> {
    Some(RdmaPeerInfo {
        src: i.u16()? as usize,
        dst: i.u16()? as usize,
        qp: QpInfo { qpn: i.u32()?, psn: i.u32()?, lid: i.u16()?, gid: i.array::<16>()?, mtu: i.u8()? },
        slots: RemoteSlots { addr: i.u64()?, rkey: i.u32()?, slots: i.u32()? as usize, slot_size: i.u64()? as usize },
    })
}

fn within_limits(e: &RdmaPeerInfo) -> bool {
    let s = &e.slots;
    e.src < 128
        && e.dst < 128
        && e.qp.qpn < 1 << 24
        && e.qp.psn < 1 << 24
        && (1..=5).contains(&e.qp.mtu)
        && (1..=256).contains(&s.slots)
        && s.slot_size > 64
        && s.slot_size <= (1 << 30) + 64
        && (s.slots as u64).checked_mul(s.slot_size as u64).and_then(|l| s.addr.checked_add(l)).is_some()
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let e = |src, dst| RdmaPeerInfo {
            src,
            dst,
            qp: QpInfo { qpn: 0x00ab_cdef, psn: 0x0012_3456, lid: 17, gid: [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8], mtu: 5 },
            slots: RemoteSlots { addr: 0x7f00_1234_5000, rkey: 0xdead_beef, slots: 8, slot_size: 64 + (256 << 10) },
        };
        // The table rank 1 of 3 receives: entries from ranks 0 and 2, its own slot unused.
        let table = [e(0, 1).encode(), [0; RDMA_INFO_LEN], e(2, 1).encode()].concat();
        vec![("entry", [vec![1, 3], e(1, 2).encode().to_vec()].concat()), ("table", [vec![1, 3], table].concat())]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let (Some(me), Some(n)) = (i.u8(), i.u8()) else { return };
        let (me, n) = (me as usize % 8, n as usize % 8);
        let rest = i.0;
        // The input as one entry, and as a table of n entries.
        if let Some(b) = rest.get(..RDMA_INFO_LEN) {
            if let Ok(e) = RdmaPeerInfo::decode(b) {
                assert!(within_limits(&e), "{e:?}");
                assert_eq!(&e.encode()[..], b, "a decoded entry re-encodes to its bytes");
            }
        }
        if let Some(b) = rest.get(..n * RDMA_INFO_LEN) {
            if let Ok(t) = decode_rdma_table(b, me, n) {
                assert_eq!(t.len(), n);
                for (p, e) in t.iter().enumerate() {
                    match e {
                        None => assert_eq!(p, me),
                        Some(e) => assert!(p != me && e.src == p && e.dst == me && within_limits(e)),
                    }
                }
            }
        }
        // Fields, through the real encoder: accepted exactly within the limits.
        if let Some(e) = fields(&mut i) {
            match RdmaPeerInfo::decode(&e.encode()) {
                Ok(d) => assert!(within_limits(&e) && d == e, "{e:?} decoded as {d:?}"),
                Err(why) => assert!(!within_limits(&e), "{e:?} refused: {why}"),
            }
        }
    }
);
