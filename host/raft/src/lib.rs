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
//! no-op entry per leadership; batched ReadIndex reads; membership changes by
//! joint consensus with learners; leadership transfer.
//!
//! A driver loop for a single-node cluster:
//!
//! ```
//! use kythira_raft::{Bytes, Config, EntryKind, Persisted, Raft, Role};
//!
//! let mut raft = Raft::new(Config::new(1, [1]), Persisted::default()).unwrap();
//! let mut applied = Vec::new();
//! let mut drive = |raft: &mut Raft| {
//!     while let Some(ready) = raft.ready() {
//!         // 1. send ready.messages; 2. write ready.hard_state and
//!         //    ready.entries and fsync; 3. send ready.persisted_messages;
//!         // 4. apply:
//!         applied.extend(ready.committed_entries);
//!         raft.advance();
//!     }
//! };
//! // A lone voter leads once its vote for itself is durable.
//! while raft.role() != Role::Leader {
//!     raft.tick();
//!     drive(&mut raft);
//! }
//! raft.propose(Bytes::from_static(b"hello")).unwrap();
//! drive(&mut raft);
//! let kinds: Vec<_> = applied.iter().map(|e| e.kind).collect();
//! assert_eq!(kinds, [EntryKind::Noop, EntryKind::Normal]);
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod config;
mod driver;
mod error;
mod log;
mod membership;
mod message;
mod progress;
mod quorum;
mod raft;
mod read_index;
mod ready;
mod rng;
mod types;

pub use bytes::Bytes;
pub use config::Config;
#[cfg(feature = "mutants")]
pub use config::Mutation;
pub use driver::{Batch, Driver, Write, may_precede_persist};
pub use error::{
    CompactError, ConfigError, MembershipChangeError, ProposeError, RestoreError, StepError,
    TransferError,
};
pub use log::RaftLog;
pub use membership::{Membership, MembershipError};
pub use message::{AppendOutcome, Message, MessageBody};
pub use progress::{Progress, ReplicationState};
pub use quorum::Voters;
pub use raft::{Proposal, Raft, Role};
pub use ready::{ReadState, Ready};
pub use types::{
    Entry, EntryKind, HardState, Index, MAX_TERM, NodeId, Persisted, SnapshotMeta, Term,
};
