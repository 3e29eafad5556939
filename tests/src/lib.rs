//! Helpers for the process-level tests: find the `tessera` binary and run servers from it.
