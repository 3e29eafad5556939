//! cargo-fuzz target `wal_reader`: see [`tessera_fuzz::wal_reader`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tessera_fuzz::wal_reader::run(data);
});
