//! Helpers for the process-level tests.
