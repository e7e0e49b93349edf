//! The replica sync's touched-rows messages, as each replica decodes its peers' before
//! indexing anything with them: `decode_touched` on arbitrary bytes split among up to four
//! replicas, over up to three shards whose row counts (1 to 2^20) come from the input, either
//! refuses with an error naming a replica or returns sorted, distinct rows inside each shard;
//! and rows marked from the input, encoded by `encode_touched` (lists or bitmaps, whichever is
//! smaller), decode to exactly their union.
#![no_main]
use ember_engine::parallel::route::Touched;
use ember_engine::parallel::sync::{decode_touched, encode_touched};
use ember_fuzz::Input;

const MAX_ROWS: usize = 1 << 20;

fn layout(i: &mut Input) -> Option<(Vec<usize>, Vec<usize>)> {
    let shards = 1 + i.u8()? as usize % 3;
    let rows: Vec<usize> = (0..shards).map(|_| i.u32().map(|r| 1 + r as usize % MAX_ROWS)).collect::<Option<_>>()?;
    let replicas = 1 + i.u8()? as usize % 4;
    let cuts: Vec<usize> = (0..replicas - 1).map(|_| i.u16().map(usize::from)).collect::<Option<_>>()?;
    Some((rows, cuts))
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let rows = [300usize, 100_000];
        let mut a: Vec<Touched> = rows.iter().map(|&r| Touched::new(r)).collect();
        a[0].mark(&(0..300).step_by(3).collect::<Vec<u64>>());
        a[1].mark(&[7, 66_000, 99_999]);
        let head = |cut: u16| [vec![1u8], 299u32.to_le_bytes().to_vec(), 99_999u32.to_le_bytes().to_vec(), vec![1], cut.to_le_bytes().to_vec()].concat();
        let msg = encode_touched(&rows, &a);
        vec![("bitmap-and-list", [head(msg.len() as u16), msg.clone(), msg].concat())]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let Some((rows, cuts)) = layout(&mut i) else { return };
        // Arbitrary bytes, cut into the replicas' messages.
        let body = i.0;
        let mut counts = Vec::new();
        let mut left = body.len();
        for c in &cuts {
            let c = (*c).min(left);
            counts.push(c);
            left -= c;
        }
        counts.push(left);
        match decode_touched(body, &counts, &rows) {
            Ok(u) => {
                assert_eq!(u.len(), rows.len());
                for (s, rs) in u.iter().enumerate() {
                    assert!(rs.windows(2).all(|w| w[0] < w[1]), "shard {s}: sorted and distinct");
                    assert!(rs.iter().all(|&r| (r as usize) < rows[s]), "shard {s}: inside the shard");
                }
            }
            Err(e) => assert!(e.to_string().contains("replica"), "{e}"),
        }
        // Rows marked from the same bytes (two per u32: row and stride), encoded and decoded.
        let mut marks: Vec<Touched> = rows.iter().map(|&r| Touched::new(r)).collect();
        let mut want: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
        let mut j = Input(body);
        while let (Some(s), Some(r)) = (j.u8(), j.u32()) {
            let s = s as usize % rows.len();
            let r = r as usize % rows[s];
            let run: Vec<u64> = (r..rows[s]).step_by(1 + r % 7).take(64).map(|x| x as u64).collect();
            marks[s].mark(&run);
            want[s].extend(&run);
        }
        for w in want.iter_mut() {
            w.sort_unstable();
            w.dedup();
        }
        let msg = encode_touched(&rows, &marks);
        assert_eq!(decode_touched(&msg, &[msg.len()], &rows).expect("an encoded message decodes"), want);
    }
);
