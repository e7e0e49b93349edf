//! The rendezvous as a joining rank and rank 0 read it: the start of a client's handshake
//! (`hello_len`: Ember's magic, a hello of at most `MAX_HELLO` bytes), then a stream of
//! length-prefixed fields as `Conn::get` reads them (`field_len`: at most `MAX_FIELD` bytes,
//! checked before allocating) each decoded as a rank's table entry (`Entry::decode`: four
//! lines, a numeric pid). A decoded entry re-encodes to an entry that decodes to the same
//! fields. The hello's rank and size are rank 0's `check_hello` (the `rendezvous_hello`
//! target), the token proofs HMAC (auth.rs).
#![no_main]
use ember_fuzz::Input;
use ember_transport::wire::rendezvous::*;

fn field(b: &[u8]) -> Vec<u8> {
    [(b.len() as u32).to_le_bytes().to_vec(), b.to_vec()].concat()
}

libfuzzer_sys::fuzz_target!(
    init: ember_fuzz::seeds(|| {
        let e = |host: &str, pid, tcp: &str, shm: &str| Entry { host: host.into(), pid, tcp: tcp.into(), shm: shm.into() }.encode();
        let mut hello = b"EMBRAUT1".to_vec();
        hello.extend_from_slice(&8u16.to_le_bytes());
        let table = [field(&e("node01", 4242, "10.0.0.1:40123", "/dev/shm/ember-1-4242-0")), field(&e("node02", 99, "10.0.0.2:40124", ""))].concat();
        vec![("hello-and-table", [hello.clone(), table].concat()), ("hello-of-257-bytes", [b"EMBRAUT1".to_vec(), 257u16.to_le_bytes().to_vec()].concat())]
    }),
    |data: &[u8]| {
        let mut i = Input(data);
        let Some(h) = i.array::<HELLO_HEADER>() else { return };
        match hello_len(&h) {
            Ok(n) => assert!(n <= MAX_HELLO && &h[..8] == b"EMBRAUT1" && n == u16::from_le_bytes([h[8], h[9]]) as usize),
            Err(_) => assert!(&h[..8] != b"EMBRAUT1" || u16::from_le_bytes([h[8], h[9]]) as usize > MAX_HELLO),
        }
        while let Some(l) = i.array::<4>() {
            let n = match field_len(l) {
                Ok(n) => n,
                Err(_) => {
                    assert!(u32::from_le_bytes(l) as usize > MAX_FIELD);
                    return;
                }
            };
            assert!(n <= MAX_FIELD);
            let Some(b) = i.take(n) else { return };
            if let Ok(e) = Entry::decode(b) {
                let again = Entry::decode(&e.encode()).expect("a decoded entry re-encodes");
                assert_eq!((again.host, again.pid, again.tcp, again.shm), (e.host, e.pid, e.tcp, e.shm));
            }
        }
    }
);
