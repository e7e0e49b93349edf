// The C ABI called from Rust: null pointers, wrong sizes, bad handles and panics come back as
// status codes with a message, never as crashes.
use crate::*;
use engine::backend::Cpu;
use engine::config::TrainConfig;
use engine::data::Batch;
use engine::grid::{Grid, Placement};
use engine::parallel::driver::Job;
use engine::parallel::ParallelOptions;
use engine::plan::planner::{plan, PlanOptions};
use std::ffi::{CStr, CString};
use std::ptr;

// A two-table model, small enough for every test here (also used by tests/timeout_variable.rs).
const TOML: &str = include_str!("tiny_model.toml");

fn last_error() -> String {
    // SAFETY: `ember_last_error` never returns NULL, and its NUL-terminated string stays valid
    // until this thread's next ember call; it is copied at once.
    unsafe { CStr::from_ptr(ember_last_error()) }.to_str().unwrap().to_string()
}

fn engine() -> *mut EmberEngine {
    let toml = CString::new(TOML).unwrap();
    let mut e = ptr::null_mut();
    // SAFETY: `toml` is a live CString and `e` a local handle slot.
    assert_eq!(unsafe { ember_engine_create_from_toml(toml.as_ptr(), &mut e) }, EmberStatus::Ok, "{}", last_error());
    assert!(!e.is_null());
    e
}

/// A batch of n samples: 1 id per bag in both tables.
struct B {
    n: usize,
    dense: Vec<f32>,
    labels: Vec<f32>,
    lengths: Vec<u32>,
    ids: Vec<u64>,
}

fn batch(n: usize) -> B {
    let ids: Vec<u64> = (0..n as u64).map(|i| i % 10).chain((0..n as u64).map(|i| (i * 7) % 20)).collect();
    B {
        n,
        dense: (0..n * 2).map(|i| (i % 5) as f32 * 0.1).collect(),
        labels: (0..n).map(|i| (i % 2) as f32).collect(),
        lengths: vec![1; 2 * n],
        ids,
    }
}

/// # Safety
/// `loss` is NULL or writable (the batch buffers are `b`'s own).
unsafe fn train(e: *mut EmberEngine, b: &B, loss: *mut f64) -> EmberStatus {
    // SAFETY: the four buffers are `b`'s vectors, of the sizes the layout gives `b.n` samples
    // (lengths 2n, ids their sum); `loss` is NULL or writable (this function's contract).
    unsafe { ember_train_step(e, b.n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), loss) }
}

#[test]
fn version_and_status_names() {
    // SAFETY: `ember_version` returns a static NUL-terminated string.
    let v = unsafe { CStr::from_ptr(ember_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(ember_abi_version(), EMBER_ABI_VERSION);
    // SAFETY: `ember_status_name` returns a static NUL-terminated string for every value,
    // unknown ones included (also for the next two).
    assert_eq!(unsafe { CStr::from_ptr(ember_status_name(7)) }.to_str().unwrap(), "EMBER_STATUS_ERR_INVALID_HANDLE");
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(ember_status_name(10)) }.to_str().unwrap(), "EMBER_STATUS_ERR_PEER");
    // SAFETY: as above.
    assert_eq!(unsafe { CStr::from_ptr(ember_status_name(-1)) }.to_str().unwrap(), "EMBER_STATUS_UNKNOWN");
}

#[test]
fn train_eval_and_info() {
    let e = engine();
    let b = batch(8);
    let mut loss = f64::NAN;
    // SAFETY: `e` is a live handle; every pointer is a live local: out-parameters, `b`'s buffers of
    // 8 samples, `logits` and `again` of the 8 floats passed as logits_len; NULL labels and metrics
    // where `ember_eval` allows them.
    unsafe {
        for _ in 0..3 {
            assert_eq!(train(e, &b, &mut loss), EmberStatus::Ok, "{}", last_error());
            assert!(loss.is_finite() && loss > 0.0);
        }
        assert_eq!(last_error(), "");
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
        assert_eq!((info.num_dense, info.num_tables, info.batch_size, info.steps_done, info.samples_seen), (2, 2, 8, 3, 24));
        assert_eq!((info.local_batch_size, info.sample_start, info.rank, info.world_size, info.grid_m, info.grid_n), (8, 0, 0, 1, 1, 1));
        let mut rows = 0;
        assert_eq!(ember_engine_table_rows(e, 1, &mut rows), EmberStatus::Ok);
        assert_eq!(rows, 20);
        assert_eq!(ember_engine_table_rows(e, 2, &mut rows), EmberStatus::ErrInvalidArgument);
        let mut logits = vec![0f32; 8];
        let mut m = EmberMetrics::default();
        let st = ember_eval(e, 8, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), logits.as_mut_ptr(), 8, &mut m);
        assert_eq!(st, EmberStatus::Ok, "{}", last_error());
        assert_eq!(m.samples, 8);
        assert!(m.loss.is_finite() && logits.iter().all(|x| x.is_finite()));
        // Eval does not train: the same logits again, labels optional without metrics.
        let mut again = vec![0f32; 8];
        let st = ember_eval(e, 8, b.dense.as_ptr(), ptr::null(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), again.as_mut_ptr(), 8, ptr::null_mut());
        assert_eq!(st, EmberStatus::Ok, "{}", last_error());
        assert_eq!(logits, again);
        assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
    }
}

#[test]
fn null_pointers_are_errors() {
    let e = engine();
    let b = batch(4);
    let toml = CString::new(TOML).unwrap();
    // SAFETY: every pointer is either NULL on purpose (refused before use) or a live local: `toml`,
    // `out`, `b`'s buffers of `n` samples, out-parameters.
    unsafe {
        let mut out = ptr::null_mut();
        assert_eq!(ember_engine_create_from_toml(ptr::null(), &mut out), EmberStatus::ErrNullPointer);
        assert!(last_error().contains("toml is NULL"), "{}", last_error());
        assert_eq!(ember_engine_create_from_toml(toml.as_ptr(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_engine_create_from_preset(ptr::null(), 0, &mut out), EmberStatus::ErrNullPointer);
        assert_eq!(ember_engine_create_from_file(ptr::null(), &mut out), EmberStatus::ErrNullPointer);
        assert!(out.is_null());
        assert_eq!(train(ptr::null_mut(), &b, ptr::null_mut()), EmberStatus::ErrNullPointer);
        let n = b.n;
        assert_eq!(ember_train_step(e, n, ptr::null(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_train_step(e, n, b.dense.as_ptr(), ptr::null(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_train_step(e, n, b.dense.as_ptr(), b.labels.as_ptr(), ptr::null(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_train_step(e, n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), ptr::null(), b.ids.len(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert!(last_error().contains("ids is NULL"), "{}", last_error());
        assert_eq!(ember_engine_info(e, ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_engine_info(ptr::null(), &mut EmberInfo::default()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_save_checkpoint(e, ptr::null(), 1), EmberStatus::ErrNullPointer);
        assert_eq!(ember_load_checkpoint(e, ptr::null(), ptr::null_mut()), EmberStatus::ErrNullPointer);
        let mut m = EmberMetrics::default();
        let st = ember_eval(e, n, b.dense.as_ptr(), ptr::null(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut(), 0, &mut m);
        assert_eq!(st, EmberStatus::ErrNullPointer);
        // Nothing was trained by the failed calls; the engine still works.
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
        assert_eq!(info.steps_done, 0);
        assert_eq!(train(e, &b, ptr::null_mut()), EmberStatus::Ok, "{}", last_error());
        assert_eq!(ember_engine_destroy(ptr::null_mut()), EmberStatus::Ok);
        assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
    }
}

#[test]
fn wrong_sizes_and_contents_are_errors() {
    let e = engine();
    let b = batch(4);
    // One id more than the lengths sum to, so that `num_ids = ids.len() + 1` is readable.
    let mut ids = b.ids.clone();
    ids.push(0);
    // SAFETY: every buffer holds what its call claims or more (`ids` has the extra id that
    // `num_ids = ids.len() + 1` claims; `small` the 3 floats passed as logits_len); the absurd batch
    // sizes are refused before anything is read.
    unsafe {
        let call = |n: usize, num_ids: usize| {
            ember_train_step(e, n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), ids.as_ptr(), num_ids, ptr::null_mut())
        };
        assert_eq!(call(0, 0), EmberStatus::ErrInvalidArgument);
        assert_eq!(call(4, b.ids.len() + 1), EmberStatus::ErrInvalidArgument);
        assert!(last_error().contains("num_ids"), "{}", last_error());
        assert_eq!(call(usize::MAX, 0), EmberStatus::ErrInvalidArgument); // overflow of n * num_dense
        let mut bad = batch(4);
        bad.ids[0] = 10; // table 0 has 10 rows
        assert_eq!(train(e, &bad, ptr::null_mut()), EmberStatus::ErrInput);
        assert!(last_error().contains("out of range"), "{}", last_error());
        let mut bad = batch(4);
        bad.labels[1] = 2.0;
        assert_eq!(train(e, &bad, ptr::null_mut()), EmberStatus::ErrInput);
        let mut bad = batch(4);
        bad.dense[0] = f32::NAN;
        assert_eq!(train(e, &bad, ptr::null_mut()), EmberStatus::ErrInput);
        let mut small = [0f32; 3];
        let st = ember_eval(e, 4, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), small.as_mut_ptr(), 3, ptr::null_mut());
        assert_eq!(st, EmberStatus::ErrInvalidArgument);
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
        assert_eq!(info.steps_done, 0);
        assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
    }
}

#[test]
fn bad_configs_are_errors() {
    // SAFETY: every string is a live CString or the NUL-terminated `bad_utf8`; `out` and `rows` are
    // local out-parameters.
    unsafe {
        let mut out = ptr::null_mut();
        for text in ["not = = toml", "batch_size = 8\n", &TOML.replace("dim = 4\n[optim]", "dim = 8\n[optim]")] {
            let c = CString::new(text).unwrap();
            assert_eq!(ember_engine_create_from_toml(c.as_ptr(), &mut out), EmberStatus::ErrConfig, "{text}");
            assert!(last_error().starts_with("config:"), "{}", last_error());
        }
        let bad_utf8 = [0xffu8, 0xfe, 0];
        assert_eq!(ember_engine_create_from_toml(bad_utf8.as_ptr() as *const _, &mut out), EmberStatus::ErrInvalidArgument);
        let name = CString::new("no-such-preset").unwrap();
        assert_eq!(ember_engine_create_from_preset(name.as_ptr(), 0, &mut out), EmberStatus::ErrConfig);
        let path = CString::new("/nonexistent/ember.toml").unwrap();
        assert_eq!(ember_engine_create_from_file(path.as_ptr(), &mut out), EmberStatus::ErrIo);
        assert!(out.is_null());
        let name = CString::new("tiny").unwrap();
        assert_eq!(ember_engine_create_from_preset(name.as_ptr(), 1000, &mut out), EmberStatus::Ok, "{}", last_error());
        let mut rows = 0;
        assert_eq!(ember_engine_table_rows(out, 4, &mut rows), EmberStatus::Ok);
        assert_eq!(rows, 1000);
        assert_eq!(ember_engine_destroy(out), EmberStatus::Ok);
    }
}

#[test]
fn handles_after_destroy_are_rejected() {
    let e = engine();
    let b = batch(2);
    // SAFETY: handles are tokens, looked up and never dereferenced: the destroyed `e` and `fake` (the
    // address of a local) are only refused; the other pointers are NULL or locals.
    unsafe {
        assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
        assert_eq!(train(e, &b, ptr::null_mut()), EmberStatus::ErrInvalidHandle);
        assert!(last_error().contains("not live"), "{}", last_error());
        assert_eq!(ember_engine_destroy(e), EmberStatus::ErrInvalidHandle);
        let mut not_a_handle = 0u64;
        let fake = &mut not_a_handle as *mut u64 as *mut EmberEngine;
        assert_eq!(ember_engine_info(fake, &mut EmberInfo::default()), EmberStatus::ErrInvalidHandle);
    }
}

#[test]
fn a_destroyed_handle_never_drives_a_later_engine() {
    // Destroy A, create B (which may take A's slot, or get A's old address from the allocator):
    // A stays invalid and B is untouched by calls made with A.
    for _ in 0..50 {
        let a = engine();
        // SAFETY: a handle value, looked up and never dereferenced.
        unsafe { assert_eq!(ember_engine_destroy(a), EmberStatus::Ok) };
        let b = engine();
        let mut info = EmberInfo::default();
        // SAFETY: handles are looked up, never dereferenced; `info` is a local.
        unsafe {
            assert_eq!(train(a, &batch(2), ptr::null_mut()), EmberStatus::ErrInvalidHandle, "the stale handle {a:p} drove engine {b:p}");
            assert_eq!(ember_engine_info(b, &mut info), EmberStatus::Ok);
            assert_eq!(info.steps_done, 0, "a call through the stale handle changed the new engine");
            assert_eq!(ember_engine_destroy(a), EmberStatus::ErrInvalidHandle);
            assert_eq!(ember_engine_destroy(b), EmberStatus::Ok);
        }
    }
}

#[test]
fn absurd_sizes_are_refused_before_anything_is_allocated() {
    let e = engine();
    let b = batch(2);
    // SAFETY: the absurd sizes (2^40 samples, EMBER_MAX_BATCH + 1, ids past the address space) are
    // refused before any buffer is read; the other calls pass `b`'s buffers of 2 samples and locals.
    unsafe {
        // 2^40 samples without labels: their zero labels alone would be 4 TiB.
        let st = ember_eval(e, 1 << 40, b.dense.as_ptr(), ptr::null(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut(), 0, ptr::null_mut());
        assert_eq!(st, EmberStatus::ErrInvalidArgument);
        assert!(last_error().contains("batch_size") && last_error().contains(&EMBER_MAX_BATCH.to_string()), "{}", last_error());
        let st = ember_train_step(e, EMBER_MAX_BATCH + 1, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), ptr::null_mut());
        assert_eq!(st, EmberStatus::ErrInvalidArgument);
        // A buffer of more bytes than the address space holds.
        for f in [ember_eval_ids, ember_train_ids] {
            assert_eq!(f(e, &b, usize::MAX / 4), EmberStatus::ErrInvalidArgument, "{}", last_error());
            assert!(last_error().contains("address space"), "{}", last_error());
        }
        // The engine is unchanged and usable.
        assert_eq!(train(e, &b, ptr::null_mut()), EmberStatus::Ok, "{}", last_error());
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
        assert_eq!(info.steps_done, 1);
        assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
    }
}

/// `ember_eval` of `b` claiming `num_ids` ids.
///
/// # Safety
/// `num_ids` is at most `b.ids.len()`, or so large that its bytes exceed the address space
/// (refused before any id is read).
unsafe fn ember_eval_ids(e: *mut EmberEngine, b: &B, num_ids: usize) -> EmberStatus {
    // SAFETY: `b`'s buffers have the sizes of `b.n` samples, and the ids as this function's
    // contract says; no output is asked for.
    unsafe { ember_eval(e, b.n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), num_ids, ptr::null_mut(), 0, ptr::null_mut()) }
}

/// `ember_train_step` of `b` claiming `num_ids` ids.
///
/// # Safety
/// As for [`ember_eval_ids`].
unsafe fn ember_train_ids(e: *mut EmberEngine, b: &B, num_ids: usize) -> EmberStatus {
    // SAFETY: as in `ember_eval_ids`.
    unsafe { ember_train_step(e, b.n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), num_ids, ptr::null_mut()) }
}

#[test]
fn unknown_config_keys_and_absurd_values_are_config_errors() {
    for (edit, needle) in [
        (format!("stesp = 10\n{TOML}"), "stesp"),
        (TOML.replace("rows = 10\n", "rows = 9223372036854775807\n"), "rows"),
        (TOML.replace("lr = 0.1 }", "lr = nan }"), "lr"),
        (format!("grid = \"4294967296x4294967296\"\n{TOML}"), "grid"),
        (format!("{TOML}\n[parallel]\nsync_evry = 2\n"), "sync_evry"),
    ] {
        let toml = CString::new(edit).unwrap();
        let mut e = ptr::null_mut();
        // SAFETY: `toml` is a live CString and `e` a local handle slot.
        assert_eq!(unsafe { ember_engine_create_from_toml(toml.as_ptr(), &mut e) }, EmberStatus::ErrConfig, "{needle}");
        assert!(last_error().contains(needle), "{needle}: {}", last_error());
        assert!(e.is_null());
    }
}

#[test]
fn panics_are_caught() {
    assert_eq!(ember_test_panic(), EmberStatus::ErrPanic);
    assert!(last_error().contains("deliberate panic"), "{}", last_error());
    // The last error is per thread.
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "");
    assert_eq!(ember_test_panic(), EmberStatus::ErrPanic);
}

#[test]
fn checkpoint_round_trip() {
    let dir = std::env::temp_dir().join(format!("ember-ffi-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cdir = CString::new(dir.to_str().unwrap()).unwrap();
    let (a, c) = (engine(), engine());
    let b = batch(8);
    // SAFETY: `cdir` and `other` are live CStrings, `b` holds 8 samples, and `step`, `la`, `lc`,
    // `info` and `o` are local out-parameters (or NULL where allowed).
    unsafe {
        for _ in 0..4 {
            assert_eq!(train(a, &b, ptr::null_mut()), EmberStatus::Ok);
        }
        assert_eq!(ember_save_checkpoint(a, cdir.as_ptr(), 4), EmberStatus::Ok, "{}", last_error());
        assert!(dir.join("step-4").is_dir());
        let mut step = 0;
        assert_eq!(ember_load_checkpoint(c, cdir.as_ptr(), &mut step), EmberStatus::Ok, "{}", last_error());
        assert_eq!(step, 4);
        let (mut la, mut lc) = (0.0, 0.0);
        assert_eq!(train(a, &b, &mut la), EmberStatus::Ok);
        assert_eq!(train(c, &b, &mut lc), EmberStatus::Ok);
        assert_eq!(la.to_bits(), lc.to_bits(), "restored engine diverges");
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(c, &mut info), EmberStatus::Ok);
        assert_eq!(info.steps_done, 5);
        // A checkpoint of another model is refused and leaves the engine unchanged.
        let other = CString::new(TOML.replace("rows = 20", "rows = 30")).unwrap();
        let mut o = ptr::null_mut();
        assert_eq!(ember_engine_create_from_toml(other.as_ptr(), &mut o), EmberStatus::Ok);
        assert_ne!(ember_load_checkpoint(o, cdir.as_ptr(), ptr::null_mut()), EmberStatus::Ok);
        assert!(!last_error().is_empty());
        for h in [a, c, o] {
            assert_eq!(ember_engine_destroy(h), EmberStatus::Ok);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// Multi-rank engines (in-process ranks, one handle each) and the transport benchmarks.

use engine::data::synthetic::SyntheticData;

/// A 4-table model for the multi-rank tests; `extra` adds top-level keys (grid) and tables.
fn multi_toml(extra: &str, emb: &str) -> String {
    format!(
        r#"{extra}
batch_size = 32
seed = 11
[model]
num_dense = 3
bottom_mlp = [8, 4]
top_mlp = [8, 1]
interaction = {{ kind = "dot" }}
[[model.tables]]
rows = 50
dim = 4
[[model.tables]]
rows = 200
dim = 4
pooling = "mean"
[[model.tables]]
rows = 30
dim = 4
[[model.tables]]
rows = 120
dim = 4
[optim]
embedding = {emb}
dense = {{ kind = "adagrad", lr = 0.05, eps = 1e-8 }}
[synthetic]
zipf = 1.05
signal = 1.0
eval_samples = 100
"#
    )
}

const ADAGRAD: &str = r#"{ kind = "row_wise_adagrad", lr = 0.1, eps = 1e-8 }"#;
const SGD: &str = r#"{ kind = "sgd", lr = 0.2 }"#;

fn local_ranks(toml: &str, n: usize) -> Vec<usize> {
    let c = CString::new(toml).unwrap();
    let mut hs = vec![ptr::null_mut::<EmberEngine>(); n];
    // SAFETY: `c` is a live CString and `hs` has the `n` slots the call may fill.
    let st = unsafe { ember_engine_create_local_ranks(c.as_ptr(), n, hs.as_mut_ptr()) };
    assert_eq!(st, EmberStatus::Ok, "{}", last_error());
    hs.into_iter().map(|h| h as usize).collect()
}

/// Run `f(rank, handle)` for every handle, each on its own thread; results by rank.
fn on_threads<T: Send>(hs: &[usize], f: impl Fn(usize, *mut EmberEngine) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let js: Vec<_> = hs.iter().enumerate().map(|(w, &h)| s.spawn(move || f(w, h as *mut EmberEngine))).collect();
        js.into_iter().map(|j| j.join().unwrap()).collect()
    })
}

fn info(h: *mut EmberEngine) -> EmberInfo {
    let mut i = EmberInfo::default();
    // SAFETY: `i` is a local `EmberInfo`; `h` may be any handle value.
    assert_eq!(unsafe { ember_engine_info(h, &mut i) }, EmberStatus::Ok, "{}", last_error());
    i
}

/// The C layout of a `Batch`: (dense, labels, lengths table-major, ids table-major).
fn c_layout(b: &Batch) -> (Vec<f32>, Vec<f32>, Vec<u32>, Vec<u64>) {
    let lengths = b.sparse.iter().flat_map(|j| j.lengths.iter().copied()).collect();
    let ids = b.sparse.iter().flat_map(|j| j.values.iter().copied()).collect();
    (b.dense.clone(), b.labels.clone(), lengths, ids)
}

fn train_batch(h: *mut EmberEngine, b: &Batch) -> (EmberStatus, f64) {
    let (d, l, len, ids) = c_layout(b);
    let mut loss = f64::NAN;
    // SAFETY: the four buffers are the batch's C layout, of the sizes its `b.size()` samples
    // give; `loss` is a local.
    let st = unsafe { ember_train_step(h, b.size(), d.as_ptr(), l.as_ptr(), len.as_ptr(), ids.as_ptr(), ids.len(), &mut loss) };
    (st, loss)
}

fn eval_batch(h: *mut EmberEngine, b: &Batch) -> (EmberStatus, Vec<f32>, EmberMetrics) {
    let (d, l, len, ids) = c_layout(b);
    let mut logits = vec![0f32; b.size()];
    let mut m = EmberMetrics::default();
    // SAFETY: the batch's C layout as in `train_batch`; `logits` holds `logits.len()` floats
    // and `m` is a local.
    let st = unsafe { ember_eval(h, b.size(), d.as_ptr(), l.as_ptr(), len.as_ptr(), ids.as_ptr(), ids.len(), logits.as_mut_ptr(), logits.len(), &mut m) };
    (st, logits, m)
}

/// Rank w's part of the eval set when it is cut unevenly over `t` ranks (ranks may pass
/// different numbers of samples).
fn eval_part(eval: &Batch, w: usize, t: usize) -> Batch {
    let n = eval.size();
    let cut = |k: usize| (n * k * k) / (t * t);
    eval.slice(cut(w)..cut(w + 1))
}

fn destroy_all(hs: &[usize]) {
    for &h in hs {
        // SAFETY: a handle value, looked up and never dereferenced.
        assert_eq!(unsafe { ember_engine_destroy(h as *mut EmberEngine) }, EmberStatus::Ok);
    }
}

#[test]
fn local_ranks_train_like_the_engine_driver_and_one_process() {
    // Oracles: the engine's own in-process 2D driver (same ranks, same per-rank samples: the
    // losses must be bitwise equal) and a single-process engine fed the whole global batch
    // (same maths, other summation orders: equal to a tolerance).
    for (grid, emb, m, n) in [("", ADAGRAD, 1, 4), ("grid = \"2x2\"", SGD, 2, 2)] {
        let toml = multi_toml(grid, emb);
        let cfg = TrainConfig::from_toml(&multi_toml("", emb)).unwrap();
        let data = SyntheticData::new(&cfg).unwrap();
        let steps = 6;
        let hs = local_ranks(&toml, 4);
        let infos: Vec<EmberInfo> = hs.iter().map(|&h| info(h as *mut _)).collect();
        for (w, i) in infos.iter().enumerate() {
            assert_eq!((i.rank, i.world_size, i.grid_m, i.grid_n, i.batch_size, i.local_batch_size), (w, 4, m, n, 32, 8));
        }
        let starts: Vec<usize> = infos.iter().map(|i| i.sample_start).collect();
        let mut sorted = starts.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 8, 16, 24], "the ranks' slices must tile the global batch");
        let eval = data.eval_batch();
        let per_rank = on_threads(&hs, |w, h| {
            let mut losses = Vec::new();
            for step in 0..steps {
                let b = data.samples((step * 32 + starts[w]) as u64, 8);
                let (st, loss) = train_batch(h, &b);
                assert_eq!(st, EmberStatus::Ok, "rank {w}: {}", last_error());
                losses.push(loss);
            }
            let (st, logits, metrics) = eval_batch(h, &eval_part(&eval, w, 4));
            assert_eq!(st, EmberStatus::Ok, "rank {w}: {}", last_error());
            (losses, logits, metrics)
        });
        // Every rank reports the same global loss and the same metrics.
        for (w, r) in per_rank.iter().enumerate() {
            assert_eq!(r.0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), per_rank[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "rank {w}");
            assert_eq!(r.2, per_rank[0].2, "rank {w} metrics");
        }
        assert_eq!(per_rank[0].2.samples, eval.size() as u64);
        // The engine's driver, same config and data.
        let grid_v = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
        let (p, _) = plan(&cfg.model, m, n, &PlanOptions::from_config(&cfg)).unwrap();
        let (rep, _, _) = Job::new(&cfg, grid_v, &p, &ParallelOptions::default(), steps).train(&|_| std::result::Result::Ok(Cpu::new())).unwrap();
        assert_eq!(
            per_rank[0].0.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            rep.losses.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            "grid {m}x{n}: C-ABI ranks {:?} vs engine driver {:?}",
            per_rank[0].0,
            rep.losses
        );
        assert!((per_rank[0].2.ne - rep.ne).abs() < 1e-6 && (per_rank[0].2.auc - rep.auc).abs() < 1e-6, "{:?} vs ne {} auc {}", per_rank[0].2, rep.ne, rep.auc);
        // One process, whole global batches.
        let single = {
            let c = CString::new(multi_toml("", emb)).unwrap();
            let mut e = ptr::null_mut();
            // SAFETY: `c` is a live CString and `e` a local handle slot.
            assert_eq!(unsafe { ember_engine_create_from_toml(c.as_ptr(), &mut e) }, EmberStatus::Ok, "{}", last_error());
            e
        };
        for step in 0..steps {
            let (st, loss) = train_batch(single, &data.samples((step * 32) as u64, 32));
            assert_eq!(st, EmberStatus::Ok, "{}", last_error());
            let ranked = per_rank[0].0[step];
            assert!((loss - ranked).abs() <= 1e-5 * loss.abs().max(1.0), "grid {m}x{n} step {step}: one process {loss} vs ranks {ranked}");
        }
        let (st, _, sm) = eval_batch(single, &eval);
        assert_eq!(st, EmberStatus::Ok);
        assert!((sm.loss - per_rank[0].2.loss).abs() < 1e-4, "eval loss: one process {} vs ranks {}", sm.loss, per_rank[0].2.loss);
        // The ranks' logits are their own samples' logits.
        let all: Vec<f32> = per_rank.iter().flat_map(|r| r.1.iter().copied()).collect();
        let (_, single_logits, _) = eval_batch(single, &eval);
        let worst = all.iter().zip(&single_logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "logits differ from one process by {worst}");
        destroy_all(&hs);
        // SAFETY: a handle value, looked up and never dereferenced.
        unsafe { ember_engine_destroy(single) };
    }
}

#[test]
fn local_ranks_reject_bad_arguments_on_every_rank() {
    let toml = multi_toml("", ADAGRAD);
    let c = CString::new(toml.clone()).unwrap();
    // SAFETY: the strings are live CStrings or NULL on purpose; `hs` has 4 slots, at least the `n`
    // of each call; `e` is a local handle slot.
    unsafe {
        let mut hs = vec![ptr::null_mut::<EmberEngine>(); 4];
        assert_eq!(ember_engine_create_local_ranks(ptr::null(), 4, hs.as_mut_ptr()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_engine_create_local_ranks(c.as_ptr(), 4, ptr::null_mut()), EmberStatus::ErrNullPointer);
        assert_eq!(ember_engine_create_local_ranks(c.as_ptr(), 0, hs.as_mut_ptr()), EmberStatus::ErrInvalidArgument);
        assert_eq!(ember_engine_create_local_ranks(c.as_ptr(), 3, hs.as_mut_ptr()), EmberStatus::ErrConfig); // 32 % 3
        assert!(last_error().contains("divisible"), "{}", last_error());
        let g = CString::new(multi_toml("grid = \"2x2\"", ADAGRAD)).unwrap();
        assert_eq!(ember_engine_create_local_ranks(g.as_ptr(), 2, hs.as_mut_ptr()), EmberStatus::ErrConfig);
        assert!(last_error().contains("needs 4 ranks"), "{}", last_error());
        // A grid of several ranks without a launcher.
        let mut e = ptr::null_mut();
        assert_eq!(ember_engine_create_from_toml(g.as_ptr(), &mut e), EmberStatus::ErrConfig);
        assert!(last_error().contains("launcher"), "{}", last_error());
        for bad in ["grid = 4", "grid = \"2y2\"", "[parallel]\nsync_evry = 2", "[parallel]\nsharding = \"diagonal\"", "[parallel]\nsync_every = 0"] {
            // Top-level keys go first; a `[parallel]` table last.
            let text = if bad.starts_with('[') { format!("{}{bad}\n", multi_toml("", ADAGRAD)) } else { multi_toml(bad, ADAGRAD) };
            let t = CString::new(text).unwrap();
            assert_eq!(ember_engine_create_local_ranks(t.as_ptr(), 4, hs.as_mut_ptr()), EmberStatus::ErrConfig, "{bad}");
            assert!(last_error().starts_with("config:"), "{bad}: {}", last_error());
        }
        assert!(hs.iter().all(|h| h.is_null()), "a failed create wrote handles");
    }
    let cfg = TrainConfig::from_toml(&toml).unwrap();
    let data = SyntheticData::new(&cfg).unwrap();
    let hs = local_ranks(&toml, 4);
    let starts: Vec<usize> = hs.iter().map(|&h| info(h as *mut _).sample_start).collect();
    // SAFETY: the buffers are the C layout of `good` (8 samples), or NULL on purpose (rank 1's
    // labels, rank 0's eval labels and metrics); `dir` is a live CString; `logits` holds the 8
    // floats passed.
    let results = on_threads(&hs, |w, h| unsafe {
        let good = data.samples(starts[w] as u64, 8);
        let mut out = Vec::new();
        // Every rank passes the global batch size instead of its slice.
        out.push(train_batch(h, &data.samples(0, 32)).0);
        // Only rank 2 passes a wrong size: it gets the reason, the others ERR_PEER.
        let b = if w == 2 { data.samples(0, 7) } else { good.clone() };
        out.push(train_batch(h, &b).0);
        // Only rank 1 passes a NULL pointer.
        let (d, l, len, ids) = c_layout(&good);
        let lp = if w == 1 { ptr::null() } else { l.as_ptr() };
        out.push(ember_train_step(h, 8, d.as_ptr(), lp, len.as_ptr(), ids.as_ptr(), ids.len(), ptr::null_mut()));
        // Only rank 3 passes an id out of range.
        let mut bad = good.clone();
        if w == 3 {
            bad.sparse[1].values[0] = 200;
        }
        out.push(train_batch(h, &bad).0);
        out.push(if last_error().contains("out of range") || w != 3 { EmberStatus::Ok } else { EmberStatus::ErrInternal });
        // A save at a step the engine is not at.
        let dir = CString::new("/nonexistent-ember-dir").unwrap();
        out.push(ember_save_checkpoint(h, dir.as_ptr(), 5));
        // Rank 0 evaluates without labels (logits only); the others ask for global metrics,
        // which cannot include rank 0's samples: refused after the same collectives (no hang).
        let mut logits = vec![0f32; 8];
        let mut m = EmberMetrics::default();
        let (lp, mp) = if w == 0 { (ptr::null(), ptr::null_mut()) } else { (l.as_ptr(), &mut m as *mut EmberMetrics) };
        out.push(ember_eval(h, 8, d.as_ptr(), lp, len.as_ptr(), ids.as_ptr(), ids.len(), logits.as_mut_ptr(), 8, mp));
        // Nothing trained: the engines are still at step 0 and train normally.
        out.push(if info(h).steps_done == 0 { EmberStatus::Ok } else { EmberStatus::ErrInternal });
        let (st, loss) = train_batch(h, &good);
        out.push(st);
        (out, loss)
    });
    use EmberStatus::*;
    let want = |w: usize| {
        vec![
            ErrInvalidArgument,
            if w == 2 { ErrInvalidArgument } else { ErrPeer },
            if w == 1 { ErrNullPointer } else { ErrPeer },
            if w == 3 { ErrInput } else { ErrPeer },
            Ok,
            ErrInvalidArgument,
            if w == 0 { Ok } else { ErrInvalidArgument },
            Ok,
            Ok,
        ]
    };
    for (w, (got, _)) in results.iter().enumerate() {
        assert_eq!(got, &want(w), "rank {w}");
    }
    assert!(results.iter().all(|r| r.1.to_bits() == results[0].1.to_bits()));
    // The first step after the rejected ones is the engine's first step.
    let (p, _) = plan(&cfg.model, 1, 4, &PlanOptions::from_config(&cfg)).unwrap();
    let (rep, _, _) = Job::new(&cfg, Grid::new(1, 4, Placement::ReplicasInNode).unwrap(), &p, &ParallelOptions::default(), 1).train(&|_| std::result::Result::Ok(Cpu::new())).unwrap();
    assert_eq!(results[0].1.to_bits(), rep.losses[0].to_bits());
    // Use after destroy.
    destroy_all(&hs);
    let b = data.samples(0, 8);
    assert_eq!(train_batch(hs[0] as *mut _, &b).0, EmberStatus::ErrInvalidHandle);
}

#[test]
fn local_ranks_checkpoint_into_one_process_and_back() {
    let toml = multi_toml("grid = \"2x2\"", SGD) + "[parallel]\nsync_every = 2\n";
    let cfg = TrainConfig::from_toml(&multi_toml("", SGD)).unwrap();
    let data = SyntheticData::new(&cfg).unwrap();
    let dir = std::env::temp_dir().join(format!("ember-ffi-ranks-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cdir = CString::new(dir.to_str().unwrap()).unwrap();
    let hs = local_ranks(&toml, 4);
    let starts: Vec<usize> = hs.iter().map(|&h| info(h as *mut _).sample_start).collect();
    let eval = data.eval_batch();
    // SAFETY: `cdir` is a live CString.
    let out = on_threads(&hs, |w, h| unsafe {
        for step in 0..3 {
            assert_eq!(train_batch(h, &data.samples((step * 32 + starts[w]) as u64, 8)).0, EmberStatus::Ok, "{}", last_error());
        }
        // Step 3 is not a replica-sync step (K = 2): refused on every rank.
        let st3 = ember_save_checkpoint(h, cdir.as_ptr(), 3);
        assert_eq!(train_batch(h, &data.samples((3 * 32 + starts[w]) as u64, 8)).0, EmberStatus::Ok);
        let st4 = ember_save_checkpoint(h, cdir.as_ptr(), 4);
        let e = last_error();
        let (_, logits, m) = eval_batch(h, &eval_part(&eval, w, 4));
        (st3, st4, e, logits, m)
    });
    for (w, o) in out.iter().enumerate() {
        assert_eq!(o.0, EmberStatus::ErrConfig, "rank {w}");
        assert_eq!(o.1, EmberStatus::Ok, "rank {w}: {}", o.2);
    }
    assert!(dir.join("step-4/manifest.json").is_file());
    // Into one process: the same model (to float tolerance: the ranks' lookups sum in another order).
    let c = CString::new(multi_toml("", SGD)).unwrap();
    let mut single = ptr::null_mut();
    // SAFETY: `c` and `cdir` are live CStrings; `single` and `step` are local out-parameters.
    unsafe {
        assert_eq!(ember_engine_create_from_toml(c.as_ptr(), &mut single), EmberStatus::Ok);
        let mut step = 0;
        assert_eq!(ember_load_checkpoint(single, cdir.as_ptr(), &mut step), EmberStatus::Ok, "{}", last_error());
        assert_eq!(step, 4);
        let (_, logits, m) = eval_batch(single, &eval);
        let ranked: Vec<f32> = out.iter().flat_map(|o| o.3.iter().copied()).collect();
        let worst = ranked.iter().zip(&logits).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-5, "restored one-process logits differ by {worst}");
        assert!((m.auc - out[0].4.auc).abs() < 1e-6);
        ember_engine_destroy(single);
    }
    // Into fresh ranks (the same grid): the same eval results bitwise, and the step count.
    let fresh = local_ranks(&toml, 4);
    // SAFETY: `cdir` is a live CString and `step` a local.
    let again = on_threads(&fresh, |w, h| unsafe {
        let mut step = 0;
        assert_eq!(ember_load_checkpoint(h, cdir.as_ptr(), &mut step), EmberStatus::Ok, "{}", last_error());
        let (_, logits, m) = eval_batch(h, &eval_part(&eval, w, 4));
        (step, info(h).steps_done, logits, m)
    });
    for (w, a) in again.iter().enumerate() {
        assert_eq!((a.0, a.1), (4, 4));
        assert_eq!(a.2, out[w].3, "rank {w} logits after reload");
        assert_eq!(a.3, out[w].4);
    }
    // A missing checkpoint fails on every rank and leaves them usable.
    let missing = CString::new("/nonexistent/ember-ckpt").unwrap();
    // SAFETY: `missing` is a live CString; `step_out` is NULL, which is allowed.
    let st = on_threads(&fresh, |_, h| unsafe { (ember_load_checkpoint(h, missing.as_ptr(), ptr::null_mut()), info(h).steps_done) });
    assert!(st.iter().all(|&(s, d)| s != EmberStatus::Ok && s != EmberStatus::ErrPeer && d == 4), "{st:?}");
    destroy_all(&hs);
    destroy_all(&fresh);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_rows_through_the_abi() {
    let hs = local_ranks(&multi_toml("", ADAGRAD), 4);
    // SAFETY: `rows` holds 4 rows, at least each call's rows_cap (3 or 4), or rows_out is NULL with
    // rows_cap 0; `n` and the `&mut 0`s are local out-parameters, or NULL on purpose.
    let rows = on_threads(&hs, |_, h| unsafe {
        let mut out = Vec::new();
        for coll in [EMBER_BENCH_ALL_TO_ALL, EMBER_BENCH_ALL_REDUCE, EMBER_BENCH_PING_PONG] {
            let mut rows = [EmberBenchRow::default(); 4];
            let mut n = 0;
            // Too small a buffer: the count comes back, nothing runs (on every rank: no hang).
            assert_eq!(ember_bench_collective(h, coll, 100, 100 * 64, 4, 2, 1, rows.as_mut_ptr(), 3, &mut n), EmberStatus::ErrInvalidArgument);
            assert_eq!(n, 4);
            let st = ember_bench_collective(h, coll, 100, 100 * 64, 4, 2, 1, rows.as_mut_ptr(), 4, &mut n);
            assert_eq!(st, EmberStatus::Ok, "{}", last_error());
            assert_eq!(n, 4);
            out.push(rows);
        }
        assert_eq!(ember_bench_collective(h, 7, 1, 2, 2, 1, 0, ptr::null_mut(), 0, &mut 0), EmberStatus::ErrInvalidArgument);
        assert_eq!(ember_bench_collective(h, 0, 1, 2, 1, 1, 0, ptr::null_mut(), 0, &mut 0), EmberStatus::ErrInvalidArgument);
        assert_eq!(ember_bench_collective(h, 0, 1, 2, 2, 1, 0, ptr::null_mut(), 0, ptr::null_mut()), EmberStatus::ErrNullPointer);
        // 4 ranks x 128 MiB per peer: all-to-all buffers over the cap; the all-reduce's are not.
        let big = EMBER_BENCH_MAX_BYTES / 2;
        assert_eq!(ember_bench_collective(h, EMBER_BENCH_ALL_TO_ALL, big, big, 2, 1, 0, ptr::null_mut(), 0, &mut 0), EmberStatus::ErrInvalidArgument);
        assert!(last_error().contains("exceed"), "{}", last_error());
        let mut n = 0;
        assert_eq!(ember_bench_collective(h, EMBER_BENCH_ALL_REDUCE, big, big, 2, 1, 0, ptr::null_mut(), 0, &mut n), EmberStatus::ErrInvalidArgument);
        assert_eq!(n, 1, "{}", last_error()); // only rows_cap was wrong
        out
    });
    for (k, factor) in [(0usize, 3.0 / 4.0), (1, 2.0 * 3.0 / 4.0), (2, 1.0)] {
        for (i, r) in rows[0][k].iter().enumerate() {
            let size = 100 * 4usize.pow(i as u32);
            assert_eq!((r.size, r.count, r.wrong), (size, size / 4, 0));
            let bytes = if k == 0 { 4 * size } else { size } as f64;
            assert!(r.time_us > 0.0 && (r.algbw - bytes / r.time_us / 1e3).abs() <= 1e-9 * r.algbw);
            assert!((r.busbw - r.algbw * factor).abs() <= 1e-9 * r.algbw);
        }
        for w in 1..4 {
            assert_eq!(rows[w][k], rows[0][k], "rank {w} rows");
        }
    }
    destroy_all(&hs);
    // A single-process engine measures a one-rank world.
    let e = engine();
    let mut rows = [EmberBenchRow::default(); 2];
    let mut n = 0;
    // SAFETY: `rows` holds the 2 rows passed as rows_cap; `n` is a local.
    assert_eq!(unsafe { ember_bench_collective(e, EMBER_BENCH_ALL_REDUCE, 1024, 2048, 2, 2, 0, rows.as_mut_ptr(), 2, &mut n) }, EmberStatus::Ok, "{}", last_error());
    assert_eq!((n, rows[1].size, rows[1].wrong, rows[1].busbw), (2, 2048, 0, 0.0));
    // SAFETY: as above.
    assert_eq!(unsafe { ember_bench_collective(e, EMBER_BENCH_PING_PONG, 8, 8, 2, 1, 0, rows.as_mut_ptr(), 2, &mut n) }, EmberStatus::ErrInvalidArgument);
    assert!(last_error().contains("at least 2 ranks"), "{}", last_error());
    // SAFETY: a handle value, looked up and never dereferenced.
    unsafe { ember_engine_destroy(e) };
}
