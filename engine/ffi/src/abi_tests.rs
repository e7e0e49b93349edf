// The C ABI called from Rust: null pointers, wrong sizes, bad handles and panics come back as
// status codes with a message, never as crashes.
use crate::*;
use std::ffi::{CStr, CString};
use std::ptr;

const TOML: &str = r#"
batch_size = 8
seed = 3
[model]
num_dense = 2
bottom_mlp = [4]
top_mlp = [4, 1]
interaction = { kind = "dot" }
[[model.tables]]
rows = 10
dim = 4
[[model.tables]]
rows = 20
dim = 4
[optim]
embedding = { kind = "sgd", lr = 0.1 }
dense = { kind = "sgd", lr = 0.1 }
"#;

fn last_error() -> String {
    unsafe { CStr::from_ptr(ember_last_error()) }.to_str().unwrap().to_string()
}

fn engine() -> *mut EmberEngine {
    let toml = CString::new(TOML).unwrap();
    let mut e = ptr::null_mut();
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

unsafe fn train(e: *mut EmberEngine, b: &B, loss: *mut f64) -> EmberStatus {
    ember_train_step(e, b.n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), b.ids.len(), loss)
}

#[test]
fn version_and_status_names() {
    let v = unsafe { CStr::from_ptr(ember_version()) }.to_str().unwrap();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    assert_eq!(ember_abi_version(), EMBER_ABI_VERSION);
    assert_eq!(unsafe { CStr::from_ptr(ember_status_name(7)) }.to_str().unwrap(), "EMBER_STATUS_ERR_INVALID_HANDLE");
    assert_eq!(unsafe { CStr::from_ptr(ember_status_name(-1)) }.to_str().unwrap(), "EMBER_STATUS_UNKNOWN");
}

#[test]
fn train_eval_and_info() {
    let e = engine();
    let b = batch(8);
    let mut loss = f64::NAN;
    unsafe {
        for _ in 0..3 {
            assert_eq!(train(e, &b, &mut loss), EmberStatus::Ok, "{}", last_error());
            assert!(loss.is_finite() && loss > 0.0);
        }
        assert_eq!(last_error(), "");
        let mut info = EmberInfo::default();
        assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
        assert_eq!((info.num_dense, info.num_tables, info.batch_size, info.steps_done, info.samples_seen), (2, 2, 8, 3, 24));
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
    unsafe {
        let call = |n: usize, num_ids: usize| {
            ember_train_step(e, n, b.dense.as_ptr(), b.labels.as_ptr(), b.lengths.as_ptr(), b.ids.as_ptr(), num_ids, ptr::null_mut())
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
