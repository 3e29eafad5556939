//! cargo-fuzz target `frame_header`: see [`tessera_fuzz::frame_header`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_fuzz::frame_header::run(data);
});
