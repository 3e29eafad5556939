//! Key-list caching (Li et al., OSDI'14, section 5.1 "Caching key lists"): a worker that pushes
//! or pulls the same key list again sends its hash instead of the keys.
//!
//! Both ends of a connection keep a [`KeyLists`] of the same capacity, updated by the same rules
//! in the same (request) order, so the worker knows what the shard holds:
//! - a request flagged [`flags::KEYS_REMEMBER`](crate::wire::flags::KEYS_REMEMBER) carries its
//!   keys as usual, and both ends remember them under [`key_list_hash`];
//! - a request flagged [`flags::KEYS_CACHED`](crate::wire::flags::KEYS_CACHED) carries no keys:
//!   `header.start` is the list's hash and `header.count` its length, and both ends mark the
//!   list as just used;
//! - a list that does not fit is evicted least recently used first, by total keys held.
//!
//! When the shard's capacity is smaller than the worker's (or it lost the list some other way),
//! it answers [`Status::KeysUnknown`](crate::Status::KeysUnknown) and applies nothing; the worker
//! sends the request again with its keys.

/// Keys of remembered lists a shard keeps per connection unless configured otherwise
/// (`--key-cache-keys`; 8 bytes a key), and as many as a worker may assume it keeps.
pub const KEY_CACHE_KEYS_DEFAULT: usize = 1 << 20;

/// A 64-bit hash of a key list (splitmix64's finaliser over each key, chained). Both ends
/// compute it the same way; the shard never trusts a hash it did not compute.
pub fn key_list_hash(keys: &[u64]) -> u64 {
    hash_keys(keys.len(), keys.iter().copied())
}

/// [`key_list_hash`] of keys as a frame carries them: little-endian, 8 bytes each (no copy
/// into aligned keys first).
pub fn key_list_hash_le(bytes: &[u8]) -> u64 {
    hash_keys(bytes.len() / 8, bytes.chunks_exact(8).map(|k| u64::from_le_bytes(k.try_into().expect("8 bytes"))))
}

fn hash_keys(len: usize, keys: impl Iterator<Item = u64>) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64 ^ len as u64;
    for k in keys {
        let mut x = h ^ k;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = x ^ (x >> 31);
    }
    h
}

/// Key lists by hash, least recently used first, holding at most `keys_max` keys in all. `V`
/// is what an end keeps per list: the keys themselves on the shard (in storage reused from the
/// lists it evicts), nothing on the worker.
#[derive(Debug)]
pub struct KeyLists<V> {
    /// (hash, length, value), least recently used first. Short: a linear scan beats a map.
    entries: Vec<(u64, u32, V)>,
    keys: usize,
    keys_max: usize,
}

impl<V> KeyLists<V> {
    pub fn new(keys_max: usize) -> Self {
        Self { entries: Vec::new(), keys: 0, keys_max }
    }

    /// Whether a list of `len` keys can be remembered at all.
    pub fn fits(&self, len: usize) -> bool {
        len > 0 && len <= self.keys_max
    }

    /// The list with this hash and length, marked as just used; `None` if not held.
    pub fn touch(&mut self, hash: u64, len: u32) -> Option<&mut V> {
        let at = self.entries.iter().rposition(|e| e.0 == hash && e.1 == len)?;
        let entry = self.entries.remove(at);
        self.entries.push(entry);
        self.entries.last_mut().map(|e| &mut e.2)
    }

    /// Remembers a list (as just used), evicting the least recently used until it fits. Returns
    /// `false`, holding nothing new, if it can never fit. A list already held is only touched.
    pub fn insert(&mut self, hash: u64, len: u32, value: V) -> bool {
        self.insert_with(hash, len, |_| value)
    }

    /// [`KeyLists::insert`], with the value made by `make` from the last value evicted to make
    /// room (if any), so that its storage can be reused.
    pub fn insert_with(&mut self, hash: u64, len: u32, make: impl FnOnce(Option<V>) -> V) -> bool {
        if !self.fits(len as usize) {
            return false;
        }
        if self.touch(hash, len).is_some() {
            return true;
        }
        let mut evicted = None;
        while self.keys + len as usize > self.keys_max {
            let (_, gone, value) = self.entries.remove(0);
            self.keys -= gone as usize;
            evicted = Some(value);
        }
        self.keys += len as usize;
        self.entries.push((hash, len, make(evicted)));
        true
    }

    /// Lists held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Keys held over all lists.
    pub fn keys(&self) -> usize {
        self.keys
    }
}

/// What a worker sends for a key list, by [`KeyLists::remember`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remembered {
    /// The shard holds the list: send this hash (`KEYS_CACHED`) instead of the keys.
    Held(u64),
    /// The shard does not hold it: send the keys and have it remember them (`KEYS_REMEMBER`).
    New,
}

impl KeyLists<()> {
    /// A worker's side of one request with `keys`: whether the shard holds the list (then
    /// marked as just used, as the shard will), or is to remember it now (then remembered
    /// here too); `None` when the list cannot be cached at all (empty, or longer than the
    /// lists may hold).
    pub fn remember(&mut self, keys: &[u64]) -> Option<Remembered> {
        self.remember_hashed(keys.len(), || key_list_hash(keys))
    }

    /// [`remember`](Self::remember) for keys as a frame carries them (little-endian bytes).
    pub fn remember_le(&mut self, bytes: &[u8]) -> Option<Remembered> {
        self.remember_hashed(bytes.len() / 8, || key_list_hash_le(bytes))
    }

    /// The list of `len` keys whose hash `hash` computes (only if it can be cached at all).
    fn remember_hashed(&mut self, len: usize, hash: impl FnOnce() -> u64) -> Option<Remembered> {
        if !self.fits(len) {
            return None;
        }
        let hash = hash();
        if self.touch(hash, len as u32).is_some() {
            return Some(Remembered::Held(hash));
        }
        self.insert(hash, len as u32, ());
        Some(Remembered::New)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_are_evicted_least_recently_used_first_by_keys_held() {
        let mut lists = KeyLists::new(10);
        assert!(lists.insert(1, 4, ()));
        assert!(lists.insert(2, 4, ()));
        assert!(lists.touch(1, 4).is_some(), "1 is now the most recently used");
        assert!(lists.insert(3, 4, ()), "evicts 2, the least recently used");
        assert!(lists.touch(2, 4).is_none());
        assert!(lists.touch(1, 4).is_some() && lists.touch(3, 4).is_some());
        assert_eq!(lists.keys(), 8);
        assert!(!lists.insert(4, 11, ()), "larger than the whole cache");
        assert!(!lists.insert(5, 0, ()), "empty lists are never cached");
        assert!(lists.touch(1, 5).is_none(), "the length must match too");
        assert!(lists.insert(6, 10, ()));
        assert_eq!((lists.len(), lists.keys()), (1, 10));
    }

    #[test]
    fn a_worker_sends_a_list_in_full_once_then_by_its_hash() {
        let mut lists = KeyLists::new(4);
        assert_eq!(lists.remember(&[1, 2, 3]), Some(Remembered::New));
        assert_eq!(lists.remember(&[1, 2, 3]), Some(Remembered::Held(key_list_hash(&[1, 2, 3]))));
        assert_eq!(lists.remember(&[4, 5]), Some(Remembered::New), "evicts the first list");
        assert_eq!(lists.remember(&[1, 2, 3]), Some(Remembered::New));
        assert_eq!(lists.remember(&[1, 2, 3, 4, 5]), None, "longer than the lists hold");
        assert_eq!(lists.remember(&[]), None);
        let le: Vec<u8> = [4u64, 5].iter().flat_map(|k| k.to_le_bytes()).collect();
        assert_eq!(key_list_hash_le(&le), key_list_hash(&[4, 5]));
        assert_eq!(lists.remember_le(&le), Some(Remembered::New), "evicted by the list after it");
        assert_eq!(lists.remember(&[4, 5]), Some(Remembered::Held(key_list_hash(&[4, 5]))), "bytes and keys name one list");
    }

    #[test]
    fn the_hash_depends_on_order_length_and_every_key() {
        let a = key_list_hash(&[1, 2, 3]);
        assert_ne!(a, key_list_hash(&[3, 2, 1]));
        assert_ne!(a, key_list_hash(&[1, 2, 3, 0]));
        assert_ne!(a, key_list_hash(&[1, 2, 4]));
        assert_ne!(key_list_hash(&[]), key_list_hash(&[0]));
        assert_eq!(a, key_list_hash(&[1, 2, 3]));
    }
}
