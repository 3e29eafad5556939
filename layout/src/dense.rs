//! How a dense table part lies in memory: blocks, each bracketed by two version words, that a
//! worker may read one-sidedly (RDMA) and check for tearing.
//!
//! A block is `[front][stamp: clocks x u32, two to a word][values: keys_per_block x dim f32, padded][back]`,
//! every part a whole number of 8-byte words. Stamp entries are u32 to halve what a small read
//! fetches beside its values; the engine refuses clocks above [`STAMP_CLOCK_MAX`], so they are
//! exact. The shard changes a block only between two version bumps: it first sets `back` to the
//! next version, then writes the values and the stamp, then sets `front` to the same version. A
//! reader copies the block in increasing address order (one RDMA READ does), so it sees `front ==
//! back` only if no change overlapped its copy ([`block_is_whole`]).

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::error::{LayoutError, Result};

/// Largest clock a block's stamp holds.
pub const STAMP_CLOCK_MAX: u64 = u32::MAX as u64;

/// How a dense table part is laid out in its exposed memory, in 8-byte words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DenseLayout {
    /// First key of the part.
    pub start: u64,
    /// Keys in the part.
    pub keys: u64,
    /// f32 values per key.
    pub dim: u32,
    /// Keys per block (the last block may hold fewer).
    pub keys_per_block: u32,
    /// Clock entries in each block's stamp: the engine's `workers_max`.
    pub clocks: u32,
    /// Words per block: front, stamp (padded to whole words), values (padded), back.
    pub block_words: u32,
}

impl DenseLayout {
    /// The layout for `keys` keys of `dim` values from `start`, with about `block_bytes` of
    /// values per block (at least one key) and `clocks` clock entries per block.
    pub fn new(start: u64, keys: u64, dim: u32, block_bytes: usize, clocks: u32) -> Self {
        let keys_per_block = (block_bytes / (4 * dim as usize).max(1)).max(1) as u32;
        let value_words = (keys_per_block as usize * dim as usize).div_ceil(2) as u32;
        Self { start, keys, dim, keys_per_block, clocks, block_words: 2 + clocks.div_ceil(2) + value_words }
    }

    /// Words a block's stamp takes.
    pub fn stamp_words(&self) -> usize {
        self.clocks.div_ceil(2) as usize
    }

    /// Writes `clocks` (one per worker, at most [`STAMP_CLOCK_MAX`] each) into a block's stamp
    /// words, two to a word, low half first; a missing entry is 0.
    pub fn put_stamp(clocks: &[u64], words: &mut [u64]) {
        let entry = |i: usize| clocks.get(i).map_or(0, |c| (*c).min(STAMP_CLOCK_MAX));
        for (i, w) in words.iter_mut().enumerate() {
            *w = entry(2 * i) | entry(2 * i + 1) << 32;
        }
    }

    /// Lowers each of `into` to the stamp of `block` (a whole block, front to back): `into`
    /// becomes the element-wise minimum of itself and the block's clocks.
    pub fn meet_stamp(&self, block: &[u64], into: &mut [u64]) {
        let words = &block[1..1 + self.stamp_words()];
        for (i, c) in into.iter_mut().take(self.clocks as usize).enumerate() {
            let half = (words[i / 2] >> (32 * (i % 2))) & STAMP_CLOCK_MAX;
            *c = (*c).min(half);
        }
    }

    /// Blocks in the part.
    pub fn blocks(&self) -> u64 {
        self.keys.div_ceil(self.keys_per_block as u64)
    }

    /// Whether the part holds `key`.
    pub fn holds(&self, key: u64) -> bool {
        key >= self.start && key - self.start < self.keys
    }

    /// Words the whole part takes.
    pub fn words(&self) -> u64 {
        self.blocks() * self.block_words as u64
    }

    /// The block holding key offset `k` (from `start`).
    pub fn block_of(&self, k: u64) -> u64 {
        k / self.keys_per_block as u64
    }

    /// Key offsets (from `start`) that block `b` holds.
    pub fn keys_of(&self, b: u64) -> std::ops::Range<u64> {
        let lo = b * self.keys_per_block as u64;
        lo..(lo + self.keys_per_block as u64).min(self.keys)
    }

    /// Word index of block `b`'s front version; its back version is `block_words - 1` later.
    pub fn block_at(&self, b: u64) -> usize {
        (b * self.block_words as u64) as usize
    }

    /// Word offset, inside a block, of its first value.
    pub fn values_at(&self) -> usize {
        1 + self.stamp_words()
    }

    /// Checks a layout that came from a peer against itself; the reader relies on it for bounds.
    pub fn check(&self) -> Result<()> {
        let bad = |reason: &str| Err(LayoutError::BadDenseLayout { layout: format!("{self:?}"), reason: reason.into() });
        if self.dim == 0 || self.keys_per_block == 0 || self.keys == 0 {
            return bad("zero dim, keys or keys per block");
        }
        let value_words = (self.keys_per_block as u64 * self.dim as u64).div_ceil(2);
        if self.block_words as u64 != 2 + self.stamp_words() as u64 + value_words {
            return bad("block size does not match its parts");
        }
        if self.keys.checked_mul(self.dim as u64).is_none() || self.words().checked_mul(8).is_none() {
            return bad("too large");
        }
        Ok(())
    }
}

/// True when a reader's copy of a block (its words, front to back) is whole: no change of the
/// shard overlapped the copy.
pub fn block_is_whole(block: &[u64]) -> bool {
    match (block.first(), block.last()) {
        (Some(front), Some(back)) => front == back,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_blocks_by_bytes_and_pads_values() {
        let l = DenseLayout::new(100, 1000, 3, 512, 16);
        assert_eq!(l.keys_per_block, 42);
        assert_eq!(l.block_words, 2 + 8 + 63);
        assert_eq!(l.blocks(), 24);
        assert_eq!(l.keys_of(23), 966..1000);
        assert_eq!(l.block_of(41), 0);
        assert_eq!(l.block_of(42), 1);
        l.check().unwrap();
        // A key wider than a block gets a block of its own.
        let wide = DenseLayout::new(0, 4, 1000, 512, 4);
        assert_eq!(wide.keys_per_block, 1);
        assert_eq!(wide.block_words, 2 + 2 + 500);
        // An odd clock count rounds the stamp up to a whole word.
        assert_eq!(DenseLayout::new(0, 4, 2, 16, 3).block_words, 2 + 2 + 2);
    }

    #[test]
    fn stamps_pack_two_clocks_a_word_and_meet() {
        let l = DenseLayout::new(0, 4, 2, 16, 3);
        let mut block = vec![0u64; l.block_words as usize];
        DenseLayout::put_stamp(&[5, STAMP_CLOCK_MAX, 7], &mut block[1..1 + l.stamp_words()]);
        assert_eq!(block[1], 5 | STAMP_CLOCK_MAX << 32);
        assert_eq!(block[2], 7);
        let mut into = [u64::MAX, 9, 3];
        l.meet_stamp(&block, &mut into);
        assert_eq!(into, [5, 9, 3]);
        // Larger clocks saturate (a lower bound still); missing entries are 0.
        DenseLayout::put_stamp(&[STAMP_CLOCK_MAX + 1], &mut block[1..3]);
        assert_eq!((block[1], block[2]), (STAMP_CLOCK_MAX, 0));
    }

    #[test]
    fn check_refuses_inconsistent_layouts() {
        let mut l = DenseLayout::new(0, 10, 2, 64, 4);
        l.block_words += 1;
        assert!(l.check().is_err());
        let mut l = DenseLayout::new(0, 10, 2, 64, 4);
        l.dim = 0;
        assert!(l.check().is_err());
        let mut l = DenseLayout::new(0, u64::MAX, 2, 64, 4);
        l.keys = u64::MAX;
        assert!(l.check().is_err());
    }

    #[test]
    fn a_block_is_whole_when_its_versions_match() {
        assert!(block_is_whole(&[7, 1, 2, 7]));
        assert!(!block_is_whole(&[7, 1, 2, 8]));
        assert!(!block_is_whole(&[]));
    }
}
