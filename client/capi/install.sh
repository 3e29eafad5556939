#!/usr/bin/env bash
# client/capi/install.sh PREFIX [PROFILE]: installs libtessera.so (the file libtessera.so.VERSION, with
# its SONAME libtessera.so.0 and libtessera.so linking to it), tessera.h and a pkg-config
# file under PREFIX (lib/, include/, lib/pkgconfig/), from the PROFILE build (default release:
# `cargo build --release -p tessera-capi`). A C or C++ trainer then builds with
#   cc trainer.c $(PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs tessera)
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 PREFIX [PROFILE]" >&2; exit 2; }
prefix=$(mkdir -p "$1" && cd "$1" && pwd)
profile=${2:-release}
here=$(cd "$(dirname "$0")" && pwd)
target=${CARGO_TARGET_DIR:-$here/../../target}/$profile
lib=$target/libtessera.so
if [ ! -f "$lib" ]; then
  flag=$([ "$profile" = release ] && echo " --release" || true)
  echo "install.sh: $lib is missing: build it first with cargo build$flag -p tessera-capi" >&2
  exit 1
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../../Cargo.toml" | head -1)
soname=$(objdump -p "$lib" 2>/dev/null | sed -n 's/^ *SONAME *//p')
soname=${soname:-libtessera.so.0}
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
# The versioned file, the SONAME programs record when they link (build.rs sets it), and the
# name the linker looks for (-ltessera).
rm -f "$prefix/lib/libtessera.so" "$prefix/lib/$soname"
cp "$lib" "$prefix/lib/libtessera.so.$version"
ln -s "libtessera.so.$version" "$prefix/lib/$soname"
ln -s "$soname" "$prefix/lib/libtessera.so"
cp "$here/include/tessera.h" "$prefix/include/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/tessera.pc.in" > "$prefix/lib/pkgconfig/tessera.pc"
echo "installed libtessera $version under $prefix"
