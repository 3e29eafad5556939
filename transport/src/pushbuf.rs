//! Gradient buffers a link can send from without copying.
//!
//! A [`PushBuffer`] made for an RDMA client lives in memory registered with the client's device
//! (its default protection domain, where the client's queue pairs are). A link sending a large
//! body from one ([`OneSided::send_from`](crate::OneSided::send_from)) has the device gather the body
//! straight from the buffer behind the frame's header, instead of copying it into the link's
//! staging first; the caller keeps the bytes unchanged until [`OneSided::settle`](crate::OneSided::settle)
//! returns. For a TCP client, or a machine without RDMA, it is plain memory and is copied as any
//! other slice is.
//!
//! Registration happens once, when the buffer is made, never per message: a trainer makes one
//! buffer per dense range it pushes, computes its gradients into it, and pushes it every step.

use crate::error::Result;
use crate::select::Chosen;

/// `len` f32 values, registered for sending where the client speaks RDMA.
#[derive(Debug)]
pub struct PushBuffer {
    len: usize,
    mem: Mem,
}

#[derive(Debug)]
enum Mem {
    Heap(Vec<f32>),
    #[cfg(feature = "rdma")]
    Registered {
        region: crate::rdma::verbs::Region,
        dev: std::sync::Arc<crate::rdma::verbs::Device>,
    },
}

impl PushBuffer {
    /// `len` zeroed values: registered with the device when `chosen` is RDMA (failing, as any
    /// registration does, with a message naming RLIMIT_MEMLOCK when locked memory runs out),
    /// plain memory otherwise.
    pub fn new(len: usize, chosen: &Chosen) -> Result<PushBuffer> {
        let mem = match chosen {
            #[cfg(feature = "rdma")]
            Chosen::Rdma(dev) if len > 0 => {
                let access = crate::rdma::verbs::Access { remote_write: false, remote_read: false };
                let region = crate::rdma::verbs::Region::new(dev, len * 4, access).map_err(crate::rdma::rdma)?;
                Mem::Registered { region, dev: dev.clone() }
            }
            _ => Mem::Heap(vec![0.0; len]),
        };
        Ok(PushBuffer { len, mem })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// True when the buffer is registered memory an RDMA link can send from without copying.
    pub fn is_registered(&self) -> bool {
        !matches!(self.mem, Mem::Heap(_))
    }

    pub fn as_slice(&self) -> &[f32] {
        match &self.mem {
            Mem::Heap(v) => v,
            #[cfg(feature = "rdma")]
            Mem::Registered { region, .. } => bytemuck::cast_slice(&region.as_slice()[..self.len * 4]),
        }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        match &mut self.mem {
            Mem::Heap(v) => v,
            #[cfg(feature = "rdma")]
            Mem::Registered { region, .. } => bytemuck::cast_slice_mut(&mut region.as_mut_slice()[..self.len * 4]),
        }
    }

    /// The region holding the buffer, if it was registered with `dev`.
    #[cfg(feature = "rdma")]
    pub(crate) fn region_on(&self, dev: &std::sync::Arc<crate::rdma::verbs::Device>) -> Option<&crate::rdma::verbs::Region> {
        match &self.mem {
            Mem::Registered { region, dev: mine } if std::sync::Arc::ptr_eq(mine, dev) => Some(region),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tcp_buffer_is_plain_zeroed_memory() {
        let mut b = PushBuffer::new(5, &Chosen::Tcp).unwrap();
        assert_eq!((b.len(), b.is_empty(), b.is_registered()), (5, false, false));
        assert_eq!(b.as_slice(), &[0.0; 5]);
        b.as_mut_slice()[4] = 2.5;
        assert_eq!(b.as_slice()[4], 2.5);
        assert!(PushBuffer::new(0, &Chosen::Tcp).unwrap().is_empty());
    }
}
