//! What the fuzz targets in `fuzz_targets/` run, and the seeds they start from.
//!
//! Each module holds one target's harness (`run`, which libFuzzer calls with every input) and
//! its seeds (`seeds`, made by the real writers so that they stay valid when a format changes;
//! `examples/seeds.rs` writes them to `corpus/`). The harnesses assert what the code under test
//! promises, not only that it does not panic: a decoded header is within its limit, a replayed
//! log is a prefix of what was written, a loaded checkpoint saves back to the bytes it was
//! loaded from, a failed C call has a message and leaves nothing behind.

pub mod canary;
pub mod capi;
pub mod checkpoint;
pub mod frame_header;
pub mod wal_reader;

/// Reads a fuzz input front to back. Past its end every number reads as zero and every byte
/// string as empty, so that any input is a complete program for a harness.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let head = self.bytes(N);
        out[..head.len()].copy_from_slice(head);
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// Whatever is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes what an [`Input`] reads, for the seed generators.
#[derive(Debug, Default, Clone)]
pub struct Output(pub Vec<u8>);

impl Output {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// `bytes` copied into 8-byte aligned memory (the log and frame readers read in place), and its
/// length.
pub fn aligned(bytes: &[u8]) -> (Vec<u64>, usize) {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
    (words, bytes.len())
}

/// A seed: a file name and its bytes.
pub type Seed = (&'static str, Vec<u8>);

/// Every target's seeds, by target name.
pub fn all_seeds() -> Vec<(&'static str, Vec<Seed>)> {
    vec![
        ("frame_header", frame_header::seeds()),
        ("wal_reader", wal_reader::seeds()),
        ("checkpoint_reader", checkpoint::seeds()),
        ("capi", capi::seeds()),
        ("canary", canary::seeds()),
    ]
}

#[cfg(test)]
mod tests {
    /// Every seed runs through its harness without a failed assertion, and gets somewhere: the
    /// seeds are valid inputs, and the harnesses accept what the real writers write.
    #[test]
    fn seeds_pass_their_harnesses() {
        // Seeds that are meant to be refused early.
        let refused = ["raw-log-gap", "raw-empty", "hello"];
        for (target, seeds) in super::all_seeds() {
            for (name, bytes) in seeds {
                let got = match target {
                    "frame_header" => super::frame_header::run(&bytes),
                    "wal_reader" => super::wal_reader::run(&bytes),
                    "checkpoint_reader" => super::checkpoint::run(&bytes),
                    "capi" => super::capi::run(&bytes),
                    _ => 0,
                };
                eprintln!("{target}/{name}: {got}");
                assert!(got > 0 || refused.contains(&name) || target == "canary", "{target}/{name} got nowhere");
            }
        }
    }
}
