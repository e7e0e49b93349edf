//! Rank 0's check of a joining rank's hello, as the rendezvous server runs it: the start of the
//! client's handshake (`hello_len`: Ember's magic, a hello of at most `MAX_HELLO` bytes), the
//! hello itself, then `check_hello` against the job's size (any size, 64-bit). An accepted hello
//! names a rank that indexes the server's table of `size` ranks and is not rank 0's own slot:
//! exactly 8 bytes, a claimed size equal to the job's, a rank in 1..size; anything else is
//! refused with a message naming the claim (or "malformed"). A joining rank's own hello
//! (`hello(rank, size)` for rank < size, as every launcher gives it) is accepted exactly when
//! rank ≥ 1 and the size fits the hello's 32 bits.
#![no_main]
use ember_fuzz::Input;
use ember_transport::wire::rendezvous::*;

fn header(hello: &[u8]) -> Vec<u8> {
    [b"EMBRAUT1".to_vec(), (hello.len() as u16).to_le_bytes().to_vec(), hello.to_vec()].concat()
}

fn seed(size: u64, rank: u64, hello: &[u8]) -> Vec<u8> {
    [size.to_le_bytes().to_vec(), rank.to_le_bytes().to_vec(), header(hello)].concat()
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        vec![
            ("rank-3-of-4", seed(4, 3, &hello(3, 4))),
            ("rank-0-of-4", seed(4, 0, &hello(0, 4))),
            ("rank-4-of-4", seed(4, 2, &hello(4, 4))),
            ("size-5-in-a-job-of-4", seed(4, 1, &hello(1, 5))),
            ("seven-bytes", seed(4, 1, &hello(1, 4)[..7])),
            ("size-past-32-bits", seed((1 << 32) + 4, 3, &hello(3, 4))),
        ]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let (Some(size), Some(rank)) = (i.u64(), i.u64()) else { return };
        let size = size as usize;
        // A joining rank's own hello, rank below size: accepted exactly when it is not rank 0's
        // and the size survives the hello's u32.
        if rank < size as u64 {
            let got = check_hello(&hello(rank as usize, size), size);
            match rank >= 1 && size <= u32::MAX as usize {
                true => assert_eq!(got, Ok(rank as usize)),
                false => assert!(got.is_err(), "rank {rank} of {size}: {got:?}"),
            }
        }
        // A peer's bytes: the handshake header, then the hello it announces.
        let Some(h) = i.array::<HELLO_HEADER>() else { return };
        let Ok(n) = hello_len(&h) else { return };
        let Some(sent) = i.take(n) else { return };
        let got = check_hello(sent, size);
        let claim = <[u8; 8]>::try_from(sent).ok().map(|b| {
            let w = |k: usize| u64::from(u32::from_le_bytes(b[k..k + 4].try_into().unwrap()));
            (w(0), w(4))
        });
        match (claim, got) {
            (Some((r, n)), Ok(got)) => {
                assert!(n == size as u64 && r >= 1 && r < n, "accepted rank {r} of {n} in a job of {size}");
                assert!(got as u64 == r && got >= 1 && got < size, "accepted rank {got} does not index the table of {size}");
            }
            (Some((r, n)), Err(why)) => {
                assert!(n != size as u64 || r == 0 || r >= n, "refused rank {r} of {n} in a job of {size}: {why}");
                assert!(why.contains(&format!("rank {r} of {n}")) && why.contains(&format!("{size} ranks")), "{why}");
            }
            (None, got) => assert_eq!(got, Err("malformed hello".to_string()), "a hello of {} bytes", sent.len()),
        }
    }
);
