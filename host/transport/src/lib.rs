//! Kythira's network layer: QUIC (quinn) with mutual TLS 1.3 (rustls, ring).
//!
//! - [`pki`]: the cluster CA and the identities bound into certificates.
//! - [`tls`]: loading certificate files; quinn server and client configs.
//! - [`frame`]: length-prefixed, versioned frames with a maximum size.
//! - [`wire`]: the binary encoding of Raft messages.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod frame;
pub mod pki;
pub mod tls;
pub mod wire;
