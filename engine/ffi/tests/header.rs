//! The committed header engine/include/ember.h must be what cbindgen generates from the
//! sources ("CI fails if it is stale"). `EMBER_BLESS=1` rewrites it instead of failing.
use std::path::PathBuf;

#[test]
fn header_is_up_to_date() {
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let fresh = String::from_utf8(fresh).expect("header is UTF-8");
    let path = crate_dir.join("../include/ember.h");
    if std::env::var_os("EMBER_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("write ember.h");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "engine/include/ember.h is stale: regenerate it with `EMBER_BLESS=1 cargo test -p ember-ffi --test header`"
    );
}
