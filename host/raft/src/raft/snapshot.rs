//! Snapshots and log compaction (Raft §7): the driver snapshots its state
//! machine and the core compacts its log behind it; a follower whose next
//! entry is compacted away is sent the latest snapshot, which the driver
//! streams and the follower's core installs when it is news.

#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::CompactError;
use crate::membership::MembershipLog;
use crate::message::{AppendOutcome, MessageBody};
use crate::progress::ReplicationState;
use crate::types::{Index, NodeId, SnapshotMeta};

use super::{Raft, State};

impl Raft {
    /// What a snapshot of the state machine at `index` stands for: the
    /// entry's term and the membership in effect there. `index` must be
    /// applied (handed out for application) and not yet compacted; the
    /// driver writes this with the snapshot's data, then calls
    /// [`Raft::compact`].
    pub fn snapshot_meta(&self, index: Index) -> Result<SnapshotMeta, CompactError> {
        let log = &self.log;
        if index <= log.snapshot_index() || index > log.applied().min(log.stable()) {
            return Err(CompactError::OutOfRange {
                index,
                snapshot: log.snapshot_index(),
                applied: log.applied(),
            });
        }
        let membership = self.memberships.at(index).clone();
        if membership.voters().is_empty() {
            // A node that joined knowing no members learns them from the
            // configuration entry that added it: before that entry, it
            // cannot say who the members were.
            return Err(CompactError::UnknownMembership { index });
        }
        Ok(SnapshotMeta {
            index,
            term: log
                .term(index)
                .expect("held: above the snapshot, below the end"),
            membership,
        })
    }

    /// The snapshot `meta` (from [`Raft::snapshot_meta`]) is durable: the
    /// log up to its index is dropped, and it is what followers too far
    /// behind are sent from now on.
    pub fn compact(&mut self, meta: SnapshotMeta) -> Result<(), CompactError> {
        let expected = self.snapshot_meta(meta.index)?;
        if expected != meta {
            return Err(CompactError::Mismatch { index: meta.index });
        }
        self.log.compact_to(meta.index);
        self.memberships.compact_to(meta.index);
        self.snapshot = Some(meta);
        self.debug_check_invariants();
        Ok(())
    }

    /// The latest snapshot, taken here or installed.
    pub fn snapshot(&self) -> Option<&SnapshotMeta> {
        self.snapshot.as_ref()
    }

    /// The driver finished sending the snapshot to `to` (`delivered`), or
    /// gave up (the stream broke, the follower refused the data). After a
    /// failure the leader probes again, which sends the snapshot anew if the
    /// follower still needs it.
    pub fn report_snapshot(&mut self, to: NodeId, delivered: bool) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let Some(pr) = l.progress.get_mut(&to) else {
            return;
        };
        if let ReplicationState::Snapshot { index } = pr.state {
            pr.snapshot_done(index, delivered);
        }
    }

    /// A leader's snapshot arrived (its data complete and verified by the
    /// driver). Installed only if it is news: a snapshot never replaces
    /// committed entries, and one whose last entry this log holds only moves
    /// the commit index, keeping the entries after it.
    pub(super) fn handle_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        let index = meta.index;
        #[cfg(not(feature = "mutants"))]
        let install_over_committed = false;
        // The mutant installs any snapshot past its own below the commit
        // index. (Not only one that disagrees with the log there: committed
        // entries agree with every leader's, so in a correct cluster such a
        // snapshot never comes and the mutant would inject nothing.)
        #[cfg(feature = "mutants")]
        let install_over_committed = self.cfg.mutated(Mutation::SnapshotOverCommitted)
            && index > self.log.snapshot_index()
            && index <= self.log.committed();
        if index <= self.log.committed() && !install_over_committed {
            let last_index = self.log.committed();
            self.accept(from, last_index);
            return;
        }
        if self.log.matches(index, meta.term) && !install_over_committed {
            self.log.commit_to(index);
            self.accept(from, index);
            return;
        }
        // Acknowledgements waiting for the next write that claim entries
        // past the snapshot describe entries about to be discarded.
        self.out.withdraw_acks_from(index + 1);
        #[cfg(feature = "mutants")]
        if install_over_committed {
            self.log.force_reset_to_snapshot(index, meta.term);
        } else {
            self.log.reset_to_snapshot(index, meta.term);
        }
        #[cfg(not(feature = "mutants"))]
        self.log.reset_to_snapshot(index, meta.term);
        self.memberships = MembershipLog::new(meta.membership.clone());
        self.snapshot = Some(meta.clone());
        self.pending_install = Some(meta);
        // Sent after the install is durable, like any acknowledgement.
        self.accept(from, index);
    }

    fn accept(&mut self, to: NodeId, last_index: Index) {
        self.out.send(
            self.term,
            to,
            MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
        );
    }
}
