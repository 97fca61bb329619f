//! The Raft state machine: state, inputs and the `Ready` cycle. Elections
//! and replication live in the submodules.

mod election;
mod membership;
mod reads;
mod replication;
mod snapshot;
mod transfer;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::config::Config;
#[cfg(feature = "mutants")]
use crate::config::Mutation;
use crate::error::{ProposeError, RestoreError, StepError};
use crate::log::RaftLog;
use crate::membership::{Membership, MembershipLog};
use crate::message::{AppendOutcome, Message, MessageBody};
use crate::progress::{Progress, ReplicationState};
use crate::read_index::ReadRounds;
use crate::ready::{ReadState, Ready};
use crate::rng::SplitMix64;
use crate::types::{
    Entry, EntryKind, HardState, Index, MAX_TERM, NodeId, Persisted, SnapshotMeta, Term,
};

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asks whether it could win an election, without changing its term.
    PreCandidate,
    /// Campaigns in its current term.
    Candidate,
    /// Leads its current term.
    Leader,
}

/// Where a proposal was placed; it succeeded if and only if the entry at
/// `index` is applied with this `term`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Proposal {
    /// Log index of the new entry.
    pub index: Index,
    /// Term of the new entry.
    pub term: Term,
}

#[derive(Debug)]
enum State {
    Follower,
    PreCandidate(Votes),
    Candidate(Votes),
    Leader(Box<Leadership>),
}

#[derive(Debug, Default)]
struct Votes {
    /// By voter, so that a duplicated response counts once.
    by_voter: BTreeMap<NodeId, bool>,
    /// Grants counted again by the duplicate-counting mutant.
    #[cfg(feature = "mutants")]
    repeated_grants: usize,
}

impl Votes {
    fn record(&mut self, from: NodeId, granted: bool) {
        self.by_voter.entry(from).or_insert(granted);
    }

    /// A grant from a voter that already answered, counted once more.
    #[cfg(feature = "mutants")]
    fn count_again(&mut self, from: NodeId, granted: bool) {
        if granted && self.by_voter.contains_key(&from) {
            self.repeated_grants += 1;
        }
    }

    /// Grants with the repeated ones counted again (the duplicate-counting
    /// mutant's tally).
    #[cfg(feature = "mutants")]
    fn tally(&self) -> usize {
        self.by_voter.values().filter(|&&g| g).count() + self.repeated_grants
    }
}

#[derive(Debug)]
struct Leadership {
    progress: BTreeMap<NodeId, Progress>,
    reads: ReadRounds,
    /// Proposals or a commit advance wait to be broadcast at the next `ready`,
    /// so that everything proposed in between goes out in one batch.
    broadcast: Broadcast,
    /// A leadership transfer under way.
    transfer: Option<Transfer>,
    /// A `TimeoutNow` went out in this term: its target campaigns past every
    /// lease, so this leader's lease can no longer be trusted.
    lease_revoked: bool,
}

/// A leadership transfer under way (thesis §3.10).
#[derive(Debug, Clone, Copy)]
struct Transfer {
    /// The voter becoming leader.
    to: NodeId,
    /// Ticks since it began; it is abandoned after an election timeout.
    elapsed: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Broadcast {
    None,
    /// Send new entries where the window allows.
    Entries,
    /// Also send empty appends: followers must learn a new commit index.
    Commit,
}

/// Messages produced while handling inputs, sorted by whether they may leave
/// before the current batch of writes is durable.
#[derive(Debug, Default)]
struct Outbox {
    id: NodeId,
    /// The term last made durable, as far as the core has been told. A
    /// message of a later term waits for the write: only a leader elected
    /// by its own vote alone (a single voter, with learners to send to) gets
    /// to send before its new term is durable, and entries of a term that a
    /// crash could forget must not reach anyone.
    durable_term: Term,
    now: Vec<Message>,
    after_persist: Vec<Message>,
    #[cfg(feature = "mutants")]
    vote_before_persist: bool,
    #[cfg(feature = "mutants")]
    ack_before_persist: bool,
}

impl Outbox {
    /// Drop the acknowledgements still waiting for a write that claim
    /// entries at or past `index`: those entries were just replaced in
    /// memory, so the write will not make them durable. (Ones already handed
    /// out wait for a write that does hold them.)
    fn withdraw_acks_from(&mut self, index: Index) {
        self.after_persist.retain(|m| {
            !matches!(
                m.body,
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index })
                    if last_index >= index
            )
        });
    }

    fn send(&mut self, term: Term, to: NodeId, body: MessageBody) {
        let early = match body {
            // Only leaders send these, and a leader's term and vote became
            // durable before it could win; entries count only once durable.
            // `TimeoutNow` promises nothing: the target's log is what counts.
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. }
            | MessageBody::TimeoutNow => true,
            // Reads promise nothing about this node's own state.
            MessageBody::ReadIndexRequest { .. } | MessageBody::ReadIndexResponse { .. } => true,
            // A heartbeat's answer promises only the term (checked below),
            // not entries: it need not wait for a write of entries.
            MessageBody::HeartbeatResponse { .. } => true,
            // Pre-votes change no state.
            MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { .. } => true,
            #[cfg(feature = "mutants")]
            MessageBody::VoteResponse { .. } if self.vote_before_persist => true,
            #[cfg(feature = "mutants")]
            MessageBody::AppendResponse(_) if self.ack_before_persist => true,
            // A vote, a vote request (which carries our own vote) and every
            // acknowledgement promise durable state.
            MessageBody::Vote { .. }
            | MessageBody::VoteResponse { .. }
            | MessageBody::AppendResponse(_) => false,
        };
        // The persist mutants exist to send before anything is durable, the
        // term included; held back by the term, they would inject nothing
        // whenever the message is the first of a new term.
        #[cfg(feature = "mutants")]
        let skips_wait = match body {
            MessageBody::VoteResponse { .. } => self.vote_before_persist,
            MessageBody::AppendResponse(_) | MessageBody::HeartbeatResponse { .. } => {
                self.ack_before_persist
            }
            _ => false,
        };
        #[cfg(not(feature = "mutants"))]
        let skips_wait = false;
        let early = early && (term <= self.durable_term || skips_wait);
        let m = Message {
            from: self.id,
            to,
            term,
            body,
        };
        if early {
            self.now.push(m);
        } else {
            self.after_persist.push(m);
        }
    }
}

/// The consensus core of one node. Deterministic: the same inputs in the
/// same order produce the same outputs.
#[derive(Debug)]
pub struct Raft {
    cfg: Config,
    /// The membership in effect and the configuration entries behind it.
    memberships: MembershipLog,
    term: Term,
    vote: Option<NodeId>,
    leader: Option<NodeId>,
    state: State,
    log: RaftLog,
    election_elapsed: u32,
    heartbeat_elapsed: u32,
    randomized_timeout: u32,
    rng: SplitMix64,
    out: Outbox,
    read_states: Vec<ReadState>,
    dropped_reads: Vec<u64>,
    /// Ticks since this core started: its own clock, for leases and for
    /// expiring forwarded reads.
    ticks: u64,
    /// Reads forwarded to the leader, awaiting its read index: (ctx, tick).
    forwarded: Vec<(u64, u64)>,
    /// A candidate's vote for itself waits for the write that makes it
    /// durable before it counts.
    own_vote_pending: bool,
    /// Until this tick vote requests are ignored (with check-quorum): an
    /// election timeout after this node last heard from a leader.
    lease_until: u64,
    /// Until this tick vote requests are ignored: with lease reads, a
    /// restarted node forgot the leader it heard from, whose lease may
    /// still run.
    quiet_until: u64,
    /// The latest snapshot (taken here or installed): what a follower whose
    /// next entry is compacted away is sent.
    snapshot: Option<SnapshotMeta>,
    /// A received snapshot accepted, to be installed with the next `Ready`.
    pending_install: Option<SnapshotMeta>,
    /// The hard state last handed out in a `Ready`.
    handed_out: HardState,
    /// The hard state of the last `Ready` advanced: durable.
    durable: HardState,
    /// The `Ready`s handed out and not yet advanced, oldest first: their
    /// writes become durable in this order.
    outstanding: VecDeque<InFlight>,
}

/// What one handed-out `Ready` makes durable once advanced.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// Its last entry, if it carried any.
    last: Option<(Index, Term)>,
    /// The log's rewrite count when it was handed out.
    rewrites: u64,
    /// The hard state as of its hand-out.
    hard_state: HardState,
}

impl Raft {
    /// A core starting as a follower from what the node persisted.
    pub fn new(cfg: Config, persisted: Persisted) -> Result<Self, RestoreError> {
        cfg.validate()?;
        let Persisted {
            hard_state: hs,
            snapshot,
            entries,
            applied,
        } = persisted;
        if hs.term > MAX_TERM {
            return Err(RestoreError::TermOutOfRange { term: hs.term });
        }
        let (first, mut prev_term) = snapshot.as_ref().map_or((1, 0), |s| (s.index + 1, s.term));
        if snapshot
            .as_ref()
            .is_some_and(|s| s.term > hs.term || s.index == 0 || s.membership.voters().is_empty())
        {
            return Err(RestoreError::BadSnapshot);
        }
        for (i, e) in entries.iter().enumerate() {
            if e.index != first + i as Index || e.term < prev_term || e.term == 0 {
                return Err(RestoreError::BadEntry {
                    index: e.index,
                    term: e.term,
                });
            }
            if e.term > hs.term {
                return Err(RestoreError::EntryFromFuture {
                    entry_term: e.term,
                    term: hs.term,
                });
            }
            prev_term = e.term;
        }
        let base = match &snapshot {
            Some(s) => s.membership.clone(),
            None => Membership::new(cfg.voters.iter().copied(), [])
                .expect("validated: no reserved id, no learners"),
        };
        let mut memberships = MembershipLog::new(base);
        for e in entries.iter().filter(|e| e.kind == EntryKind::Config) {
            let m = Membership::decode(&e.data).map_err(|error| RestoreError::BadMembership {
                index: e.index,
                error,
            })?;
            memberships.push(e.index, m);
        }
        let last = first - 1 + entries.len() as Index;
        if hs.commit > last || applied > last {
            return Err(RestoreError::BadCommit {
                commit: hs.commit,
                applied,
                last,
            });
        }
        // The state machine starts from the snapshot at least.
        let applied = applied.max(first - 1);
        // The state machine applies only committed entries, and a commit
        // index alone is not synced: the applied index may be the later one.
        let commit = hs.commit.max(applied);
        let hs = HardState { commit, ..hs };
        // A vote need not be for a current voter: the configuration entry
        // that made the candidate one may have been truncated since.
        if hs.vote == Some(0) {
            return Err(RestoreError::ReservedVote);
        }
        let mut raft = Self {
            memberships,
            term: hs.term,
            vote: hs.vote,
            leader: None,
            state: State::Follower,
            log: RaftLog::restore(
                snapshot.as_ref().map_or((0, 0), |s| (s.index, s.term)),
                entries,
                commit,
                applied,
            ),
            snapshot,
            pending_install: None,
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_timeout: 0,
            rng: SplitMix64::new(cfg.seed),
            out: Outbox {
                id: cfg.id,
                durable_term: hs.term,
                #[cfg(feature = "mutants")]
                vote_before_persist: cfg.mutated(Mutation::VoteBeforePersist),
                #[cfg(feature = "mutants")]
                ack_before_persist: cfg.mutated(Mutation::AckBeforePersist),
                ..Outbox::default()
            },
            read_states: Vec::new(),
            dropped_reads: Vec::new(),
            ticks: 0,
            own_vote_pending: false,
            lease_until: 0,
            forwarded: Vec::new(),
            quiet_until: if cfg.lease_reads {
                u64::from(cfg.election_ticks)
            } else {
                0
            },
            handed_out: hs,
            durable: hs,
            outstanding: VecDeque::new(),
            cfg,
        };
        raft.reset_timers();
        raft.debug_check_invariants();
        Ok(raft)
    }

    /// Whether a bug is injected on purpose (only with the `mutants` feature).
    pub(crate) fn is_mutated(&self) -> bool {
        #[cfg(feature = "mutants")]
        return self.cfg.mutation.is_some();
        #[cfg(not(feature = "mutants"))]
        false
    }

    /// How this core was configured.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.cfg.id
    }

    /// Current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Vote cast in the current term.
    pub fn vote(&self) -> Option<NodeId> {
        self.vote
    }

    /// The leader of the current term, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// Current role.
    pub fn role(&self) -> Role {
        match self.state {
            State::Follower => Role::Follower,
            State::PreCandidate(_) => Role::PreCandidate,
            State::Candidate(_) => Role::Candidate,
            State::Leader(_) => Role::Leader,
        }
    }

    /// The in-memory log, durable prefix and unstable suffix.
    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    /// Current hard state (not necessarily durable yet).
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed(),
        }
    }

    /// The membership in effect: that of the last configuration entry in
    /// the log, committed or not.
    pub fn membership(&self) -> &Membership {
        self.memberships.current()
    }

    /// Index of the configuration entry in effect (0: the bootstrap one).
    pub fn membership_index(&self) -> Index {
        self.memberships.current_index()
    }

    /// Replication progress of `peer`, when leader.
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        match &self.state {
            State::Leader(l) => l.progress.get(&peer),
            _ => None,
        }
    }

    /// One unit of logical time. Drives elections and heartbeats.
    pub fn tick(&mut self) {
        self.tick_inner();
        self.debug_check_invariants();
    }

    fn tick_inner(&mut self) {
        self.ticks += 1;
        self.expire_forwarded();
        self.election_elapsed = self.election_elapsed.saturating_add(1);
        if !matches!(self.state, State::Leader(_)) {
            if self.election_elapsed >= self.randomized_timeout {
                self.campaign();
            }
            return;
        }
        self.heartbeat_elapsed += 1;
        if let State::Leader(l) = &mut self.state {
            for pr in l.progress.values_mut() {
                pr.tick(self.cfg.max_inflight_messages);
            }
        }
        self.tick_transfer();
        if self.election_elapsed >= self.cfg.election_ticks {
            self.election_elapsed = 0;
            if self.cfg.check_quorum && !self.quorum_recently_active() {
                // Partitioned away from a quorum: stop serving reads and
                // accepting proposals that cannot commit.
                let term = self.term;
                self.become_follower(term, None);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.cfg.heartbeat_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeat();
        }
    }

    /// Invariants that every input must preserve; checked in debug builds
    /// after each `step`, `tick` and `advance`.
    fn debug_check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let log = &self.log;
        debug_assert!(log.last_term() <= self.term, "log term above current term");
        debug_assert!(log.committed() <= log.last_index(), "commit past the log");
        debug_assert!(
            log.applied() <= log.committed().min(log.stable()),
            "applied uncommitted or non-durable entries"
        );
        debug_assert!(
            log.stable() <= log.handed() && log.handed() <= log.last_index(),
            "stable past the entries handed out, or those past the log"
        );
        match &self.state {
            State::Leader(l) => {
                debug_assert_eq!(self.leader, Some(self.cfg.id));
                debug_assert_eq!(self.vote, Some(self.cfg.id), "a leader voted for itself");
                debug_assert!(
                    l.progress
                        .values()
                        .all(|p| p.matched < p.next && p.matched <= log.last_index())
                );
                let m = self.memberships.current();
                let mut members = m.members();
                members.remove(&self.cfg.id);
                debug_assert!(
                    l.progress.keys().copied().eq(members),
                    "the leader tracks every other member and nobody else"
                );
                debug_assert!(
                    m.is_voter(self.cfg.id) || self.memberships.current_index() > log.committed(),
                    "a leader outside its configuration steps down once it commits"
                );
                debug_assert!(
                    !m.is_joint() || self.memberships.current_index() >= log.committed(),
                    "a committed joint configuration is left at once"
                );
            }
            State::Candidate(_) => {
                debug_assert_eq!(self.vote, Some(self.cfg.id), "a candidate voted for itself");
                debug_assert_eq!(self.leader, None);
            }
            State::PreCandidate(_) => debug_assert_eq!(self.leader, None),
            State::Follower => debug_assert_ne!(self.leader, Some(self.cfg.id)),
        }
    }

    /// Append a normal entry with `data`. Only the leader accepts proposals;
    /// the entry goes out with the next `Ready`.
    pub fn propose(&mut self, data: Bytes) -> Result<Proposal, ProposeError> {
        let State::Leader(l) = &mut self.state else {
            return Err(ProposeError::NotLeader {
                leader: self.leader,
            });
        };
        if let Some(t) = &l.transfer {
            return Err(ProposeError::Transferring { to: t.to });
        }
        let index = self.log.last_index() + 1;
        self.log.append(Entry {
            term: self.term,
            index,
            kind: EntryKind::Normal,
            data,
        });
        l.broadcast = l.broadcast.max(Broadcast::Entries);
        Ok(Proposal {
            index,
            term: self.term,
        })
    }

    /// Feed a message from the network. An `Err` reports a message that
    /// breaks the protocol: a malformed one (a term past [`MAX_TERM`], an
    /// append or heartbeat from a second leader of our term, ...) changes
    /// nothing; an append that would replace committed entries is not applied
    /// (the term and leader it announces may have been adopted).
    pub fn step(&mut self, m: Message) -> Result<(), StepError> {
        let result = self.step_inner(m);
        self.debug_check_invariants();
        result
    }

    fn step_inner(&mut self, m: Message) -> Result<(), StepError> {
        self.validate(&m)?;
        let (is_request, behind) = match m.body {
            MessageBody::Vote {
                last_index,
                last_term,
                ..
            }
            | MessageBody::PreVote {
                last_index,
                last_term,
            } => (true, !self.log.is_up_to_date(last_index, last_term)),
            _ => (false, false),
        };
        if is_request && behind && !self.memberships.current().is_voter(m.from) {
            // A candidate this node knows no vote for, whose log is behind
            // its own: most likely a removed server that never learned of
            // its removal (the entry removing it is in this log). Its vote
            // would be refused anyway; ignoring the request, term and all,
            // keeps it from deposing leaders again and again (thesis
            // §4.2.3). A candidate whose log is not behind may hold a
            // configuration this node has not seen yet, so it is heard:
            // ignoring it could leave a cluster without any electable node.
            return Ok(());
        }
        // A candidate the leader handed over to sets the lease aside.
        let transfer = matches!(m.body, MessageBody::Vote { transfer: true, .. });
        if is_request
            && !transfer
            && m.term >= self.term
            && (self.in_lease() || self.ticks < self.quiet_until)
        {
            // We heard from a live leader within the minimum election
            // timeout: a node that cannot hear it must not depose it. Of the
            // same term too: a stale answer of a later term may have made
            // this node adopt that term and forget its leader and vote, and
            // the promise holds all the same. (A request of an older term is
            // answered below: it tells a lagging candidate the term.)
            return Ok(());
        }
        if m.term > self.term {
            match m.body {
                // Neither a pre-vote request nor a granted pre-vote (which
                // carries the term the sender would campaign in) is evidence
                // of a real higher term.
                MessageBody::PreVote { .. } | MessageBody::PreVoteResponse { granted: true } => {}
                MessageBody::Append { .. }
                | MessageBody::Heartbeat { .. }
                | MessageBody::Snapshot { .. }
                | MessageBody::TimeoutNow
                | MessageBody::ReadIndexResponse { .. } => {
                    self.become_follower(m.term, Some(m.from))
                }
                MessageBody::Vote { .. } => {
                    // Adopt the term but keep counting towards our own
                    // timeout (Raft figure 2: only a granted vote or a leader
                    // resets it). Otherwise candidates that cannot win, each
                    // asking with a higher term, keep resetting the one node
                    // whose log could win, and the election never ends.
                    let timer = (self.election_elapsed, self.randomized_timeout);
                    self.become_follower(m.term, None);
                    (self.election_elapsed, self.randomized_timeout) = timer;
                }
                _ => self.become_follower(m.term, None),
            }
        } else if m.term < self.term {
            match m.body {
                // Tell a stale leader about the new term, or it would keep
                // waiting: with check-quorum it gets no vote requests.
                MessageBody::Append { .. } | MessageBody::Heartbeat { .. } => self.out.send(
                    self.term,
                    m.from,
                    MessageBody::HeartbeatResponse { read_round: 0 },
                ),
                MessageBody::PreVote { .. } => self.out.send(
                    self.term,
                    m.from,
                    MessageBody::PreVoteResponse { granted: false },
                ),
                // "Reply false if term < currentTerm" (figure 2): the answer
                // carries the newer term, which a candidate that no node
                // of a higher term ever writes to has no other way to learn.
                MessageBody::Vote { .. } => self.out.send(
                    self.term,
                    m.from,
                    MessageBody::VoteResponse { granted: false },
                ),
                _ => {}
            }
            return Ok(());
        }

        match m.body {
            MessageBody::Vote {
                last_index,
                last_term,
                ..
            } => self.handle_vote_request(m.from, m.term, last_index, last_term, false),
            MessageBody::PreVote {
                last_index,
                last_term,
            } => self.handle_vote_request(m.from, m.term, last_index, last_term, true),
            MessageBody::PreVoteResponse { granted } => {
                self.handle_vote_response(m.from, m.term, granted, true)
            }
            MessageBody::VoteResponse { granted } => {
                self.handle_vote_response(m.from, m.term, granted, false)
            }
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
            } => {
                self.hear_from_leader(m.from)?;
                self.handle_append(m.from, prev_index, prev_term, &entries, commit)?;
            }
            MessageBody::Heartbeat { commit, read_round } => {
                self.hear_from_leader(m.from)?;
                // `commit` is at most what the leader knows we store; a value
                // past our log can only come from a broken sender.
                if commit <= self.log.last_index() {
                    self.log.commit_to(commit);
                }
                self.out.send(
                    self.term,
                    m.from,
                    MessageBody::HeartbeatResponse { read_round },
                );
            }
            MessageBody::AppendResponse(outcome) => self.handle_append_response(m.from, outcome)?,
            MessageBody::HeartbeatResponse { read_round } => {
                self.handle_heartbeat_response(m.from, read_round)
            }
            MessageBody::TimeoutNow => self.handle_timeout_now(m.from),
            MessageBody::Snapshot { meta } => {
                self.hear_from_leader(m.from)?;
                self.handle_snapshot(m.from, meta);
            }
            MessageBody::ReadIndexRequest { ctx } => self.handle_read_request(m.from, ctx),
            MessageBody::ReadIndexResponse { ctx, index } => {
                self.handle_read_response(m.from, ctx, index)
            }
        }
        Ok(())
    }

    /// Whether `ready` would return a batch.
    pub fn has_ready(&self) -> bool {
        !self.out.now.is_empty()
            || self.pending_install.is_some()
            || !self.out.after_persist.is_empty()
            || !self.log.unhanded().is_empty()
            || self.hard_state() != self.handed_out
            || self.log.has_committed_to_apply()
            || !self.read_states.is_empty()
            || !self.dropped_reads.is_empty()
            || matches!(&self.state, State::Leader(l) if l.broadcast != Broadcast::None)
    }

    /// The messages that may leave now, even while a `Ready`'s write is
    /// outstanding: those that promise nothing a write holds (the kinds of
    /// [`Ready::messages`]). A leader keeps replicating, and a follower keeps
    /// answering heartbeats, during a long fsync.
    pub fn take_early_messages(&mut self) -> Vec<Message> {
        self.flush_broadcast();
        self.withdraw_stale_timeout_now();
        std::mem::take(&mut self.out.now)
    }

    /// The next batch of work, if any. Several may be outstanding at once
    /// (the driver bounds how many): each carries the entries not yet handed
    /// out (after a truncation, that includes indexes an earlier one holds:
    /// writes are applied in order, each replacing from its first index),
    /// and they are advanced in the order handed out.
    pub fn ready(&mut self) -> Option<Ready> {
        self.flush_broadcast();
        self.withdraw_stale_timeout_now();
        if !self.has_ready() {
            return None;
        }
        let hs = self.hard_state();
        let hard_state = (hs != self.handed_out).then_some(hs);
        self.handed_out = hs;
        let rewrites = self.log.rewrites();
        let entries = self.log.hand_out();
        self.outstanding.push_back(InFlight {
            last: entries.last().map(|e| (e.index, e.term)),
            rewrites,
            hard_state: hs,
        });
        Some(Ready {
            snapshot: self.pending_install.take(),
            hard_state,
            entries,
            messages: std::mem::take(&mut self.out.now),
            persisted_messages: std::mem::take(&mut self.out.after_persist),
            committed_entries: self.log.take_committed(),
            read_states: std::mem::take(&mut self.read_states),
            dropped_reads: std::mem::take(&mut self.dropped_reads),
        })
    }

    /// The oldest outstanding `Ready`'s entries and hard state are durable
    /// (and so are those of every `Ready` handed out before it).
    ///
    /// # Panics
    /// If no `Ready` is outstanding (a driver bug).
    pub fn advance(&mut self) {
        let done = self
            .outstanding
            .pop_front()
            .expect("advance() without an outstanding ready()");
        self.durable = done.hard_state;
        self.out.durable_term = done.hard_state.term;
        if let Some((index, term)) = done.last {
            self.log.stable_to(index, term, done.rewrites);
        }
        self.count_own_vote_if_durable();
        if matches!(self.state, State::Leader(_)) {
            // Our own copy now counts towards the quorum.
            self.maybe_commit();
        }
        self.debug_check_invariants();
    }

    /// How many `Ready`s are handed out and not yet advanced.
    pub fn outstanding_readies(&self) -> usize {
        self.outstanding.len()
    }

    fn validate(&self, m: &Message) -> Result<(), StepError> {
        if m.to != self.cfg.id {
            return Err(StepError::WrongRecipient {
                to: m.to,
                me: self.cfg.id,
            });
        }
        // Any other node may write: a leader this node does not know as a
        // member yet (its configuration entry has not arrived), or a removed
        // one. Whom a message may affect is decided where it is handled.
        if m.from == 0 || m.from == self.cfg.id {
            return Err(StepError::UnknownSender(m.from));
        }
        let malformed = |reason| {
            Err(StepError::Malformed {
                from: m.from,
                reason,
            })
        };
        // Past MAX_TERM, adopting the term (or campaigning after it) would
        // overflow; no correct peer gets there.
        let term_in_range = match &m.body {
            MessageBody::PreVote { last_term, .. } | MessageBody::Vote { last_term, .. } => {
                *last_term <= MAX_TERM
            }
            MessageBody::Append {
                prev_term, entries, ..
            } => *prev_term <= MAX_TERM && entries.iter().all(|e| e.term <= MAX_TERM),
            MessageBody::AppendResponse(AppendOutcome::Rejected { hint_term, .. }) => {
                *hint_term <= MAX_TERM
            }
            MessageBody::PreVoteResponse { .. }
            | MessageBody::VoteResponse { .. }
            | MessageBody::AppendResponse(AppendOutcome::Accepted { .. })
            | MessageBody::Heartbeat { .. }
            | MessageBody::HeartbeatResponse { .. }
            | MessageBody::TimeoutNow
            | MessageBody::ReadIndexRequest { .. }
            | MessageBody::ReadIndexResponse { .. } => true,
            MessageBody::Snapshot { meta } => {
                if meta.index == 0 || meta.membership.voters().is_empty() {
                    return malformed("snapshot at index 0 or without voters");
                }
                // Half the range, as for terms: every `index + 1` stays in range.
                if meta.index > MAX_TERM {
                    return malformed("snapshot index out of range");
                }
                meta.term <= m.term
            }
        };
        if m.term > MAX_TERM || !term_in_range {
            return malformed("term out of range");
        }
        if let MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            ..
        } = &m.body
        {
            let mut expected = *prev_index;
            let mut term = *prev_term;
            for e in entries {
                expected = match expected.checked_add(1) {
                    Some(next) => next,
                    None => return malformed("append entries past the largest index"),
                };
                if e.index != expected {
                    return malformed("append entries are not contiguous");
                }
                if e.term < term || e.term > m.term {
                    return malformed("append entry terms out of order");
                }
                if e.kind == EntryKind::Config && Membership::decode(&e.data).is_err() {
                    return malformed("undecodable configuration entry");
                }
                term = e.term;
            }
        }
        Ok(())
    }
}

/// Send `to` the next entries its progress allows, as many messages as the
/// inflight window takes. An empty append is sent only if `allow_empty` (to
/// carry a commit index or detect lost appends) or to probe.
#[allow(clippy::too_many_arguments)]
fn send_append(
    out: &mut Outbox,
    log: &RaftLog,
    snapshot: Option<&SnapshotMeta>,
    cfg: &Config,
    term: Term,
    to: NodeId,
    pr: &mut Progress,
    allow_empty: bool,
) {
    let mut allow_empty = allow_empty;
    while pr.can_send(cfg.max_inflight_messages) {
        let prev_index = pr.next - 1;
        let Some(prev_term) = log.term(prev_index) else {
            // The follower's next entry is compacted away: it needs the
            // snapshot, which the driver streams alongside this message.
            let snapshot = snapshot.expect("a compacted log has a snapshot");
            debug_assert!(prev_index < snapshot.index);
            pr.become_snapshot(snapshot.index);
            out.send(
                term,
                to,
                MessageBody::Snapshot {
                    meta: snapshot.clone(),
                },
            );
            return;
        };
        let entries = log.slice_for_message(
            pr.next,
            cfg.max_entries_per_message,
            cfg.max_bytes_per_message,
        );
        let probing = matches!(pr.state, ReplicationState::Probe { .. });
        if entries.is_empty() && !allow_empty && !probing {
            return;
        }
        allow_empty = false;
        let last = prev_index + entries.len() as Index;
        let empty = entries.is_empty();
        pr.sent(last, !empty);
        #[cfg(feature = "mutants")]
        if cfg.mutated(Mutation::MatchOnSend)
            && !empty
            && matches!(pr.state, ReplicationState::Replicate { .. })
        {
            pr.matched = pr.matched.max(last);
        }
        out.send(
            term,
            to,
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit: log.committed(),
            },
        );
        if empty {
            return;
        }
    }
}
