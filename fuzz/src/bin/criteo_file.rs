//! The Criteo reader on an arbitrary file: format detection, line counting and seek points,
//! the line-length cap, bad lines skipped, skip(), and the eval split streamed in chunks.
//! Every outcome is a batch that fits the model or an error.
#![no_main]
use ember_engine::config::preset;
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::{DataSource, EvalSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The input file (memory-backed where /dev/shm exists), created once and rewritten in place
/// for every input: its path and an open handle.
fn input_file() -> &'static (PathBuf, File) {
    static F: OnceLock<(PathBuf, File)> = OnceLock::new();
    F.get_or_init(|| {
        let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let path = dir.join(format!("ember-fuzz-criteo-{}.csv", std::process::id()));
        let f = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("create the input file");
        (path, f)
    })
}

libfuzzer_sys::fuzz_target!(
    init: {
        // The reader's 1 MiB buffers, allocated and freed three times per input: keep the freed
        // memory in the heap rather than handing it back to the kernel (and faulting it in again)
        // every time. Speed only; nothing the target checks depends on it.
        // SAFETY: mallopt only tunes glibc's allocator.
        unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        }
    },
    |data: &[u8]| {
        let Some((&shape, text)) = data.split_first() else { return };
        let mut model = preset("tiny", None).expect("tiny preset").model;
        model.num_dense = 1 + (shape & 1) as usize;
        model.tables.truncate(1 + ((shape >> 1) & 3) as usize);
        let (path, f) = input_file();
        f.set_len(0).and_then(|_| f.write_all_at(text, 0)).expect("write the input file");
        let policy = if shape & 0x80 != 0 { BadLinePolicy::Skip } else { BadLinePolicy::Fail };
        let Ok(mut r) = CriteoReader::open(path, &model, policy) else { return };
        assert!(r.data_lines() > 0);
        let n = 1 + ((shape >> 3) & 7) as usize;
        if shape & 0x40 != 0 {
            let _ = r.skip(n as u64);
        }
        while let Ok(Some(b)) = r.next_batch(n) {
            assert!(b.size() <= n);
            b.validate(&model).expect("a training batch fits the model");
        }
        if let Ok(ev) = r.eval_stream() {
            for k in 0..64 {
                match ev.chunk(k, n) {
                    Ok(b) if b.size() == 0 => break,
                    Ok(b) => b.validate(&model).expect("an eval chunk fits the model"),
                    Err(_) => break,
                }
            }
        }
    }
);
