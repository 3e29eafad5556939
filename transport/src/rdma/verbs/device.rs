//! The device, its port, and protection domains.

use std::error::Error as StdError;
use std::sync::Arc;

use sideway::ibverbs::device::{DeviceInfo, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu, PortState};
use sideway::ibverbs::protection_domain::ProtectionDomain;

use super::*;

/// Which device, port and GID to use. Port numbers start at 1.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Device name (`rxe0`, `mlx5_0`); `None` takes the first device. Default: env `RDMA_DEV`.
    pub device: Option<String>,
    /// GID table index; on RoCE it picks the address and RoCE version (`ibv_devinfo -v` lists the
    /// table; rxe puts the RoCEv2 GID of the IPv4 address at 1). Default: env `RDMA_GID_INDEX`, else 1.
    pub gid_index: u8,
    pub port: u8,
    /// Largest memory region to register; larger regions are split into several. `None`: the
    /// device's `max_mr_size`. Rounded down to a multiple of [`PAGE_BYTES`].
    pub mr_bytes_max: Option<u64>,
}

impl DeviceConfig {
    /// The defaults, with `RDMA_DEV` and `RDMA_GID_INDEX` from the environment. A malformed
    /// `RDMA_GID_INDEX` is `Unavailable`, so the caller prints it and falls back to TCP.
    pub fn from_env() -> Result<Self, Unavailable> {
        let device = std::env::var("RDMA_DEV").ok().filter(|name| !name.is_empty());
        let gid_index = gid_index_from(std::env::var("RDMA_GID_INDEX").ok().as_deref())?;
        Ok(Self { device, gid_index, port: 1, mr_bytes_max: None })
    }
}

/// The GID index `RDMA_GID_INDEX` names (`None`: unset, so 1), or why it names none: an operator's
/// typo is a one-line error that falls back to TCP, never a panic.
pub(super) fn gid_index_from(text: Option<&str>) -> Result<u8, Unavailable> {
    match text {
        None => Ok(1),
        Some(text) => text.trim().parse().map_err(|_| {
            Unavailable::new(format!(
                "RDMA_GID_INDEX={text:?} is not a GID index (0 to 255); set it to the index of the port's RoCEv2 GID (`ibv_devinfo -v` lists them)"
            ))
        }),
    }
}

/// An opened device with its default protection domain, in which [`Region::new`] and
/// [`Qp::new`] create what they make. Send + Sync, shared via Arc.
#[derive(Debug)]
pub struct Device {
    // Dropped in field order: the PD before the context (sideway's Arcs enforce it as well).
    pub(super) pd: Pd,
    pub(super) context: Arc<DeviceContext>,
    name: String,
    port: PortParams,
    pub(super) cqe_max: u32,
}

/// What every queue pair and region takes from the device and its port, whichever protection
/// domain it is in.
#[derive(Debug, Clone, Copy)]
pub(super) struct PortParams {
    pub(super) port: u8,
    pub(super) gid_index: u8,
    pub(super) gid: [u8; 16],
    pub(super) mtu: Mtu,
    /// Effective, a multiple of PAGE_BYTES.
    pub(super) mr_bytes_max: u64,
    pub(super) qp_wr_max: u32,
    /// Reads this side may have outstanding (initiator) and may serve at once (responder).
    pub(super) read_depth: u8,
    pub(super) dest_read_depth: u8,
}

/// A protection domain: memory regions and queue pairs created in it ([`Region::new_in`],
/// [`Qp::new_in`]) are usable only together. A queue pair accepts a remote key only of a region
/// in its own domain (anything else completes with a remote access error at the writer), and
/// posts local buffers only of regions in its own domain (a local error completion). So a peer
/// given a queue pair and a region in a domain of their own can reach nothing else, whatever
/// keys it learns or guesses.
///
/// Send + Sync. Regions and queue pairs keep the domain's verbs object alive (sideway holds it
/// by Arc), so dropping a `Pd` before them is safe; dropping it after them frees it at once.
#[derive(Debug)]
pub struct Pd {
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) port: PortParams,
}

impl Device {
    /// Opens the device. Every "no RDMA here" case (ENOSYS/EOPNOTSUPP from the device list, empty
    /// list, named device missing, open failure, port down, empty GID entry) is `Err(Unavailable)`.
    pub fn open(cfg: &DeviceConfig) -> Result<Arc<Device>, Unavailable> {
        let list = DeviceList::new().map_err(|err| Unavailable::new(format!("RDMA device list unavailable: {}", report(&err))))?;
        let names: Vec<String> = list.iter().map(|device| device.name()).collect();
        let index = match &cfg.device {
            _ if names.is_empty() => return Err(Unavailable::new("no RDMA devices present")),
            None => 0,
            Some(wanted) => names
                .iter()
                .position(|name| name == wanted)
                .ok_or_else(|| Unavailable::new(format!("RDMA device {wanted:?} not found (present: {names:?})")))?,
        };
        let name = names[index].clone();
        let device = list.get(index).expect("index came from the same list");
        // The context does not borrow the list: opened contexts outlive ibv_free_device_list.
        let context = device.open().map_err(|err| Unavailable::new(format!("opening RDMA device {name:?} failed: {}", report(&err))))?;
        drop(list);
        Self::query(context, name, cfg).map(Arc::new)
    }

    fn query(context: Arc<DeviceContext>, name: String, cfg: &DeviceConfig) -> Result<Device, Unavailable> {
        let failed = |what: &str, err: &dyn StdError| Unavailable::new(format!("RDMA device {name:?}: {what} failed: {}", report(err)));
        let attr = context.query_device().map_err(|err| failed("query device", &err))?;
        let port = context.query_port(cfg.port).map_err(|err| failed("query port", &err))?;
        if port.port_state() != PortState::Active {
            return Err(Unavailable::new(format!(
                "RDMA device {name:?} port {} is {:?}, not Active (is its network link up? `rdma link show`)",
                cfg.port,
                port.port_state()
            )));
        }
        let gid = context
            .query_gid(cfg.port, cfg.gid_index.into())
            .map_err(|err| failed("query GID (is RDMA_GID_INDEX right? `ibv_devinfo -v` lists the table)", &err))?;
        if gid.is_zero() {
            return Err(Unavailable::new(format!(
                "RDMA device {name:?} port {} has no GID at index {} (`ibv_devinfo -v` lists the table; set RDMA_GID_INDEX)",
                cfg.port, cfg.gid_index
            )));
        }
        let mr_bytes_max = effective_mr_bytes_max(attr.max_mr_size(), cfg.mr_bytes_max)
            .ok_or_else(|| Unavailable::new(format!("mr_bytes_max {:?} is below one page ({PAGE_BYTES} bytes)", cfg.mr_bytes_max)))?;
        let clamp_depth = |limit: i32| limit.clamp(1, i32::from(READ_DEPTH_MAX)) as u8;
        let params = PortParams {
            port: cfg.port,
            gid_index: cfg.gid_index,
            gid: gid.raw,
            mtu: port.active_mtu(),
            mr_bytes_max,
            qp_wr_max: attr.max_qp_wr().max(1) as u32,
            read_depth: clamp_depth(attr.max_qp_init_rd_atom()),
            dest_read_depth: clamp_depth(attr.max_qp_rd_atom()),
        };
        let pd = context.alloc_pd().map_err(|err| failed("allocate protection domain", &err))?;
        Ok(Device { pd: Pd { pd, port: params }, context, name, port: params, cqe_max: attr.max_cqe().max(1) as u32 })
    }

    /// A new protection domain of its own, for regions and queue pairs that must be usable only
    /// with each other (one per peer that must reach nothing else).
    pub fn alloc_pd(&self) -> Result<Pd, VerbsError> {
        let pd = self.context.alloc_pd().map_err(VerbsError::AllocPd)?;
        Ok(Pd { pd, port: self.port })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The GID at the configured index: this side's address on the fabric.
    pub fn gid(&self) -> [u8; 16] {
        self.port.gid
    }

    /// The port's active MTU, used as every queue pair's path MTU.
    pub fn mtu_bytes(&self) -> usize {
        match self.port.mtu {
            Mtu::Mtu256 => 256,
            Mtu::Mtu512 => 512,
            Mtu::Mtu1024 => 1024,
            Mtu::Mtu2048 => 2048,
            Mtu::Mtu4096 => 4096,
        }
    }

    /// The largest memory region registered in one piece: min(device, `mr_bytes_max`), rounded
    /// down to a multiple of [`PAGE_BYTES`].
    pub fn max_mr_size(&self) -> u64 {
        self.port.mr_bytes_max
    }
}

/// min(device limit, configured limit) rounded down to whole pages; None if below one page.
pub(super) fn effective_mr_bytes_max(device_bytes: u64, configured: Option<u64>) -> Option<u64> {
    let bytes = device_bytes.min(configured.unwrap_or(u64::MAX));
    let bytes = bytes - bytes % PAGE_BYTES as u64;
    (bytes > 0).then_some(bytes)
}
