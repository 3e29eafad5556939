//! Which transport carries a server's or a client's traffic: TCP, RDMA, or RDMA where a device
//! exists. Everything above this module gets a [`ShardTransport`] or a [`Link`] and never asks
//! which one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::config::{RdmaConfig, TransportConfig};
use crate::error::{Result, TransportError};
use crate::tcp::{self, TcpEndpoint, TcpLink};
use crate::{Link, ShardTransport};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportKind {
    Tcp,
    Rdma,
    /// RDMA when this build has it and a device is there, TCP otherwise (said in one line).
    #[default]
    Auto,
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "rdma" => Ok(Self::Rdma),
            "auto" => Ok(Self::Auto),
            other => Err(format!("unknown transport {other:?}: use tcp, rdma or auto")),
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Rdma => "rdma",
            Self::Auto => "auto",
        })
    }
}

/// What was decided: TCP, or RDMA on an opened device.
#[derive(Debug, Clone)]
pub enum Chosen {
    Tcp,
    #[cfg(feature = "rdma")]
    Rdma(Arc<crate::rdma::verbs::Device>),
}

impl Chosen {
    /// `"tcp"` or `"rdma"`, as servers advertise it.
    pub fn name(&self) -> &'static str {
        match self {
            Chosen::Tcp => "tcp",
            #[cfg(feature = "rdma")]
            Chosen::Rdma(_) => "rdma",
        }
    }
}

static FELL_BACK: AtomicBool = AtomicBool::new(false);

/// Decides. `Rdma` without a device is an error; `Auto` without one falls back to TCP and says so
/// once per process.
pub fn choose(kind: TransportKind, rdma: &RdmaConfig) -> Result<Chosen> {
    rdma.validate()?;
    match (kind, open(rdma)) {
        (TransportKind::Tcp, _) => Ok(Chosen::Tcp),
        (_, Ok(chosen)) => Ok(chosen),
        (TransportKind::Rdma, Err(reason)) => Err(TransportError::RdmaUnavailable { reason }),
        (TransportKind::Auto, Err(reason)) => {
            if cfg!(feature = "rdma") && !FELL_BACK.swap(true, Ordering::Relaxed) {
                eprintln!("tessera: no RDMA device ({reason}); using TCP");
            }
            Ok(Chosen::Tcp)
        }
    }
}

#[cfg(feature = "rdma")]
fn open(rdma: &RdmaConfig) -> std::result::Result<Chosen, String> {
    let cfg = rdma.device_config().map_err(|e| e.to_string())?;
    crate::rdma::verbs::Device::open(&cfg).map(Chosen::Rdma).map_err(|e| e.to_string())
}

#[cfg(not(feature = "rdma"))]
fn open(_: &RdmaConfig) -> std::result::Result<Chosen, String> {
    Err("this build has no RDMA support (build with --features rdma)".into())
}

/// A bound server's transports.
#[derive(Debug)]
pub struct BoundServer {
    /// The control plane's endpoint, which owns the listener.
    pub control: TcpEndpoint,
    /// One transport per shard, for the shard's own thread.
    pub shards: Vec<Box<dyn ShardTransport>>,
    pub addr: SocketAddr,
}

/// Binds a server: the control endpoint, and one transport per shard.
pub fn bind_server(addr: &str, shards: u16, cfg: &TransportConfig, info: Arc<[u8]>, chosen: &Chosen, rdma: &RdmaConfig) -> Result<BoundServer> {
    let (control, endpoints, local) = tcp::bind(addr, shards, cfg, info)?;
    let shards = endpoints
        .into_iter()
        .map(|ep| -> Result<Box<dyn ShardTransport>> {
            match chosen {
                Chosen::Tcp => Ok(Box::new(ep)),
                #[cfg(feature = "rdma")]
                Chosen::Rdma(dev) => Ok(Box::new(crate::rdma::RdmaShard::new(ep, dev.clone(), rdma, cfg)?)),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let _ = rdma;
    Ok(BoundServer { control, shards, addr: local })
}

/// Connects a client link to one shard over the chosen transport; `server_rdma` says whether the
/// server serves RDMA (from its hello).
pub fn connect_link(
    addr: &str,
    shard: u64,
    worker: u32,
    cfg: &TransportConfig,
    chosen: &Chosen,
    server_rdma: bool,
    rdma: &RdmaConfig,
) -> Result<(Box<dyn Link>, Vec<u8>)> {
    match chosen {
        #[cfg(feature = "rdma")]
        Chosen::Rdma(dev) if server_rdma => {
            let (link, info) = crate::rdma::RdmaLink::connect(addr, shard, worker, cfg, rdma, dev.clone())?;
            Ok((Box::new(link), info))
        }
        _ => {
            let _ = (server_rdma, rdma);
            let (link, info) = TcpLink::connect(addr, shard, worker, cfg)?;
            Ok((Box::new(link), info))
        }
    }
}
