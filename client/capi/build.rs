//! Link settings of `libtessera.so`, the cdylib (the rlib is unaffected).
//!
//! - **SONAME `libtessera.so.0`.** Programs linked against the library record this name, and
//!   `install.sh` makes it a link to the versioned file: a later library with the same ABI
//!   replaces it without relinking them. Bump [`ABI_VERSION`] when a change breaks the ABI
//!   (a function removed or changed, a struct reordered).
//! - **Stripped in release builds.** The workspace's release profile keeps line tables
//!   (`debug = 1`) for profiling the servers; a library shipped to trainers does not need them,
//!   and they were most of its size.

/// The ABI's major version: the number in the SONAME.
const ABI_VERSION: u32 = 0;

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libtessera.so.{ABI_VERSION}");
    if std::env::var("PROFILE").as_deref() == Ok("release") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,--strip-all");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
