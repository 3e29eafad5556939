//! cargo-fuzz target `canary`: see [`tessera_fuzz::canary`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_fuzz::canary::run(data);
});
