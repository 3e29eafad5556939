//! The embedded coordinator's configuration on disk (`tessera coordinator --data-dir`): a
//! coordinator restarted after a crash, or after the whole cluster lost power, continues the
//! cluster it coordinated instead of waiting to make a new one.
//!
//! The file (`cluster.json` in the directory) holds the newest configuration stored. Each
//! configuration is written to a temporary name, fsynced, renamed over the file, and the
//! directory fsynced, before it is handed out to anyone: a server never acts on a
//! configuration the coordinator could forget.

use std::io::Write;
use std::path::{Path, PathBuf};

use tessera_replication::protocol::ClusterView;

use crate::error::{CoordinatorError, Result};
use crate::service::{ConfigStore, Lead};

/// The configuration file in a coordinator's data directory.
pub const CLUSTER_FILE: &str = "cluster.json";

/// The embedded coordinator, keeping its configuration in a directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

impl FileStore {
    /// Keeps the configuration in `dir`, made if missing.
    pub fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| CoordinatorError::Io(format!("cannot make the data directory {}: {e}", dir.display())))?;
        Ok(Self { dir: dir.to_path_buf() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join(CLUSTER_FILE)
    }

    /// The stored configuration, if any.
    pub fn read(&self) -> Result<Option<ClusterView>> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| CoordinatorError::Corrupt { what: path.display().to_string(), reason: e.to_string() })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CoordinatorError::Io(format!("cannot read {}: {e}", path.display()))),
        }
    }
}

impl ConfigStore for FileStore {
    fn lead(&mut self, _addr: &str) -> Result<Lead> {
        Ok(Lead::Leading(self.read()?))
    }

    fn store(&mut self, view: &ClusterView) -> Result<()> {
        let (path, tmp) = (self.path(), self.dir.join(format!("{CLUSTER_FILE}.tmp")));
        let io = |what: &str, e: std::io::Error| CoordinatorError::Io(format!("cannot {what} {}: {e}", tmp.display()));
        let bytes = serde_json::to_vec_pretty(view).expect("a configuration is plain data");
        let mut file = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
        file.write_all(&bytes).map_err(|e| io("write", e))?;
        file.sync_all().map_err(|e| io("sync", e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io("rename", e))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| CoordinatorError::Io(format!("cannot sync {}: {e}", self.dir.display())))
    }

    fn describe(&self) -> String {
        format!("in {} (embedded, on disk)", self.path().display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_replication::ReplicationConfig;

    #[test]
    fn a_stored_configuration_is_read_back_and_a_torn_temporary_changes_nothing() {
        let dir = std::env::temp_dir().join(format!("tessera-file-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut store = FileStore::new(&dir).unwrap();
        assert!(matches!(store.lead("a").unwrap(), Lead::Leading(None)));
        let view = ClusterView { replication: ReplicationConfig::default(), config: None };
        store.store(&view).unwrap();
        // A write cut short leaves only the temporary behind.
        std::fs::write(dir.join(format!("{CLUSTER_FILE}.tmp")), b"{\"repl").unwrap();
        let Lead::Leading(Some(read)) = FileStore::new(&dir).unwrap().lead("a").unwrap() else { panic!("nothing read back") };
        assert_eq!(read.replication, view.replication);
        std::fs::write(dir.join(CLUSTER_FILE), b"{\"repl").unwrap();
        assert!(matches!(store.lead("a"), Err(CoordinatorError::Corrupt { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
