//! cargo-fuzz target `capi`: see [`tessera_fuzz::capi`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_fuzz::capi::run(data);
});
