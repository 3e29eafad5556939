//! What the transport counts for the server's metrics (`tessera server --metrics ADDR`).
//!
//! Recorded through the `metrics` facade: with no exporter installed, each is a no-op.

/// Peers refused for not proving they hold the cluster secret.
pub const AUTH_REFUSALS: &str = "tessera_auth_refusals_total";
/// Open connections per endpoint (`shard` label: a shard's index, or `control`).
pub const CONNECTIONS: &str = "tessera_connections";
/// Times a worker found every slot of its ring to a shard in use (an RDMA credit stall), seen
/// by the shard when it consumes a slot of a full ring.
pub const SLOT_STALLS: &str = "tessera_rdma_slot_stalls_total";

/// Connections refused because the server held its most (`--connections-max`).
pub const CONNECTIONS_REFUSED: &str = "tessera_connections_refused_total";
/// Connections closed because the peer stopped reading its replies.
pub const SLOW_CLIENTS_CLOSED: &str = "tessera_slow_clients_closed_total";

/// A shard's RDMA slot-stall counter (`None`: the control plane's endpoint).
pub fn slot_stalls(shard: Option<u16>) -> metrics::Counter {
    metrics::counter!(SLOT_STALLS, "shard" => shard.map_or_else(|| "control".to_string(), |s| s.to_string()))
}

/// Counts one refused peer.
pub fn auth_refused() {
    metrics::counter!(AUTH_REFUSALS).increment(1);
}
