//! Shared-memory advertisement slots, both ways: the sender's reading of a slot the receiver
//! wrote (`usable`: a posted advertisement of this very message, big enough unless the sender
//! streams a short one), and the receiver's reading of a slot the sender finished (`settled`:
//! only its own generation written counts; `written`: the length word, at most the advertised
//! capacity, re-encoding to the same word). Each op takes the state, length and tag words of a
//! slot from the input, with the receiver's generation and capacity and the sender's message.
#![no_main]
use ember_fuzz::Input;
use ember_transport::fabric::Tag;
use ember_transport::wire::shm::*;

fn op(state: u64, len: u64, gen: u64, cap: u64, tag: Tag, msg_len: u32, short: bool) -> Vec<u8> {
    let mut b = vec![short as u8];
    for x in [state, len, gen, cap, tag.ctx, tag.seq, tag.round as u64] {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b.extend_from_slice(&msg_len.to_le_bytes());
    b
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let t = Tag { ctx: 4, seq: 5, round: 6 };
        vec![
            ("posted", op(3 << 2 | A_POSTED, 0, 3, 4096, t, 4096, false)),
            ("written-after-rts", op(3 << 2 | A_WRITTEN, 4000 | A_LEN_AFTER_RTS, 3, 4096, t, 4000, false)),
            ("write-failed", op(9 << 2 | A_WRITTEN, A_LEN_FAILED, 9, 64, t, 65, true)),
        ]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        while let Some(flags) = i.u8() {
            let (Some(state), Some(len), Some(gen), Some(cap), Some(ctx), Some(seq), Some(round), Some(msg_len)) =
                (i.u64(), i.u64(), i.u64(), i.u64(), i.u64(), i.u64(), i.u64(), i.u32())
            else {
                return;
            };
            let short = flags & 1 != 0;
            // The sender's message: the slot's tag, or (flag) one that differs.
            let mine = Tag { ctx, seq, round: round as u32 };
            let tag = if flags & 2 != 0 { Tag { seq: seq.wrapping_add(1), ..mine } } else { mine };
            let a = AdvRead { state, ctx, seq, round, cap };
            match usable(&a, tag, msg_len as usize, short) {
                None => assert!(state & 3 != A_POSTED || tag != mine || round > u32::MAX as u64),
                Some(fits) => {
                    assert!(state & 3 == A_POSTED && tag.ctx == ctx && tag.seq == seq && tag.round as u64 == round);
                    assert_eq!(fits, msg_len as u64 <= cap || short);
                }
            }
            let k = (flags >> 2) as usize % ADV_SLOTS;
            let gen = gen >> 2; // generations live in the state word's upper 62 bits
            match settled(state, gen, k) {
                None => assert!(state == gen << 2 | A_POSTED || state == gen << 2 | A_CLAIMED),
                Some(Ok(())) => assert_eq!(state, gen << 2 | A_WRITTEN),
                Some(Err(e)) => assert!(state >> 2 != gen || state & 3 == A_FREE, "{e}"),
            }
            let cap = cap as usize;
            match written(len, cap) {
                Written::Landed { len: l, after_rts } => {
                    assert!(l <= cap, "{l} bytes landed in a {cap}-byte buffer");
                    assert_eq!(l as u64 | if after_rts { A_LEN_AFTER_RTS } else { 0 }, len, "re-encodes");
                }
                Written::Failed => assert_eq!(len, A_LEN_FAILED),
                Written::Bad { after_rts, .. } => {
                    assert!(len & !A_LEN_AFTER_RTS > cap as u64);
                    assert_eq!(after_rts, len & A_LEN_AFTER_RTS != 0);
                }
            }
        }
    }
);
