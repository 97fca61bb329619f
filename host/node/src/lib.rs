//! The Kythira node: the consensus core driven by real storage, a network and
//! the plugin runtime.
//!
//! Three threads of control, each owning what it touches:
//!
//! - the event loop ([`node`]) owns the core through its [`kythira_raft::Driver`]:
//!   it ticks, steps peer messages, proposes, and carries out each batch —
//!   messages to the network, the write to the store's writer thread, committed entries
//!   to the applier;
//! - the store's writer thread ([`disk`]) makes each write durable (fsync) before the
//!   loop may send what depends on it;
//! - the applier thread ([`applier`]) applies committed entries through the
//!   runtime, in batches, and answers waiting clients and reads.
//!
//! The log holds versioned envelopes ([`entry`]): commands for named
//! machines, deploys of their code, and session registrations, each with the
//! leader's timestamp. [`machines`] turns them into replicated state, and
//! [`sessions`] makes commands exactly-once.
//!
//! All three report to one [`metrics::Metrics`]; the event loop also logs
//! the core's state transitions, and [`health`] says whether the node is
//! fit to serve.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod addresses;
pub mod applier;
pub mod disk;
mod edge;
pub mod engines;
pub mod entry;
pub mod health;
pub mod image;
pub mod machines;
pub mod metrics;
pub mod node;
mod observer;
pub mod sessions;
mod shutdown;
pub mod snapshots;
pub mod ticks;

pub use health::HealthReport;
pub use metrics::Metrics;
pub use node::{Caller, Leadership, Network, Node, NodeConfig, NodeHandle};

/// Why a node cannot start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The storage failed; a node that cannot persist must not go on.
    #[error("storage: {0}")]
    Storage(#[from] kythira_storage::StorageError),
    /// The stored log cannot be read back.
    #[error("corrupt log: {0}")]
    Corrupt(String),
    /// The configuration is not valid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A thread could not be started.
    #[error("could not start a thread: {0}")]
    Thread(#[from] std::io::Error),
    /// A part of the node stopped, so the node stops.
    #[error("{0}")]
    Stopped(&'static str),
}

/// Fault injection for tests that run real processes: with
/// `KYTHIRA_CRASH_AT=<point>` in its environment, the process aborts when it
/// reaches `point`, as a power cut or a `kill -9` there would stop it. Points:
/// `snapshot-install` (a received snapshot is durable, the log not yet reset
/// to it). Read once; unset, it costs one load per call.
pub fn crash_point(point: &str) {
    static AT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let at = AT.get_or_init(|| std::env::var("KYTHIRA_CRASH_AT").ok());
    if at.as_deref() == Some(point) {
        eprintln!("kythira: crash point {point} reached (KYTHIRA_CRASH_AT); aborting");
        std::process::abort();
    }
}
