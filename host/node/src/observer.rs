//! What the event loop reports about the core: metrics, and the state
//! transitions it logs.
//!
//! The core announces nothing, so transitions are found by comparing its
//! role, term, leader and membership after each pass of the loop with what
//! they were before. The comparison ([`changes`]) is pure; [`Observer`]
//! keeps the last state seen and the few instants the metrics need.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kythira_raft::{NodeId, Raft, Role, Write};

use crate::health::ApplyWatch;
use crate::metrics::{Metrics, role_name};
use crate::node::Leadership;

/// One change between two looks at the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// The role changed (the term may have too).
    Role {
        from: Role,
        to: Role,
        term: u64,
        previous_term: u64,
        /// Why, where the states alone tell.
        reason: Option<&'static str>,
    },
    /// The term moved on, the role did not (a follower that saw a later term).
    Term { from: u64, to: u64, role: Role },
    /// The leader this node knows of changed.
    Leader {
        from: Option<NodeId>,
        to: Option<NodeId>,
        term: u64,
    },
}

/// What changed from `before` to `after`, role first.
pub(crate) fn changes(before: Leadership, after: Leadership) -> Vec<Change> {
    let mut out = Vec::new();
    if before.role != after.role {
        out.push(Change::Role {
            from: before.role,
            to: after.role,
            term: after.term,
            previous_term: before.term,
            reason: reason(before, after),
        });
    } else if before.term != after.term {
        out.push(Change::Term {
            from: before.term,
            to: after.term,
            role: after.role,
        });
    }
    if before.leader != after.leader {
        out.push(Change::Leader {
            from: before.leader,
            to: after.leader,
            term: after.term,
        });
    }
    out
}

/// Why the role changed, where the two states alone say it.
fn reason(before: Leadership, after: Leadership) -> Option<&'static str> {
    match after.role {
        Role::Leader => Some("won the election"),
        Role::PreCandidate => Some("no leader heard from within the election timeout"),
        Role::Candidate if before.role == Role::PreCandidate => Some("won the pre-vote"),
        // An election timeout without pre-vote, or a transfer to this node:
        // the core does not say which.
        Role::Candidate => None,
        Role::Follower if after.term > before.term => Some("saw a later term"),
        Role::Follower if after.leader.is_some() => Some("heard from the leader of its term"),
        // A leader that lost its quorum or left the membership, a lost
        // pre-vote: the core does not say which.
        Role::Follower => None,
    }
}

fn log(id: NodeId, change: &Change) {
    match *change {
        Change::Role {
            from,
            to,
            term,
            previous_term,
            reason,
        } => {
            let (from, to) = (role_name(from), role_name(to));
            match reason {
                Some(reason) => {
                    tracing::info!(node = id, term, previous_term, from, reason, "became {to}")
                }
                None => tracing::info!(node = id, term, previous_term, from, "became {to}"),
            }
        }
        Change::Term { from, to, role } => tracing::info!(
            node = id,
            term = to,
            previous_term = from,
            role = role_name(role),
            "term changed"
        ),
        Change::Leader {
            from,
            to: Some(leader),
            term,
        } => tracing::info!(node = id, term, leader, previous = ?from, "leader changed"),
        Change::Leader {
            from,
            to: None,
            term,
        } => tracing::info!(node = id, term, previous = ?from, "leader lost"),
    }
}

/// The event loop's observer: updates the metrics and logs transitions.
pub(crate) struct Observer {
    metrics: Arc<Metrics>,
    seen: Leadership,
    membership_index: u64,
    /// The (term, leader) last counted in `leader_changes`.
    counted: Option<(u64, NodeId)>,
    /// When the outstanding log write was handed to the disk.
    /// When each outstanding write was handed to the disk, oldest first
    /// (they complete in that order).
    write_started: VecDeque<Instant>,
    apply: ApplyWatch,
    /// Peers whose replication lag is published.
    lag_peers: Vec<NodeId>,
}

fn leadership(raft: &Raft) -> Leadership {
    Leadership {
        role: raft.role(),
        term: raft.term(),
        leader: raft.leader(),
    }
}

impl Observer {
    pub(crate) fn new(metrics: Arc<Metrics>, raft: &Raft) -> Self {
        let seen = leadership(raft);
        metrics.set_role(seen.role);
        metrics.observe_raft(raft);
        Self {
            metrics,
            seen,
            membership_index: raft.membership_index(),
            counted: None,
            write_started: VecDeque::new(),
            apply: ApplyWatch::default(),
            lag_peers: Vec::new(),
        }
    }

    /// After a pass of the loop: the core's state into the metrics, and
    /// every transition since the last pass into the log.
    pub(crate) fn after_pass(&mut self, raft: &Raft) {
        self.metrics.observe_raft(raft);
        let now = leadership(raft);
        if now != self.seen {
            for change in changes(self.seen, now) {
                log(raft.id(), &change);
            }
            if now.role != self.seen.role {
                self.metrics.set_role(now.role);
            }
            self.seen = now;
        }
        if let Some(leader) = now.leader
            && self.counted != Some((now.term, leader))
        {
            self.counted = Some((now.term, leader));
            self.metrics.leader_changes.inc();
        }
        if raft.membership_index() != self.membership_index {
            self.membership_index = raft.membership_index();
            let m = raft.membership();
            tracing::info!(
                node = raft.id(),
                index = self.membership_index,
                committed = self.membership_index <= raft.log().committed(),
                voters = ?m.voters().ids().collect::<Vec<_>>(),
                outgoing = ?m.outgoing().map(|o| o.ids().collect::<Vec<_>>()),
                learners = ?m.learners().collect::<Vec<_>>(),
                "membership changed"
            );
        }
    }

    /// `w` is handed to the disk now.
    pub(crate) fn write_started(&mut self, w: &Write) {
        self.write_started.push_back(Instant::now());
        self.metrics.write_entries.observe(w.entries.len() as f64);
    }

    /// The oldest outstanding write is durable.
    pub(crate) fn write_done(&mut self) {
        if let Some(started) = self.write_started.pop_front() {
            self.metrics
                .fsync_seconds
                .observe(started.elapsed().as_secs_f64());
        }
    }

    /// Once a tick: replication lag, and whether the machines keep up.
    pub(crate) fn tick(&mut self, raft: &Raft, applied: u64) {
        self.apply
            .observe(Instant::now(), applied, raft.log().committed());
        self.replication(raft);
    }

    /// How long the applied index has stood still behind the commit index.
    pub(crate) fn apply_stalled(&self) -> Duration {
        self.apply.stalled_for(Instant::now())
    }

    /// Every peer's lag when leading; nothing otherwise, since a follower's
    /// numbers for the others would be stale.
    fn replication(&mut self, raft: &Raft) {
        let peers: Vec<NodeId> = if raft.role() == Role::Leader {
            let me = raft.id();
            raft.membership()
                .members()
                .into_iter()
                .filter(|p| *p != me)
                .collect()
        } else {
            Vec::new()
        };
        for gone in self.lag_peers.iter().filter(|p| !peers.contains(p)) {
            self.metrics.forget_peer(*gone);
        }
        let last = raft.log().last_index();
        for &peer in &peers {
            if let Some(p) = raft.progress(peer) {
                self.metrics
                    .set_replication_lag(peer, last.saturating_sub(p.matched));
            }
        }
        self.lag_peers = peers;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(role: Role, term: u64, leader: Option<NodeId>) -> Leadership {
        Leadership { role, term, leader }
    }

    #[test]
    fn an_election_won() {
        let follower = at(Role::Follower, 3, Some(2));
        let pre = at(Role::PreCandidate, 3, None);
        assert_eq!(
            changes(follower, pre),
            vec![
                Change::Role {
                    from: Role::Follower,
                    to: Role::PreCandidate,
                    term: 3,
                    previous_term: 3,
                    reason: Some("no leader heard from within the election timeout"),
                },
                Change::Leader {
                    from: Some(2),
                    to: None,
                    term: 3
                },
            ]
        );
        let candidate = at(Role::Candidate, 4, None);
        assert_eq!(
            changes(pre, candidate),
            vec![Change::Role {
                from: Role::PreCandidate,
                to: Role::Candidate,
                term: 4,
                previous_term: 3,
                reason: Some("won the pre-vote"),
            }]
        );
        let leader = at(Role::Leader, 4, Some(1));
        let c = changes(candidate, leader);
        assert!(matches!(
            c[0],
            Change::Role {
                to: Role::Leader,
                reason: Some("won the election"),
                ..
            }
        ));
        assert_eq!(
            c[1],
            Change::Leader {
                from: None,
                to: Some(1),
                term: 4
            }
        );
    }

    #[test]
    fn stepping_down_and_following() {
        // A leader that sees a later term.
        let c = changes(at(Role::Leader, 4, Some(1)), at(Role::Follower, 5, Some(3)));
        assert!(matches!(
            c[0],
            Change::Role {
                from: Role::Leader,
                to: Role::Follower,
                reason: Some("saw a later term"),
                ..
            }
        ));
        // A leader that steps down in its own term: the reason is not known.
        let c = changes(at(Role::Leader, 4, Some(1)), at(Role::Follower, 4, None));
        assert!(matches!(c[0], Change::Role { reason: None, .. }));
        // A candidate that hears from its term's winner.
        let c = changes(at(Role::Candidate, 6, None), at(Role::Follower, 6, Some(2)));
        assert!(matches!(
            c[0],
            Change::Role {
                reason: Some("heard from the leader of its term"),
                ..
            }
        ));
    }

    #[test]
    fn a_follower_moving_on_and_nothing_changing() {
        let f = at(Role::Follower, 2, Some(1));
        assert!(changes(f, f).is_empty());
        assert_eq!(
            changes(f, at(Role::Follower, 3, Some(2))),
            vec![
                Change::Term {
                    from: 2,
                    to: 3,
                    role: Role::Follower
                },
                Change::Leader {
                    from: Some(1),
                    to: Some(2),
                    term: 3
                },
            ]
        );
    }
}
