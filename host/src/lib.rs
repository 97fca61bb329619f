//! The Kythira daemon.
