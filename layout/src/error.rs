//! The layout crate's one error enum.

/// Why a table definition, a set of catalogs, or a dense layout cannot be used.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum LayoutError {
    #[error("unknown table {name:?}")]
    UnknownTable { name: String },
    #[error("bad table {name:?}: {reason}")]
    BadSpec { name: String, reason: String },
    #[error("dense layout {layout}: {reason}")]
    BadDenseLayout { layout: String, reason: String },
}

/// Short alias used across the crate.
pub type Result<T, E = LayoutError> = std::result::Result<T, E>;
