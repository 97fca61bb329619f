//! The one way to carry out [`Ready`] batches, shared by the daemon and the
//! simulator so that both keep the same ordering rules.
//!
//! [`Driver`] wraps a [`Raft`] and turns each `Ready` into a [`Batch`] of
//! actions. It performs no I/O either: the caller sends, writes and applies,
//! and reports a finished write with [`Driver::persisted`], which releases the
//! messages that had to wait for it. Several writes may be outstanding at
//! once; they are made durable and reported in order. Because the driver hides
//! [`Raft::ready`] and [`Raft::advance`], a caller cannot advance before the
//! write is durable or send an acknowledgement too early.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::error::{CompactError, MembershipChangeError, ProposeError, StepError, TransferError};
use crate::membership::Membership;
use crate::message::{Message, MessageBody};
use crate::raft::{Proposal, Raft};
use crate::ready::ReadState;
use crate::types::SnapshotMeta;
use crate::types::{Entry, HardState};

/// What the caller must do for one `Ready`.
#[derive(Debug, Default)]
#[must_use = "a batch's messages must be sent, its write made durable and its entries applied"]
pub struct Batch {
    /// Messages that may leave now, before `write` is durable.
    pub send: Vec<Message>,
    /// State to make durable (fsync), then report with [`Driver::persisted`].
    /// Several writes may be outstanding at once (up to
    /// [`crate::Config::max_outstanding_writes`]): they must become durable
    /// in the order handed out, and are reported in that order.
    pub write: Option<Write>,
    /// Committed entries to apply, in log order. They are durable already,
    /// so applying may overlap with `write`.
    pub apply: Vec<Entry>,
    /// Reads that may be served once the state machine applied their index.
    pub read_states: Vec<ReadState>,
    /// Reads abandoned because this node stopped leading.
    pub dropped_reads: Vec<u64>,
}

/// A durable write: first the received snapshot to install (if any: its
/// data replaces the state machine and the whole log), then the hard state
/// (if it changed) and entries replacing every stored entry from
/// `entries[0].index` on, written atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Write {
    /// A received snapshot to install first.
    pub snapshot: Option<SnapshotMeta>,
    /// New hard state, if it changed.
    pub hard_state: Option<HardState>,
    /// Contiguous entries.
    pub entries: Vec<Entry>,
}

// A write is handed out only for entries or a new term or vote; a new commit
// index rides along with the next such write (see `Driver::poll`).

/// A [`Raft`] together with the bookkeeping of its outstanding writes.
#[derive(Debug)]
pub struct Driver {
    raft: Raft,
    /// Every `Ready` handed out and not yet advanced, oldest first.
    pending: VecDeque<Pending>,
    /// Writes among `pending`.
    writes: usize,
    /// The hard state of the last write handed out (or the durable one if
    /// none was): what the next `Ready`'s hard state is compared with.
    written: HardState,
}

/// One `Ready` the core handed out that is not yet advanced.
#[derive(Debug)]
struct Pending {
    /// Whether it was handed out as a write. One that needed none but came
    /// after a write is advanced together with that write, since its
    /// messages may promise what that write holds (an acknowledgement of
    /// entries being written).
    is_write: bool,
    /// Messages held back until it is durable.
    held: Vec<Message>,
}

impl Driver {
    /// Drives `raft`.
    pub fn new(raft: Raft) -> Self {
        let written = raft.hard_state();
        Self {
            raft,
            pending: VecDeque::new(),
            writes: 0,
            written,
        }
    }

    /// The core, for inspection.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Advances logical time by one tick.
    pub fn tick(&mut self) {
        self.raft.tick();
    }

    /// Hands the core a message from a peer.
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        self.raft.step(m)
    }

    /// Proposes a command (leader only).
    pub fn propose(&mut self, data: Bytes) -> Result<Proposal, ProposeError> {
        self.raft.propose(data)
    }

    /// Proposes a membership change (leader only); see
    /// [`Raft::propose_membership`].
    pub fn propose_membership(
        &mut self,
        target: Membership,
    ) -> Result<Proposal, MembershipChangeError> {
        self.raft.propose_membership(target)
    }

    /// Hands leadership to voter `to` (leader only); see
    /// [`Raft::transfer_leadership`].
    pub fn transfer_leadership(&mut self, to: crate::NodeId) -> Result<(), TransferError> {
        self.raft.transfer_leadership(to)
    }

    /// Starts a linearizable read identified by `ctx`; see
    /// [`Raft::read_index`] (a follower forwards it to the leader).
    pub fn read_index(&mut self, ctx: u64) -> Result<(), ProposeError> {
        self.raft.read_index(ctx)
    }

    /// What a snapshot at `index` stands for; see [`Raft::snapshot_meta`].
    pub fn snapshot_meta(&self, index: crate::Index) -> Result<SnapshotMeta, CompactError> {
        self.raft.snapshot_meta(index)
    }

    /// The snapshot `meta` is durable: compact the log behind it; see
    /// [`Raft::compact`].
    pub fn compact(&mut self, meta: SnapshotMeta) -> Result<(), CompactError> {
        self.raft.compact(meta)
    }

    /// The snapshot for `to` was delivered, or not; see
    /// [`Raft::report_snapshot`].
    pub fn report_snapshot(&mut self, to: crate::NodeId, delivered: bool) {
        self.raft.report_snapshot(to, delivered);
    }

    /// Starts a read served from the leader lease when it holds; see
    /// [`Raft::lease_read`].
    pub fn lease_read(&mut self, ctx: u64) -> Result<(), ProposeError> {
        self.raft.lease_read(ctx)
    }

    /// Whether a write is outstanding.
    pub fn is_writing(&self) -> bool {
        self.writes > 0
    }

    /// How many writes are outstanding.
    pub fn outstanding_writes(&self) -> usize {
        self.writes
    }

    /// The next batch of actions, or `None` if there is nothing to do. Call
    /// `poll` again until it returns `None`: each batch is complete as soon
    /// as it is returned, but for its write, which the caller makes durable
    /// while polling on. Once `max_outstanding_writes` writes are
    /// outstanding, batches carry only messages that may precede them (a
    /// leader's appends and heartbeats, heartbeat answers, pre-votes,
    /// reads): replication and leadership go on during a long fsync.
    pub fn poll(&mut self) -> Option<Batch> {
        if self.writes >= self.raft.config().max_outstanding_writes {
            let send = self.raft.take_early_messages();
            if send.is_empty() {
                return None;
            }
            self.check_early(&send);
            return Some(Batch {
                send,
                ..Batch::default()
            });
        }
        let rd = self.raft.ready()?;
        self.check_early(&rd.messages);
        let mut send = rd.messages;
        // A new commit index alone is not worth an fsync: persisting it only
        // saves a restarted node from relearning it from the leader (the core
        // never relies on it), and syncing it would hold up the next batch of
        // entries behind a second fsync per round. The next write with
        // entries or a new term or vote carries the latest commit index.
        let must_sync = !rd.entries.is_empty()
            || rd.snapshot.is_some()
            || rd
                .hard_state
                .is_some_and(|hs| hs.term != self.written.term || hs.vote != self.written.vote);
        let write = if !must_sync {
            if self.pending.is_empty() {
                // Nothing to make durable: what was held back may leave now.
                send.extend(rd.persisted_messages);
                self.raft.advance();
            } else {
                self.pending.push_back(Pending {
                    is_write: false,
                    held: rd.persisted_messages,
                });
            }
            None
        } else {
            let current = self.raft.hard_state();
            let hard_state = match rd.hard_state {
                // The commit index handed out earlier without a write.
                None if current.commit > self.written.commit => Some(current),
                hs => hs,
            };
            if let Some(hs) = hard_state {
                self.written = hs;
            }
            self.pending.push_back(Pending {
                is_write: true,
                held: rd.persisted_messages,
            });
            self.writes += 1;
            Some(Write {
                snapshot: rd.snapshot,
                hard_state,
                entries: rd.entries,
            })
        };
        Some(Batch {
            send,
            write,
            apply: rd.committed_entries,
            read_states: rd.read_states,
            dropped_reads: rd.dropped_reads,
        })
    }

    /// Messages about to leave before a write: only kinds that may.
    /// Checked whenever no bug is injected on purpose (the `mutants` feature
    /// is on in every workspace test build, through the simulator's
    /// dev-dependency, so it must not switch this off).
    fn check_early(&self, messages: &[Message]) {
        if !self.raft.is_mutated() {
            for m in messages {
                assert!(
                    may_precede_persist(m),
                    "the core put a message that promises durable state before the write: {m:?}"
                );
            }
        }
    }

    /// The oldest outstanding write is durable. Returns the messages that
    /// waited for it (votes and acknowledgements), to be sent now.
    ///
    /// # Panics
    /// If no write is outstanding: a driver bug.
    pub fn persisted(&mut self) -> Vec<Message> {
        let first = self
            .pending
            .pop_front()
            .expect("persisted() without an outstanding write");
        assert!(first.is_write, "batches without a write wait behind one");
        self.writes -= 1;
        self.raft.advance();
        let mut released = first.held;
        // The batches that needed no write but waited behind this one.
        while self.pending.front().is_some_and(|p| !p.is_write) {
            let p = self.pending.pop_front().expect("checked");
            self.raft.advance();
            released.extend(p.held);
        }
        debug_assert_eq!(self.pending.len(), self.raft.outstanding_readies());
        released
    }
}

/// Whether `m` may leave before the batch it came with is durable: a
/// leader's appends, heartbeats and `TimeoutNow` (the leader counts its own
/// entries only after the write, Raft thesis §10.2.1) and pre-vote traffic,
/// which changes no state.
pub fn may_precede_persist(m: &Message) -> bool {
    matches!(
        m.body,
        MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::HeartbeatResponse { .. }
            | MessageBody::TimeoutNow
            | MessageBody::Snapshot { .. }
            | MessageBody::ReadIndexRequest { .. }
            | MessageBody::ReadIndexResponse { .. }
            | MessageBody::PreVote { .. }
            | MessageBody::PreVoteResponse { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, Persisted, Role};

    fn leader_of_one(max_outstanding_writes: usize) -> Driver {
        let mut cfg = Config::new(1, [1]);
        cfg.max_outstanding_writes = max_outstanding_writes;
        let mut d = Driver::new(Raft::new(cfg, Persisted::default()).unwrap());
        while d.raft().role() != Role::Leader {
            d.tick();
            while let Some(b) = d.poll() {
                if b.write.is_some() {
                    assert!(d.persisted().is_empty());
                }
            }
        }
        d
    }

    #[test]
    fn with_one_outstanding_write_the_next_waits() {
        let mut d = leader_of_one(1);
        d.propose(Bytes::from_static(b"x")).unwrap();
        let b = d.poll().expect("the proposal needs a write");
        let w = b.write.expect("entries to persist");
        assert_eq!(w.entries.last().unwrap().data, Bytes::from_static(b"x"));
        assert!(d.is_writing());
        d.propose(Bytes::from_static(b"y")).unwrap();
        assert!(d.poll().is_none(), "the next batch waits for the write");
        d.persisted();
        // The write made `x` durable on the only voter: it commits, and `y`
        // (proposed meanwhile) is written in the next batch: group commit.
        let b = d.poll().unwrap();
        assert_eq!(b.apply.last().unwrap().data, Bytes::from_static(b"x"));
        assert_eq!(b.write.unwrap().entries[0].data, Bytes::from_static(b"y"));
    }

    #[test]
    fn writes_overlap_and_are_acknowledged_in_order() {
        let mut d = leader_of_one(2);
        let entries = |w: Option<Write>| -> Vec<Bytes> {
            w.expect("a write")
                .entries
                .into_iter()
                .map(|e| e.data)
                .collect()
        };
        d.propose(Bytes::from_static(b"x")).unwrap();
        let first = entries(d.poll().unwrap().write);
        d.propose(Bytes::from_static(b"y")).unwrap();
        let second = entries(d.poll().unwrap().write);
        assert_eq!(
            (first, second),
            (vec![b"x".as_ref().into()], vec![b"y".as_ref().into()])
        );
        assert_eq!(d.outstanding_writes(), 2);
        d.propose(Bytes::from_static(b"z")).unwrap();
        assert!(d.poll().is_none(), "two writes are the most outstanding");
        // Neither commits before its write is durable, and `x` before `y`.
        d.persisted();
        let b = d.poll().unwrap();
        let applied: Vec<_> = b.apply.iter().map(|e| e.data.clone()).collect();
        assert_eq!(applied, vec![Bytes::from_static(b"x")]);
        assert_eq!(entries(b.write), vec![Bytes::from_static(b"z")]);
        d.persisted();
        d.persisted();
        let b = d.poll().unwrap();
        let applied: Vec<_> = b.apply.iter().map(|e| e.data.clone()).collect();
        assert_eq!(
            applied,
            vec![Bytes::from_static(b"y"), Bytes::from_static(b"z")]
        );
        assert!(!d.is_writing());
    }

    #[test]
    fn an_acknowledgement_in_a_batch_without_a_write_waits_for_the_write_before() {
        // Node 2 of {1, 2} is writing entry 1 when the same append arrives
        // again: nothing new to write, but the repeated acknowledgement
        // claims entry 1, so it waits for the write that holds it.
        let mut d = Driver::new(Raft::new(Config::new(2, [1, 2]), Persisted::default()).unwrap());
        let append = Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![Entry {
                    term: 1,
                    index: 1,
                    kind: crate::EntryKind::Noop,
                    data: Bytes::new(),
                }],
                commit: 0,
            },
        };
        d.step(append.clone()).unwrap();
        assert!(d.poll().unwrap().write.is_some());
        d.step(append).unwrap();
        let b = d
            .poll()
            .expect("the repeated append is answered in a batch");
        assert!(b.write.is_none() && b.send.is_empty(), "{b:?}");
        assert!(d.poll().is_none());
        let released = d.persisted();
        assert_eq!(
            released.len(),
            2,
            "both answers, after the write: {released:?}"
        );
        assert!(released.iter().all(|m| matches!(
            m.body,
            MessageBody::AppendResponse(crate::AppendOutcome::Accepted { last_index: 1 })
        )));
        assert!(!d.is_writing());
    }

    #[test]
    fn replication_and_heartbeat_answers_go_on_during_a_write() {
        // Node 2 of {1, 2} is writing the leader's first entry when a
        // heartbeat of the same (durable) term arrives: its answer leaves at
        // once, not after the write.
        let mut d = Driver::new(Raft::new(Config::new(2, [1, 2]), Persisted::default()).unwrap());
        let hb = |commit| Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Heartbeat {
                commit,
                read_round: 7,
            },
        };
        d.step(hb(0)).unwrap();
        let b = d.poll().unwrap();
        assert!(b.write.is_some(), "the new term is written");
        assert!(d.poll().is_none(), "the answer waits for the term");
        d.persisted();
        while d.poll().is_some() {}
        d.step(Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![Entry {
                    term: 1,
                    index: 1,
                    kind: crate::EntryKind::Noop,
                    data: Bytes::new(),
                }],
                commit: 0,
            },
        })
        .unwrap();
        assert!(d.poll().unwrap().write.is_some());
        d.step(hb(0)).unwrap();
        let b = d.poll().expect("the answer need not wait for the entries");
        assert!(b.write.is_none() && b.apply.is_empty());
        assert!(matches!(
            b.send.as_slice(),
            [Message {
                body: MessageBody::HeartbeatResponse { read_round: 7 },
                ..
            }]
        ));
        // The acknowledgement of the entry still waits for its write.
        assert!(matches!(
            d.persisted().as_slice(),
            [Message {
                body: MessageBody::AppendResponse(_),
                ..
            }]
        ));
    }

    #[test]
    fn a_new_commit_index_alone_is_not_synced() {
        // Node 2 of {1, 2} learns a higher commit from a heartbeat after
        // its log is durable: no write, and its answer leaves at once.
        let mut d = Driver::new(Raft::new(Config::new(2, [1, 2]), Persisted::default()).unwrap());
        let noop = Entry {
            term: 1,
            index: 1,
            kind: crate::EntryKind::Noop,
            data: Bytes::new(),
        };
        d.step(Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![noop],
                commit: 0,
            },
        })
        .unwrap();
        let b = d.poll().unwrap();
        assert_eq!(b.write.unwrap().entries.len(), 1);
        d.persisted();
        while d.poll().is_some() {}
        d.step(Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Heartbeat {
                commit: 1,
                read_round: 0,
            },
        })
        .unwrap();
        let b = d.poll().unwrap();
        assert!(b.write.is_none(), "commit-only changes are not synced");
        assert_eq!(b.apply.len(), 1);
        assert!(!d.is_writing());
    }

    #[test]
    #[should_panic(expected = "without an outstanding write")]
    fn persisted_without_a_write_is_a_bug() {
        let mut d = leader_of_one(1);
        let _ = d.persisted();
    }

    #[test]
    fn votes_wait_for_the_write() {
        // Node 2 of {1, 2} grants node 1's vote only after persisting it.
        let mut d = Driver::new(Raft::new(Config::new(2, [1, 2]), Persisted::default()).unwrap());
        d.step(Message {
            from: 1,
            to: 2,
            term: 1,
            body: MessageBody::Vote {
                last_index: 0,
                last_term: 0,
                transfer: false,
            },
        })
        .unwrap();
        let b = d.poll().unwrap();
        assert!(b.send.iter().all(may_precede_persist));
        assert_eq!(b.write.unwrap().hard_state.unwrap().vote, Some(1));
        let held = d.persisted();
        assert!(matches!(
            held.as_slice(),
            [Message {
                body: MessageBody::VoteResponse { granted: true },
                ..
            }]
        ));
    }
}
