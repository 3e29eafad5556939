//! The cluster secret and the HMAC challenge every connection answers before it is served.
//!
//! When a server has a secret, a connection's hello starts a handshake instead of being answered
//! with the server's self-description:
//!
//! ```text
//! client → Hello   body: client nonce (32 B)
//! server → Hello reply, status AuthChallenge
//!                  body: server nonce (32 B) ‖ HMAC(secret, "server" ‖ client nonce ‖ server nonce ‖ shard ‖ worker)
//! client → Auth    body: HMAC(secret, "client" ‖ client nonce ‖ server nonce ‖ shard ‖ worker)
//! server → Auth reply, status Ok, body: the server's self-description; the connection is served
//! ```
//!
//! Both sides prove they hold the secret, each over a nonce the other chose, so a recorded
//! handshake cannot be replayed, and the proofs bind the shard and worker the hello named. Until
//! the client's proof checks, the server sends nothing but the challenge: no table, address or
//! rkey (RDMA set-up runs on the authenticated connection). A wrong proof, a hello without a
//! nonce, or any other request first is refused with [`Status::Unauthenticated`] and the
//! connection closed.
//!
//! This authenticates; it does not encrypt. Traffic after the handshake is in the clear, so a
//! party on the path can read it and, with enough control of the network, take over an
//! authenticated TCP connection. Run clusters on a network you trust, as with any RDMA fabric.
//!
//! [`Status::Unauthenticated`]: crate::wire::Status::Unauthenticated

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Result, TransportError};

/// Bytes of each side's nonce.
pub const NONCE_BYTES: usize = 32;
/// Bytes of an HMAC-SHA256 proof.
pub const PROOF_BYTES: usize = 32;
/// The shortest secret accepted: 128 bits.
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest secret file read (a secret is a line of text or a few random bytes, never a big file).
pub const SECRET_FILE_BYTES_MAX: usize = 4096;
/// Bytes of a secret the embedded cluster of `tessera demo` generates for itself.
pub const GENERATED_SECRET_BYTES: usize = 32;
/// The challenge's body: the server's nonce and its proof.
pub const CHALLENGE_BYTES: usize = NONCE_BYTES + PROOF_BYTES;

/// Who a proof is from; part of what is signed, so that one side's proof never passes for the
/// other's.
#[derive(Debug, Clone, Copy)]
pub enum Side {
    Server,
    Client,
}

/// One side's fresh random bytes.
pub type Nonce = [u8; NONCE_BYTES];

/// What a handshake's proofs are computed over, besides the side: both nonces and the hello's
/// shard and worker.
#[derive(Debug, Clone, Copy)]
pub struct Transcript {
    pub client_nonce: Nonce,
    pub server_nonce: Nonce,
    pub shard: u64,
    pub worker: u32,
}

/// A cluster's shared secret. Cheap to clone; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Arc<[u8]>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterSecret({} bytes)", self.0.len())
    }
}

impl ClusterSecret {
    /// A secret from its bytes; refuses one shorter than [`SECRET_BYTES_MIN`].
    pub fn new(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < SECRET_BYTES_MIN {
            return Err(TransportError::BadConfig {
                field: "cluster_secret",
                value: format!("{} bytes", bytes.len()),
                reason: format!("must be at least {SECRET_BYTES_MIN} bytes; make one with `head -c 32 /dev/urandom | base64 > FILE`"),
            });
        }
        Ok(Self(bytes.into()))
    }

    /// Reads a secret file (`--cluster-secret-file`). The whole file is the secret, less
    /// trailing whitespace, so `echo`ed and base64 files work as they look.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| TransportError::BadConfig { field: "cluster_secret_file", value: path.display().to_string(), reason };
        let bytes = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
        if bytes.len() > SECRET_FILE_BYTES_MAX {
            return Err(bad(format!("{} bytes is more than a secret needs (at most {SECRET_FILE_BYTES_MAX})", bytes.len())));
        }
        let end = bytes.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
        Self::new(&bytes[..end]).map_err(|e| bad(e.to_string()))
    }

    /// A fresh random secret, for a cluster that lives in one process (`tessera demo`).
    pub fn generate() -> Self {
        Self(random_nonce().into())
    }

    /// The proof `side` sends for `transcript`.
    pub fn proof(&self, side: Side, t: &Transcript) -> [u8; PROOF_BYTES] {
        self.mac(side, t).finalize().into_bytes().into()
    }

    /// Whether `proof` is `side`'s proof for `transcript`, compared in constant time.
    pub fn verify(&self, side: Side, t: &Transcript, proof: &[u8]) -> bool {
        self.mac(side, t).verify_slice(proof).is_ok()
    }

    fn mac(&self, side: Side, t: &Transcript) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(match side {
            Side::Server => b"tessera-auth-v1 server",
            Side::Client => b"tessera-auth-v1 client",
        });
        mac.update(&t.client_nonce);
        mac.update(&t.server_nonce);
        mac.update(&t.shard.to_le_bytes());
        mac.update(&t.worker.to_le_bytes());
        mac
    }
}

/// Fresh bytes from the operating system's generator.
pub fn random_nonce() -> Nonce {
    let mut nonce = [0u8; NONCE_BYTES];
    // Without the kernel's generator nothing here can be made safe; that is a broken host.
    getrandom::getrandom(&mut nonce).expect("the operating system's random number generator works");
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript() -> Transcript {
        Transcript { client_nonce: [1; 32], server_nonce: [2; 32], shard: 3, worker: 4 }
    }

    #[test]
    fn proofs_check_only_with_the_same_secret_side_and_transcript() {
        let secret = ClusterSecret::new(b"0123456789abcdef").unwrap();
        let t = transcript();
        let proof = secret.proof(Side::Client, &t);
        assert!(secret.verify(Side::Client, &t, &proof));
        assert!(!secret.verify(Side::Server, &t, &proof), "a client's proof must not pass for the server's");
        let other = ClusterSecret::new(b"0123456789abcdeF").unwrap();
        assert!(!other.verify(Side::Client, &t, &proof));
        for changed in
            [Transcript { shard: 4, ..t }, Transcript { worker: 5, ..t }, Transcript { server_nonce: [9; 32], ..t }, Transcript { client_nonce: [9; 32], ..t }]
        {
            assert!(!secret.verify(Side::Client, &changed, &proof));
        }
        assert!(!secret.verify(Side::Client, &t, &proof[..31]), "a short proof is wrong, not a prefix match");
        assert!(!secret.verify(Side::Client, &t, &[]));
    }

    #[test]
    fn secrets_are_read_from_files_and_short_ones_refused() {
        let dir = std::env::temp_dir().join(format!("tessera-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "correct horse battery staple\n").unwrap();
        let from_file = ClusterSecret::from_file(&good).unwrap();
        assert_eq!(from_file, ClusterSecret::new(b"correct horse battery staple").unwrap(), "the trailing newline is not part of it");
        let short = dir.join("short");
        std::fs::write(&short, "hunter2\n").unwrap();
        let err = ClusterSecret::from_file(&short).unwrap_err().to_string();
        assert!(err.contains("at least 16 bytes") && err.contains("short"), "{err}");
        let err = ClusterSecret::from_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
        assert!(!format!("{from_file:?}").contains("horse"), "a secret is never printed");
        assert_ne!(ClusterSecret::generate(), ClusterSecret::generate());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
