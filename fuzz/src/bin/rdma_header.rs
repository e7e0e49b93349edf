//! RDMA chunk headers and immediates, as the receiver decodes them before trusting a write:
//! `Header::read` on 64 bytes (only a bad magic or checksum is refused; a decoded header
//! re-encodes with `Header::write` to the same bytes), a header made by `Header::write` from
//! arbitrary fields reads back as itself, and `Imm::decode` of any 32-bit immediate gives
//! fields within their limits that re-encode to the same word.
#![no_main]
use ember_fuzz::Input;
use ember_transport::fabric::Tag;
use ember_transport::wire::rdma::*;

fn header(i: &mut Input) -> Option<Header> {
    Some(Header {
        src: i.u16()?,
        kind: i.u8()?,
        adv: i.u8()?,
        chunk_len: i.u32()?,
        tag: Tag { ctx: i.u64()?, seq: i.u64()?, round: i.u32()? },
        total: i.u64()?,
        offset: i.u64()?,
        chunk_seq: i.u32()?,
        aux: i.u32()?,
    })
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let h = Header { src: 1, kind: K_DATA, adv: NO_ADV, chunk_len: 256, tag: Tag { ctx: 9, seq: 3, round: 0 }, total: 1000, offset: 512, chunk_seq: 17, aux: 0 };
        let c = Header { kind: K_ADVERT, adv: 5, chunk_len: 0, total: 1 << 20, offset: 0x7f00_0000_0000, aux: 0xbeef, ..h };
        let seed = |h: &Header, imm: Imm| {
            let mut b = [0u8; HDR];
            h.write(&mut b);
            [b.to_vec(), imm.encode().to_le_bytes().to_vec()].concat()
        };
        vec![
            ("data-chunk", seed(&h, Imm::Data { src: 1, slot: 1, seq16: 17 })),
            ("advert", seed(&c, Imm::Zc { src: 1, adv: 5, seq16: 18 })),
            ("credit", seed(&h, Imm::Credit { src: 1, count: 4 })),
        ]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let Some(b) = i.array::<HDR>() else { return };
        match Header::read(&b) {
            Ok(h) => {
                let mut w = [0u8; HDR];
                h.write(&mut w);
                assert_eq!(w[..60], b[..60], "a decoded header re-encodes to its bytes");
            }
            Err(e) => assert!(e.contains("magic") || e.contains("checksum"), "{e}"),
        }
        assert!(Header::read(&b[..HDR - 1 - (b[0] as usize % (HDR - 1))]).is_err(), "a short header");
        if let Some(v) = i.u32() {
            let imm = Imm::decode(v);
            match imm {
                Imm::Data { src, slot, .. } => assert!(src < MAX_RANKS && slot < MAX_SLOTS),
                Imm::Credit { src, count } => assert!(src < MAX_RANKS && count <= MAX_CREDIT),
                Imm::Zc { src, adv, .. } => assert!(src < MAX_RANKS && adv < MAX_ADVERTS),
            }
            assert_eq!(imm.encode(), v, "{imm:?} re-encodes to its word");
        }
        // Arbitrary fields through the encoder and back.
        if let Some(h) = header(&mut i) {
            let mut w = [0u8; HDR];
            h.write(&mut w);
            assert_eq!(Header::read(&w), Ok(h));
        }
    }
);
