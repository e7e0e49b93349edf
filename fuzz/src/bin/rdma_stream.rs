//! The RDMA receiver's real path: two ranks over the verbs emulation (fast mode: a write lands
//! when posted), rank 1 posting receives into guarded buffers, rank 0 writing whatever the
//! input says into rank 1's receive slots: raw bytes under a raw immediate, or chunks and
//! control messages whose headers `Header::write` sealed and whose immediates name the next
//! slot and sequence number, so that the fuzzer reaches the checks behind them (`on_recv`,
//! `on_ctl`: sequence, lengths, offsets, kinds, advertisement indices, credits, stash limit).
//! Rank 1 drives its progress when the input says, and waits for its receives at the end. A
//! second receive of a pending message is refused; a receive that completes reports at most
//! its buffer's capacity; no byte past a buffer's capacity is ever written; a malformed write
//! fails the peer with an error, never a panic. Ops, one byte each with their operands: post a
//! receive, a raw write, a sealed data chunk, a sealed control message (bit 2: rank 1
//! progresses afterwards). Receives of at least the zero-copy threshold are advertised but
//! never waited for (see below).
#![no_main]
use ember_fuzz::Input;
use ember_transport::fabric::{Fabric, Tag, Wait};
use ember_transport::rdma::emu::{self, EmuVerbs};
use ember_transport::rdma::verbs::{Sge, Verbs};
use ember_transport::rdma::{EmuConfig, RdmaConfig, RdmaFabric, RemoteSlots};
use ember_transport::wire::rdma::*;
use std::collections::HashMap;
use std::time::Duration;

const SLOTS: usize = 4;
const CHUNK: usize = 256;
const SLOT: usize = HDR + CHUNK;
/// Bytes of rank 0's registered source buffer: one region per write.
const MAX_WRITES: usize = 32;
const WRITE_MAX: usize = 1024;
const GUARD: usize = 64;
const CANARY: u8 = 0x5a;

fn tag(seq: u8) -> Tag {
    Tag { ctx: 9, seq: (seq % 8) as u64, round: 0 }
}

fn world() -> Vec<RdmaFabric<EmuVerbs>> {
    let cfg = RdmaConfig { slots: SLOTS, chunk: CHUNK };
    let fabs: Vec<_> = emu::world(2, EmuConfig::fast()).into_iter().map(|v| RdmaFabric::new(v, cfg, "rdma-emu").expect("fabric")).collect();
    for (r, f) in fabs.iter().enumerate() {
        let remote: Vec<Option<RemoteSlots>> = (0..2).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
        f.connect(&remote).expect("connect");
    }
    fabs
}

/// Rank 1 waits (not at all) for `t`, a receive below the zero-copy threshold: complete, it
/// reports at most its capacity; else it is withdrawn (as after a timeout).
fn done(f1: &RdmaFabric<EmuVerbs>, open: &mut HashMap<Tag, usize>, t: Tag) {
    let cap = open.remove(&t).expect("waits only for open receives");
    if let Ok(len) = f1.wait_recv(0, t, &Wait::new("fuzz", Duration::ZERO)) {
        assert!(len <= cap, "a receive of {len} bytes completed in a {cap}-byte buffer");
    }
}

/// Seed ops: post tag 1 for 300 bytes; two sealed chunks of it (256 + 44 bytes); progress.
fn seed_message() -> Vec<u8> {
    let mut b = vec![0u8, 1];
    b.extend_from_slice(&300u16.to_le_bytes());
    for (off, n) in [(0u16, 256u16), (256, 44)] {
        b.extend_from_slice(&[2 | 4, 1]);
        b.extend_from_slice(&300u16.to_le_bytes());
        b.extend_from_slice(&off.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend((0..n).map(|i| i as u8));
    }
    b
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let mut ctl = vec![0u8, 2];
        ctl.extend_from_slice(&2000u16.to_le_bytes());
        // An announcement (RTS) of tag 2's 2000 bytes, then a revoke with an unknown reason.
        ctl.extend_from_slice(&[3 | 4, K_RTS, NO_ADV, 2]);
        ctl.extend_from_slice(&2000u64.to_le_bytes());
        ctl.extend_from_slice(&0u64.to_le_bytes());
        ctl.extend_from_slice(&0u32.to_le_bytes());
        ctl.extend_from_slice(&[3 | 4, K_REVOKE, NO_ADV, 2]);
        ctl.extend_from_slice(&0u64.to_le_bytes());
        ctl.extend_from_slice(&0u64.to_le_bytes());
        ctl.extend_from_slice(&7u32.to_le_bytes());
        let mut raw = vec![1u8 | 4];
        raw.extend_from_slice(&Imm::Credit { src: 0, count: 2 }.encode().to_le_bytes());
        raw.extend_from_slice(&0u16.to_le_bytes());
        raw.extend_from_slice(&0u16.to_le_bytes());
        vec![("message-in-two-chunks", seed_message()), ("rts-and-revoke", ctl), ("credit", raw)]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let mut src = vec![0u8; MAX_WRITES * WRITE_MAX];
        let mut bufs: Vec<(Tag, usize, Vec<u8>)> = Vec::new();
        // Receives posted and not waited for: the capacity of each. Those of at least the
        // zero-copy threshold are advertised, and never waited for: withdrawing one waits for the
        // sender's acknowledgement, which this sender never gives (their buffers are guarded).
        let mut open: HashMap<Tag, usize> = HashMap::new();
        let fabs = world();
        let (f0, f1) = (&fabs[0], &fabs[1]);
        // SAFETY: `src` outlives the fabrics (dropped below, before it).
        let mr = unsafe { f0.verbs().register(src.as_mut_ptr(), src.len()) }.expect("register");
        let slots = f1.slots_for(0);
        let now = || Wait::new("fuzz", Duration::ZERO);
        let (mut seq, mut writes) = (0u32, 0usize);
        while let Some(op) = i.u8() {
            let mut write: Option<(u32, u64, Vec<u8>)> = None;
            match op & 3 {
                0 => {
                    let (Some(t), Some(cap)) = (i.u8(), i.u16()) else { break };
                    let cap = cap as usize % 2048;
                    let mut b = vec![CANARY; cap + GUARD];
                    // SAFETY: the buffer stays allocated, unmoved, until the fabrics are dropped.
                    if unsafe { f1.post_recv(0, tag(t), b.as_mut_ptr(), cap, &now()) }.is_ok() {
                        assert!(open.insert(tag(t), cap).is_none(), "a second receive of {:?} accepted", tag(t));
                    }
                    bufs.push((tag(t), cap, b));
                }
                1 => {
                    let (Some(imm), Some(at), Some(n)) = (i.u32(), i.u16(), i.u16()) else { break };
                    let n = (n as usize % WRITE_MAX).min(i.0.len());
                    write = Some((imm, slots.addr + at as u64, i.take(n).expect("n <= len").to_vec()));
                }
                2 => {
                    let (Some(t), Some(total), Some(off), Some(n)) = (i.u8(), i.u16(), i.u16(), i.u16()) else { break };
                    let n = n as usize % (WRITE_MAX - HDR);
                    let mut payload = i.take(n.min(i.0.len())).expect("fits").to_vec();
                    payload.resize(n, 0);
                    let h = Header { src: 0, kind: K_DATA, adv: NO_ADV, chunk_len: n as u32, tag: tag(t), total: total as u64, offset: off as u64, chunk_seq: seq, aux: 0 };
                    let mut b = [0u8; HDR];
                    h.write(&mut b);
                    let slot = seq as usize % SLOTS;
                    write = Some((Imm::Data { src: 0, slot, seq16: seq as u16 }.encode(), slots.addr + (slot * SLOT) as u64, [&b[..], &payload].concat()));
                    seq = seq.wrapping_add(1);
                }
                _ => {
                    let (Some(kind), Some(adv), Some(t), Some(total), Some(offset), Some(aux)) = (i.u8(), i.u8(), i.u8(), i.u64(), i.u64(), i.u32()) else { break };
                    let h = Header { src: 0, kind: kind % 6, adv, chunk_len: 0, tag: tag(t), total, offset, chunk_seq: seq, aux };
                    let mut b = [0u8; HDR];
                    h.write(&mut b);
                    let slot = seq as usize % SLOTS;
                    write = Some((Imm::Data { src: 0, slot, seq16: seq as u16 }.encode(), slots.addr + (slot * SLOT) as u64, b.to_vec()));
                    seq = seq.wrapping_add(1);
                }
            }
            if let Some((imm, raddr, bytes)) = write {
                if writes == MAX_WRITES {
                    break;
                }
                let at = writes * WRITE_MAX;
                src[at..at + bytes.len()].copy_from_slice(&bytes);
                let sges = [Sge { addr: mr.addr + at as u64, len: bytes.len() as u32, lkey: mr.lkey }];
                let sges = if bytes.is_empty() { &sges[..0] } else { &sges[..] };
                // SAFETY: `src` is registered and stays so; each write has its own region of it.
                let _ = unsafe { f0.verbs().post_write_imm(1, writes as u64, sges, raddr, slots.rkey, imm) };
                writes += 1;
            }
            if op & 4 != 0 {
                // Progress only: a wait for a message never posted fails at once.
                let _ = f1.wait_recv(0, Tag { ctx: 99, seq: 0, round: 0 }, &now());
            }
        }
        let zc = f1.zero_copy_min();
        for (t, _) in open.clone().into_iter().filter(|&(_, cap)| cap < zc) {
            done(f1, &mut open, t);
        }
        drop(fabs);
        for (t, cap, b) in &bufs {
            assert!(b[*cap..].iter().all(|&x| x == CANARY), "a byte past the {cap}-byte buffer of {t:?} was written");
        }
        drop(src);
    }
);
