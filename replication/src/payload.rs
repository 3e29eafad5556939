//! [`Payload`]: the bytes a message carries, shared without copying by the messages, logs and
//! frames that hold them.

use std::fmt;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// What a payload's bytes lie in: a vector of its own, or a buffer it shares with others (the
/// frame a transport read it in). Anything that is bytes is an owner.
pub trait Owner: Send + Sync + 'static {
    fn bytes(&self) -> &[u8];
}

impl<T: AsRef<[u8]> + Send + Sync + 'static> Owner for T {
    fn bytes(&self) -> &[u8] {
        self.as_ref()
    }
}

/// Bytes a message carries (a push's payload, an update's delta, a snapshot): a range of an
/// owner's bytes, shared by every clone. Cloning, and taking a view of a frame the transport
/// lends ([`Payload::view`]), allocate nothing; a pool refills a vector-owned payload once
/// nothing else holds it ([`Payload::vec_mut`]).
#[derive(Clone, Default)]
pub struct Payload {
    owner: Storage,
    /// Where the payload lies in its owner's bytes; `ALL` for all of them.
    range: Range<usize>,
}

/// A payload's owner. A vector, the common case (every payload a pool makes), is read with
/// no call through a vtable: a push's payload is looked at many times on its way.
#[derive(Clone, Default)]
enum Storage {
    /// The empty payload.
    #[default]
    Empty,
    Vec(Arc<Vec<u8>>),
    Other(Arc<dyn Owner>),
}

/// The range of a payload that is all of its owner's bytes, whatever their length.
const ALL: Range<usize> = 0..usize::MAX;

impl Payload {
    /// All of `owner`'s bytes.
    pub fn whole(owner: Arc<dyn Owner>) -> Self {
        Self { owner: Storage::Other(owner), range: ALL }
    }

    /// The part of this payload that `part` is, if `part` lies in it: a view, with no copy.
    pub fn view(&self, part: &[u8]) -> Option<Self> {
        let whole: &[u8] = self;
        let (start, at) = (whole.as_ptr() as usize, part.as_ptr() as usize);
        if part.is_empty() || at < start || at + part.len() > start + whole.len() {
            return None;
        }
        let from = (at - start) + if self.range == ALL { 0 } else { self.range.start };
        Some(Self { owner: self.owner.clone(), range: from..from + part.len() })
    }

    /// The vector this payload owns, to refill, when nothing else holds it; the payload is then
    /// all of it again once refilled.
    pub fn vec_mut(&mut self) -> Option<&mut Vec<u8>> {
        let Storage::Vec(vec) = &mut self.owner else { return None };
        let vec = Arc::get_mut(vec)?;
        self.range = ALL;
        Some(vec)
    }

    /// Whether a clone of this payload, or another view of its owner, is held elsewhere.
    pub fn is_shared(&self) -> bool {
        match &self.owner {
            Storage::Empty => false,
            Storage::Vec(vec) => Arc::strong_count(vec) > 1,
            Storage::Other(owner) => Arc::strong_count(owner) > 1,
        }
    }

    /// The capacity of the vector this payload owns (0 if it owns none).
    pub fn capacity(&self) -> usize {
        match &self.owner {
            Storage::Vec(vec) => vec.capacity(),
            Storage::Empty | Storage::Other(_) => 0,
        }
    }
}

impl Deref for Payload {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        let bytes: &[u8] = match &self.owner {
            Storage::Empty => return &[],
            Storage::Vec(vec) => vec,
            Storage::Other(owner) => owner.bytes(),
        };
        match self.range == ALL {
            true => bytes,
            false => &bytes[self.range.clone()],
        }
    }
}

impl From<Vec<u8>> for Payload {
    fn from(bytes: Vec<u8>) -> Self {
        Self { owner: Storage::Vec(Arc::new(bytes)), range: ALL }
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bytes: &[u8] = self;
        match bytes.len() {
            0..=16 => write!(f, "Payload({bytes:?})"),
            n => write!(f, "Payload({n} bytes, {:?}...)", &bytes[..16]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A view shares its owner and sees the part it was taken of; a part from elsewhere is no
    /// view; a vector is refilled only when nothing else holds it, and is then all of itself.
    #[test]
    fn views_share_their_owner_and_vectors_refill_when_free() {
        let mut whole = Payload::from((0u8..100).collect::<Vec<u8>>());
        let part = whole.view(&whole[10..20]).expect("a part of it");
        assert_eq!(&part[..], &(10u8..20).collect::<Vec<u8>>()[..]);
        assert_eq!(part.as_ptr(), whole[10..].as_ptr(), "a view, not a copy");
        let narrower = part.view(&part[2..4]).expect("a part of a part");
        assert_eq!(&narrower[..], &[12, 13]);
        assert!(part.view(&[1, 2, 3]).is_none() && part.view(&whole[5..15]).is_none() && part.view(&[]).is_none());
        assert!(whole.is_shared() && whole.vec_mut().is_none(), "held by its views");
        drop((part, narrower));
        assert_eq!(whole.capacity(), 100);
        let vec = whole.vec_mut().expect("held by nothing else");
        vec.clear();
        vec.extend_from_slice(&[7; 300]);
        assert_eq!(&whole[..], &[7; 300][..], "refilled, at another length");
        assert!(Payload::default().is_empty() && Payload::default().capacity() == 0);
        /// An owner that is no vector is never refilled.
        struct Frame([u8; 8]);
        impl AsRef<[u8]> for Frame {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        let mut frame = Payload::whole(Arc::new(Frame([1; 8])));
        assert!(frame.vec_mut().is_none());
        assert_eq!(frame.capacity(), 0);
        assert_eq!(frame, Payload::from(vec![1; 8]));
    }
}
