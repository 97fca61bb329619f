//! The Kythira consensus core: Raft as a pure, deterministic state machine.
//!
//! The core owns no sockets, files, threads or clocks, in the style of etcd's
//! raft and quinn-proto. A driver feeds it [`Raft::step`] (messages),
//! [`Raft::tick`] (logical time), [`Raft::propose`] and [`Raft::read_index`],
//! and carries out the [`Ready`] batches it returns, acknowledging each with
//! [`Raft::advance`]. [`Ready`] documents which messages may leave before the
//! batch's writes are durable.
//!
//! Implemented: elections with randomized timeouts, pre-vote and check-quorum;
//! batched, pipelined replication with probe/replicate flow control and
//! conflict-term backtracking; commit by quorum with the current-term rule; a
//! no-op entry per leadership; batched ReadIndex reads.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod error;
mod log;
mod message;
mod progress;
mod raft;
mod read_index;
mod ready;
mod rng;
mod types;

pub use bytes::Bytes;
pub use config::Config;
#[cfg(feature = "mutants")]
pub use config::Mutation;
pub use error::{ConfigError, ProposeError, RestoreError, StepError};
pub use log::RaftLog;
pub use message::{AppendOutcome, Message, MessageBody};
pub use progress::{Progress, ReplicationState};
pub use raft::{Proposal, Raft, Role};
pub use ready::{ReadState, Ready};
pub use types::{Entry, EntryKind, HardState, Index, NodeId, Persisted, Term};
