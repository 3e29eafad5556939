//! Memory a shard lets workers read directly: the dense tables' value blocks.
//!
//! The engine lays each dense table part out as blocks (`tessera_layout::dense`, which also says
//! how a reader knows a copy is whole), and tells its transport about the part ([`Exposure`]). A
//! transport that can do one-sided reads (RDMA) registers the memory for remote reading; TCP
//! ignores it.
//!
//! A block larger than the path MTU comes back in several packets, each copied when the responder
//! builds it. The copy still runs in increasing address order when the requester retransmits:
//! a queue pair's packets arrive in order, so the responses it accepts are a prefix of one
//! execution of the READ followed by the rest of a later one.
//!
//! What the check cannot see is a push the client split across frames: the shard applies each
//! frame as its own change, so between them a block is whole with half of it new.

use std::sync::Arc;

use tessera_layout::DenseLayout;

/// Memory that stays mapped at the same address for as long as any handle to it lives.
///
/// # Safety
/// An implementor promises that `span()` returns the same address and length for its whole life,
/// that the bytes there stay mapped (readable) until it is dropped, and that the span is
/// page-aligned. A transport registers the span with a device on the strength of this, and keeps
/// an `Arc` of the implementor for as long as the registration lives.
#[allow(unsafe_code)] // a contract only: nothing here is unsafe to run
pub unsafe trait StableMemory: Send + Sync + std::fmt::Debug {
    /// Start address and length in bytes.
    fn span(&self) -> (u64, usize);
}

/// A dense table part's memory, as the engine hands it to its transport.
#[derive(Debug, Clone)]
pub struct DenseView {
    pub table: u32,
    pub layout: DenseLayout,
    /// The blocks, [`DenseLayout::words`] words from the span's start.
    pub memory: Arc<dyn StableMemory>,
}

/// A change to what a shard exposes. A shard may expose several parts of one table (a
/// replicated shard holds one per replication range), each named by its first key.
#[derive(Debug, Clone)]
pub enum Exposure {
    /// A dense part was created; workers may read it. It replaces any exposed part of the
    /// table that starts at the same key.
    Add(DenseView),
    /// The part of `table` that starts at key `start` is going away (its table was dropped, its
    /// range left the shard, or a part loaded from disk replaces it): stop exposing it.
    Remove { table: u32, start: u64 },
}
