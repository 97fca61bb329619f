//! Log replication, commit and ReadIndex rounds (Raft §5.3, §5.4.2; thesis §6.4).

use crate::config::Config;
#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::StepError;
use crate::log::{AppendRefusal, Appended, RaftLog};
use crate::message::{AppendOutcome, MessageBody};
use crate::progress::Progress;
use crate::types::{Entry, Index, NodeId, Term};

use super::membership::quorum;
use super::{Broadcast, Raft, State, send_append};

impl Raft {
    /// An append or heartbeat of our term arrived from `from`. Refused, with
    /// nothing changed, if we lead this term ourselves: one term has at most
    /// one leader, so the sender (or its election) is broken.
    pub(super) fn hear_from_leader(&mut self, from: NodeId) -> Result<(), StepError> {
        match self.state {
            State::Follower => {}
            State::Leader(_) => {
                return Err(StepError::Malformed {
                    from,
                    reason: "append or heartbeat from another leader of this node's term",
                });
            }
            State::PreCandidate(_) | State::Candidate(_) => {
                // A leader exists in our term: we lost the election.
                let term = self.term;
                self.become_follower(term, Some(from));
            }
        }
        self.leader = Some(from);
        self.election_elapsed = 0;
        // The promise a follower makes to the leader it just heard from: no
        // vote for anyone else for an election timeout. It is kept whatever
        // term the node adopts meanwhile (a stale answer of a later term
        // must not release it), or a lease read could miss a write.
        self.lease_until = self.ticks + u64::from(self.cfg.election_ticks);
        Ok(())
    }

    pub(super) fn handle_append(
        &mut self,
        from: NodeId,
        prev_index: Index,
        prev_term: Term,
        entries: &[Entry],
        commit: Index,
    ) -> Result<(), StepError> {
        if prev_index < self.log.committed() {
            // The committed prefix matches the leader's; restart from there.
            let last_index = self.log.committed();
            self.out.send(
                self.term,
                from,
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
            );
            return Ok(());
        }
        let check_prev = true;
        #[cfg(feature = "mutants")]
        let check_prev = check_prev && !self.cfg.mutated(Mutation::AppendWithoutPrevCheck);
        let truncate = true;
        #[cfg(feature = "mutants")]
        let truncate = truncate && !self.cfg.mutated(Mutation::KeepConflictingSuffix);
        match self
            .log
            .try_append(prev_index, prev_term, entries, check_prev, truncate)
        {
            Ok(Appended {
                last_index,
                replaced_from,
                written_from,
            }) => {
                if let Some(index) = replaced_from {
                    // Acknowledgements to earlier leaders that wait for the
                    // next write describe entries that write will no longer
                    // hold: sent after it, they would be lies.
                    self.out.withdraw_acks_from(index);
                }
                if let Some(index) = written_from {
                    self.follow_log_memberships(index);
                }
                // Only up to what this append proved to match: entries past it
                // may still be replaced.
                self.log.commit_to(commit.min(last_index));
                self.out.send(
                    self.term,
                    from,
                    MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
                );
                Ok(())
            }
            Err(AppendRefusal::Mismatch) => {
                let (hint_index, hint_term) = self
                    .log
                    .find_conflict_by_term(prev_index.min(self.log.last_index()), prev_term);
                #[cfg(feature = "mutants")]
                let (hint_index, hint_term) = if self.cfg.mutated(Mutation::NoFastBacktracking) {
                    (prev_index.saturating_sub(1), 0)
                } else {
                    (hint_index, hint_term)
                };
                self.out.send(
                    self.term,
                    from,
                    MessageBody::AppendResponse(AppendOutcome::Rejected {
                        prev_index,
                        hint_index,
                        hint_term,
                    }),
                );
                Ok(())
            }
            Err(AppendRefusal::ConflictsWithCommitted) => Err(StepError::Malformed {
                from,
                reason: "append would replace committed entries",
            }),
        }
    }

    pub(super) fn handle_append_response(
        &mut self,
        from: NodeId,
        outcome: AppendOutcome,
    ) -> Result<(), StepError> {
        let State::Leader(l) = &mut self.state else {
            return Ok(());
        };
        let claimed = match outcome {
            AppendOutcome::Accepted { last_index } => last_index,
            AppendOutcome::Rejected { prev_index, .. } => prev_index,
        };
        if claimed > self.log.last_index() {
            return Err(StepError::Malformed {
                from,
                reason: "answer about entries the leader never sent",
            });
        }
        let Some(pr) = l.progress.get_mut(&from) else {
            // Not a member (any more): nothing to track.
            return Ok(());
        };
        pr.recent_active = true;
        match outcome {
            AppendOutcome::Accepted { last_index } => {
                let news = pr.accepted(last_index);
                self.maybe_send_timeout_now(from);
                if news && self.maybe_commit() {
                    return Ok(());
                }
            }
            AppendOutcome::Rejected {
                prev_index,
                hint_index,
                hint_term,
            } => {
                // Both hints are clamped to our log: they come from the network.
                let hint = if hint_term > 0 {
                    self.log.find_conflict_by_term(hint_index, hint_term).0
                } else {
                    hint_index.min(self.log.last_index())
                };
                if !pr.rejected(prev_index, hint) {
                    return Ok(());
                }
            }
        }
        let State::Leader(l) = &mut self.state else {
            unreachable!("still leader");
        };
        let pr = l.progress.get_mut(&from).expect("checked above");
        send_append(
            &mut self.out,
            &self.log,
            self.snapshot.as_ref(),
            &self.cfg,
            self.term,
            from,
            pr,
            false,
        );
        Ok(())
    }

    pub(super) fn handle_heartbeat_response(&mut self, from: NodeId, read_round: u64) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let Some(pr) = l.progress.get_mut(&from) else {
            return;
        };
        pr.recent_active = true;
        pr.read_ack = pr.read_ack.max(read_round);
        let retry_probe = true;
        #[cfg(feature = "mutants")]
        let retry_probe = retry_probe && !self.cfg.mutated(Mutation::ProbeNeverRetried);
        pr.heard_from(
            self.cfg.max_inflight_messages,
            retry_probe,
            self.cfg.election_ticks,
        );
        if pr.matched < self.log.last_index() {
            // Even with nothing new to send: an empty append finds out
            // whether earlier ones were lost.
            send_append(
                &mut self.out,
                &self.log,
                self.snapshot.as_ref(),
                &self.cfg,
                self.term,
                from,
                pr,
                true,
            );
        }
        if read_round > 0 && self.maybe_confirm_read() {
            self.maybe_start_read_round();
        }
    }

    /// Advance the commit index to the highest index stored by a quorum,
    /// if that entry is of the current term (Raft §5.4.2). Returns whether it moved.
    pub(super) fn maybe_commit(&mut self) -> bool {
        let State::Leader(l) = &mut self.state else {
            return false;
        };
        // Our own entries count once durable, like a follower's.
        let own = self.log.stable();
        #[cfg(feature = "mutants")]
        let own = if self.cfg.mutated(Mutation::LeaderCountsUnstableSelf) {
            self.log.last_index()
        } else {
            own
        };
        let me = self.cfg.id;
        let candidate = quorum(&self.cfg, &self.memberships).committed_index(|id| {
            if id == me {
                own
            } else {
                l.progress.get(&id).map_or(0, |p| p.matched)
            }
        });
        let current_term = self.log.term(candidate) == Some(self.term);
        #[cfg(feature = "mutants")]
        let current_term = current_term || self.cfg.mutated(Mutation::CommitPreviousTermByCount);
        if !current_term || !self.log.commit_to(candidate) {
            return false;
        }
        l.broadcast = Broadcast::Commit;
        self.after_commit();
        self.maybe_start_read_round();
        true
    }

    pub(super) fn flush_broadcast(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let allow_empty = match std::mem::replace(&mut l.broadcast, Broadcast::None) {
            Broadcast::None => return,
            Broadcast::Entries => false,
            Broadcast::Commit => true,
        };
        for (&to, pr) in &mut l.progress {
            send_append(
                &mut self.out,
                &self.log,
                self.snapshot.as_ref(),
                &self.cfg,
                self.term,
                to,
                pr,
                allow_empty,
            );
        }
    }

    pub(super) fn broadcast_heartbeat(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        let read_round = l.reads.next_round(self.ticks, self.cfg.lease_reads);
        for (&to, pr) in &l.progress {
            let commit = heartbeat_commit(&self.cfg, &self.log, pr);
            self.out
                .send(self.term, to, MessageBody::Heartbeat { commit, read_round });
        }
    }

    /// Completes the read round in flight if every voter set has a majority
    /// (this node included, if it votes) that acknowledged it.
    pub(super) fn maybe_confirm_read(&mut self) -> bool {
        let State::Leader(l) = &mut self.state else {
            return false;
        };
        let me = self.cfg.id;
        let q = quorum(&self.cfg, &self.memberships);
        let progress = &l.progress;
        let latest = l.reads.latest();
        // The newest round a majority of every voter set acknowledged (this
        // node acknowledges its own rounds as it sends them).
        let acked_round = q.committed_index(|id| {
            if id == me {
                latest
            } else {
                progress.get(&id).map_or(0, |p| p.read_ack)
            }
        });
        l.reads.quorum_acked(acked_round);
        let acked = |round: u64| {
            #[cfg(feature = "mutants")]
            if self.cfg.mutated(Mutation::ReadWithoutQuorum) {
                return true;
            }
            acked_round >= round
        };
        let mut confirmed = Vec::new();
        let done = l.reads.maybe_confirm(acked, &mut confirmed);
        self.answer_reads(confirmed);
        done
    }

    /// The membership changed: the read round in flight may be confirmed
    /// by the new voter sets already.
    pub(super) fn maybe_confirm_read_after_change(&mut self) {
        if self.maybe_confirm_read() {
            self.maybe_start_read_round();
        }
    }

    pub(super) fn maybe_start_read_round(&mut self) {
        let State::Leader(l) = &mut self.state else {
            return;
        };
        // Until an entry of this term commits, our commit index may lag the
        // previous leader's (Raft thesis §6.4, step 1).
        let term_committed = self.log.term(self.log.committed()) == Some(self.term);
        #[cfg(feature = "mutants")]
        let term_committed = term_committed || self.cfg.mutated(Mutation::ReadBeforeTermCommit);
        if !term_committed {
            return;
        }
        let Some(read_round) =
            l.reads
                .maybe_start(self.log.committed(), self.ticks, self.cfg.lease_reads)
        else {
            return;
        };
        if self.maybe_confirm_read() {
            // Single voter: our own acknowledgement is a quorum.
            return self.maybe_start_read_round();
        }
        let State::Leader(l) = &self.state else {
            unreachable!("still leader");
        };
        for (&to, pr) in &l.progress {
            let commit = heartbeat_commit(&self.cfg, &self.log, pr);
            self.out
                .send(self.term, to, MessageBody::Heartbeat { commit, read_round });
        }
    }
}

/// The commit index a heartbeat carries to a follower: never past what it is
/// known to store, since a heartbeat has no consistency check and the
/// follower's entries beyond its match may still differ from ours.
#[cfg_attr(not(feature = "mutants"), expect(unused_variables))]
fn heartbeat_commit(cfg: &Config, log: &RaftLog, pr: &Progress) -> Index {
    #[cfg(feature = "mutants")]
    if cfg.mutated(Mutation::HeartbeatCommitUnclamped) {
        return log.committed();
    }
    pr.matched.min(log.committed())
}
