//! The cluster's coordinator, apart from any server: it places every replication range on a
//! chain of servers (the [`Coordinator`](tessera_replication::coordinator::Coordinator) state
//! machine of the replication crate), hears their heartbeats, and publishes each new
//! configuration. [`service`] runs it behind a TCP endpoint; where the configuration is kept is a
//! [`ConfigStore`]: this process's memory ([`Embedded`]), a file ([`FileStore`]: the embedded
//! coordinator that survives its own restart), or etcd ([`etcd`], feature `etcd`), where
//! coordinators hold an election. Servers find it through its address or through etcd.

mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod file_store;
pub mod service;

pub use error::{CoordinatorError, Result};
pub use file_store::FileStore;
pub use service::{new_cluster_name, ClusterStatus, ConfigStore, CoordinatorHandle, Embedded, Lead};
