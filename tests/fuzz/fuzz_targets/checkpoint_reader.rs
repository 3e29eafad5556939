//! cargo-fuzz target `checkpoint_reader`: see [`tessera_fuzz::checkpoint`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_fuzz::checkpoint::run(data);
});
