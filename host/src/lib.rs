//! The `kythira` binary's reusable parts.

pub mod local;
