#!/bin/sh
# Install the C ABI of Ember: libember.so and libember.a into PREFIX/lib, ember.h into
# PREFIX/include, and ember.pc (from engine/ffi/ember.pc.in) into PREFIX/lib/pkgconfig, so that
#   PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs ember
# finds the library (docs/capi.md).
#
# usage: tools/install-capi.sh PREFIX [LIBDIR]
#   LIBDIR: the folder holding the built libember.* (default: $CARGO_TARGET_DIR or target,
#   then release if built, else debug). Build first: cargo build --release -p ember-ffi
set -eu
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 PREFIX [LIBDIR]" >&2
    exit 2
fi
root=$(cd "$(dirname "$0")/.." && pwd)
prefix=$1
case $prefix in /*) ;; *) prefix=$(pwd)/$prefix ;; esac
if [ $# -eq 2 ]; then
    libdir=$2
else
    target=${CARGO_TARGET_DIR:-$root/target}
    if [ -f "$target/release/libember.so" ]; then libdir=$target/release; else libdir=$target/debug; fi
fi
for f in libember.so libember.a; do
    if [ ! -f "$libdir/$f" ]; then
        echo "$0: $libdir/$f not found: build it with cargo build [--release] -p ember-ffi" >&2
        exit 1
    fi
done
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
cp "$libdir/libember.so" "$libdir/libember.a" "$prefix/lib/"
cp "$root/engine/include/ember.h" "$prefix/include/"
sed -e '/^#/d' -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$root/engine/ffi/ember.pc.in" > "$prefix/lib/pkgconfig/ember.pc"
echo "installed libember $version under $prefix (pkg-config: PKG_CONFIG_PATH=$prefix/lib/pkgconfig)"
