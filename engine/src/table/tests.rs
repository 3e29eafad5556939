//! Tests of table parts: written next.
