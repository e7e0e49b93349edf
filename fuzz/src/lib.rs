//! Shared by the fuzz targets: reading structured values off the fuzzer's bytes, and writing a
//! target's seed corpus with the real encoders.

/// The fuzzer's input, read front to back; every read is `None` once the bytes run out.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).map(|b| b.try_into().expect("N bytes"))
    }
}

/// A seed-corpus writer: when `EMBER_FUZZ_SEEDS` names a directory, the target's seeds
/// (`make`: file name and bytes, made with the real encoders) are written there and the process
/// exits. Called from a target's `init`; tools/fuzz.sh's header says how to regenerate a corpus.
pub fn seeds(make: impl FnOnce() -> Vec<(&'static str, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("EMBER_FUZZ_SEEDS") else { return };
    let dir = std::path::PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    for (name, bytes) in make() {
        std::fs::write(dir.join(name), bytes).expect("write a seed");
    }
    std::process::exit(0);
}
