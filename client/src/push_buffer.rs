//! Gradient buffers a trainer computes into and pushes every step.

/// `len` gradient values for [`Client::push_range_from`](crate::Client::push_range_from).
///
/// Plain memory. The client keeps every push until its range's tail acknowledges it, to send it
/// again after a failover, so it copies the values when the push is made: the buffer may be
/// filled again as soon as the call returns, before the ticket is waited on. (Over RDMA a push
/// is not sent from the buffer itself, as a link without resends could: the kept copy is what
/// goes on the wire.)
#[derive(Debug, Clone, Default)]
pub struct PushBuffer {
    values: Vec<f32>,
}

impl PushBuffer {
    /// `len` zeroed values.
    pub fn new(len: usize) -> PushBuffer {
        PushBuffer { values: vec![0.0; len] }
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.values
    }
}
