//! A planted bug, to prove that the fuzzing setup finds one: a little record parser that
//! panics when a record has a 4-byte magic, a version, a 4-byte length and a 4-byte tag, each
//! a specific value. Random inputs essentially never get there (one in 2^104); a fuzzer
//! guided by coverage and comparison operands does within seconds to a minute. `run.sh` fails
//! when it does not.

use crate::{Output, Seed};

/// The message `run.sh` looks for in the crash report.
pub const PLANTED: &str = "canary: the planted bug was reached";

pub fn run(data: &[u8]) {
    let Some(head) = data.get(..16) else { return };
    if head[..4] != *b"TSRA" {
        return;
    }
    if head[4] != 2 || head[5] & 0x80 == 0 {
        return;
    }
    let len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if len != 0x5eed_cafe {
        return;
    }
    if head[12..16] == *b"BOOM" {
        panic!("{PLANTED}");
    }
}

/// One seed that is nothing like the bug: the fuzzer must find it, not be handed it.
pub fn seeds() -> Vec<Seed> {
    let mut out = Output::default();
    out.bytes(b"hello, fuzzer");
    vec![("hello", out.0)]
}
