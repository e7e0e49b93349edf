//! A shared-memory ring as the consumer drains it: a head and tail from the input (checked by
//! `check_ring`), then every record from the tail on checked by `check_record` exactly as
//! `drain_ring` does (position, kind, payload inside the ring and the published bytes, pads to
//! the ring's end), and what the records name checked as their handlers do: the offer slot of
//! an RTS (`offer_slot`) and each CHUNK against the receiver's record of its stream
//! (`check_chunk`). A record that passes takes whole 64-byte records inside the ring; a chunk
//! that passes lies inside its message.
#![no_main]
use bytemuck::Zeroable;
use ember_fuzz::Input;
use ember_transport::wire::shm::*;

fn rec_bytes(r: &Rec, payload: usize) -> Vec<u8> {
    let mut b = bytemuck::bytes_of(r).to_vec();
    if payload <= INLINE_MAX && r.kind == EAGER {
        b[INLINE_AT..INLINE_AT + payload].fill(0xab);
    }
    b.resize(rec_len(r.kind, payload), 0xab);
    b
}

/// Seed: tail and head, the largest eager payload, then the ring's bytes from the tail.
fn seed(tail: u64, recs: &[u8], eager: u32) -> Vec<u8> {
    let head = tail + recs.len() as u64;
    [tail.to_le_bytes().to_vec(), head.to_le_bytes().to_vec(), eager.to_le_bytes().to_vec(), recs.to_vec()].concat()
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let eager = |n: usize| rec_bytes(&Rec { kind: EAGER, len: n as u64, ctx: 1, seq: 2, round: 3, ..Rec::zeroed() }, n);
        let chunk = |off: u64, n: usize, total: u64| rec_bytes(&Rec { kind: CHUNK, len: n as u64, addr: off, total, id: slot_id(2, 7), ..Rec::zeroed() }, n);
        let rts = rec_bytes(&Rec { kind: RTS, len: 1 << 20, addr: 0x7f00_0000_1000, id: slot_id(3, 1), ..Rec::zeroed() }, 0);
        let fin = rec_bytes(&Rec { kind: FIN, ..Rec::zeroed() }, 0);
        let pad = rec_bytes(&Rec { kind: PAD, len: 128, ..Rec::zeroed() }, 0);
        vec![
            ("eager-rts-fin", seed(0, &[eager(100), rts, fin].concat(), 8192)),
            ("inline-eager", seed(64, &[eager(8), eager(32), eager(33)].concat(), 8192)),
            ("chunks", seed(4096, &[chunk(0, 300, 500), chunk(300, 200, 500)].concat(), 8192)),
            ("pad-at-the-end", seed(RING_CAP as u64 * 3 - 128, &[pad, eager(8)].concat(), 8192)),
        ]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let (Some(mut tail), Some(head), Some(eager)) = (i.u64(), i.u64(), i.u32()) else { return };
        let eager_max = eager as usize % (RING_CAP / 4 + 1);
        let ring = i.0;
        let start = tail;
        let Ok(n) = check_ring(head, tail) else {
            assert!(head < tail || head - tail > RING_CAP as u64);
            return;
        };
        assert!(n <= RING_CAP && head - tail == n as u64);
        // The receiver's record of one stream (its advertisement): bytes landed, announced length.
        let (mut got, mut announced) = (0usize, 0u64);
        while tail < head {
            let idx = (tail % RING_CAP as u64) as usize;
            let avail = (head - tail) as usize;
            if check_position(idx, avail).is_err() {
                assert!(idx % HDR != 0 || avail < HDR);
                return;
            }
            // The ring's bytes at this record: the input from the start tail on (zeros past it).
            let at = (tail - start) as usize;
            let mut b = [0u8; HDR];
            if at < ring.len() {
                let k = (ring.len() - at).min(HDR);
                b[..k].copy_from_slice(&ring[at..at + k]);
            }
            let rec: Rec = bytemuck::pod_read_unaligned(&b);
            let c = match check_record(&rec, idx, avail, eager_max) {
                Ok(c) => c,
                Err(_) => return,
            };
            assert_eq!(c.kind, rec.kind);
            assert!(c.used >= HDR && c.used % HDR == 0, "{c:?}");
            assert!(idx + c.used <= RING_CAP && c.used <= avail, "{c:?} at {idx} of {avail}");
            assert!(c.at + c.payload <= c.used && (c.at == HDR || (c.at == INLINE_AT && rec.kind == EAGER && c.used == HDR)), "{c:?}");
            match rec.kind {
                PAD => assert_eq!(idx + c.used, RING_CAP),
                EAGER => assert!(c.payload <= eager_max && c.payload as u64 == rec.len),
                CHUNK => {
                    assert!(c.payload <= CHUNK_BYTES && c.payload as u64 == rec.len);
                    if check_chunk(rec.addr, c.payload, rec.total, got, announced).is_ok() {
                        assert!(rec.addr == got as u64 && c.payload > 0 && rec.addr + c.payload as u64 <= rec.total);
                        announced = rec.total;
                        got += c.payload;
                        if got as u64 == rec.total {
                            (got, announced) = (0, 0);
                        }
                    }
                }
                RTS => {
                    if let Ok((k, gen)) = offer_slot(rec.id) {
                        assert!(k < OFFER_SLOTS && slot_id(k, gen) == rec.id);
                    }
                    assert_eq!(c.used, HDR);
                }
                FIN | ABORT => assert_eq!(c.used, HDR),
                k => panic!("record kind {k} passed"),
            }
            tail += c.used as u64;
        }
        assert_eq!(tail, head, "records end at the head");
    }
);
