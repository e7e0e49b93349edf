//! TCP frame headers and the mesh hello, as the receiving rank's progress thread and mesh
//! acceptor take them: every header through `decode_frame` (a decoded header re-encodes to the
//! same bytes; only a bad magic is refused) and the real admission (`FrameSink`: claim of the
//! posted buffer or reservation against the limit on unposted bytes, 1 MiB here). An admitted
//! payload fits the buffer posted for it, or the limit; a refusal is a protocol error naming
//! the sending peer. Ops, one byte each and their operands: post a receive, a raw header, a
//! header made by `encode_frame`, a mesh hello.
#![no_main]
use ember_fuzz::Input;
use ember_transport::fabric::Tag;
use ember_transport::wire::tcp::{check_mesh_hello, decode_frame, encode_frame, FrameSink, FRAME_LEN};
use ember_transport::Error;
use std::collections::HashMap;

const LIMIT: usize = 1 << 20;

fn small_tag(i: &mut Input) -> Option<Tag> {
    let b = i.array::<3>()?;
    Some(Tag { ctx: (b[0] % 4) as u64, seq: (b[1] % 4) as u64, round: (b[2] % 4) as u32 })
}

fn seed(ops: &[(u8, Vec<u8>)]) -> Vec<u8> {
    ops.iter().flat_map(|(op, b)| std::iter::once(*op).chain(b.iter().copied())).collect()
}

libfuzzer_sys::fuzz_target!(
    init: {
        ember_fuzz::seeds(|| {
            let t = Tag { ctx: 1, seq: 2, round: 3 };
            let post = |cap: u16| [vec![1, 2, 3], cap.to_le_bytes().to_vec()].concat();
            vec![
                ("posted-then-frame", seed(&[(0, post(100)), (1, encode_frame(t, 100).to_vec())])),
                ("early-then-posted", seed(&[(1, encode_frame(t, 64).to_vec()), (0, post(64))])),
                ("too-long", seed(&[(0, post(8)), (0x81, encode_frame(t, 9).to_vec())])),
                ("mesh-hello", seed(&[(3, [vec![12], [5u32, 1, 6].iter().flat_map(|x| x.to_le_bytes()).collect(), vec![1, 6]].concat())])),
            ]
        });
        // Read once, by the first admission: the limit on unposted bytes.
        std::env::set_var("EMBER_MAX_ALLOC_BYTES", LIMIT.to_string());
    },
    |data: &[u8]| {
        let mut i = Input(data);
        let mut sink = FrameSink::default();
        let mut caps: HashMap<(usize, Tag), usize> = HashMap::new();
        while let Some(op) = i.u8() {
            let peer = (op >> 7) as usize;
            let header = match op & 3 {
                0 => {
                    let (Some(tag), Some(cap)) = (small_tag(&mut i), i.u16()) else { break };
                    if sink.post(peer, tag, cap as usize).is_ok() {
                        caps.insert((peer, tag), cap as usize);
                    }
                    assert!(sink.early_bytes() <= LIMIT);
                    continue;
                }
                1 => {
                    let Some(h) = i.array::<FRAME_LEN>() else { break };
                    match decode_frame(&h) {
                        Ok((tag, len)) => assert_eq!(encode_frame(tag, len), h, "a decoded header re-encodes to its bytes"),
                        Err(e) => assert!(e.contains("magic"), "{e}"),
                    }
                    h
                }
                2 => {
                    let (Some(tag), Some(len)) = (small_tag(&mut i), i.u32()) else { break };
                    let h = encode_frame(tag, len as usize);
                    assert_eq!(decode_frame(&h), Ok((tag, len as usize)));
                    h
                }
                _ => {
                    let Some(n) = i.u8() else { break };
                    let (Some(h), Some(rank), Some(size)) = (i.take((n % 16) as usize), i.u8(), i.u8()) else { break };
                    if let Ok(from) = check_mesh_hello(h, rank as usize, size as usize) {
                        assert!(h.len() == 12 && from > rank as usize && from < size as usize);
                    }
                    continue;
                }
            };
            let decoded = decode_frame(&header);
            match sink.frame(peer, &header) {
                Ok((tag, len, posted)) => {
                    assert_eq!(decoded, Ok((tag, len)));
                    if posted {
                        let cap = caps.remove(&(peer, tag)).expect("landed in a posted buffer");
                        assert!(len <= cap, "{len} bytes admitted into a {cap}-byte buffer");
                    }
                }
                Err(e) => assert!(matches!(e, Error::Protocol { peer: p, .. } if p == peer), "{e}"),
            }
            assert!(sink.early_bytes() <= LIMIT, "{} unposted bytes held", sink.early_bytes());
        }
    }
);
