//! Leaving the cluster cleanly: what a node that was asked to stop does
//! next, decided from what it sees, so that the rule is tested on its own.
//!
//! A stopping node takes no new requests. A leader first lets what it
//! already accepted commit and apply (so those callers get their answers,
//! not "may or may not have applied"), then hands leadership to the voter
//! whose log is furthest along: the others hear from a new leader at once
//! instead of after an election timeout. Every node then waits for its
//! outstanding log writes, so that what it acknowledged is on disk, and
//! stops.

use std::time::{Duration, Instant};

use kythira_raft::{NodeId, Raft, Role};

/// What a stopping node does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Keep running the loop: requests still to answer, a transfer under
    /// way, or a write not yet durable.
    Wait,
    /// Hand leadership to this voter.
    Transfer(NodeId),
    /// Nothing left to do: stop.
    Stop,
}

/// A stop in progress.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Leaving {
    /// When the stop was asked for.
    pub(crate) since: Instant,
    /// The voter leadership was handed to, and when.
    pub(crate) transfer: Option<(NodeId, Instant)>,
    /// How long a leader waits for what it accepted to apply before it
    /// hands over anyway (its callers then learn the outcome is unknown).
    pub(crate) drain_for: Duration,
    /// How long a handover may take before the node stops anyway (the
    /// others then elect a leader after their timeout).
    pub(crate) transfer_for: Duration,
}

impl Leaving {
    /// The next step, given the core, the applied index and whether a log
    /// write is outstanding.
    pub(crate) fn next(&self, raft: &Raft, applied: u64, writing: bool, now: Instant) -> Next {
        if raft.role() == Role::Leader {
            if let Some((_, at)) = self.transfer {
                // Still leading once the core gave the handover up (the
                // target did not catch up or answer within an election
                // timeout): stop; the others elect a leader.
                let under_way = raft.transfer_target().is_some();
                if under_way && now.duration_since(at) < self.transfer_for {
                    return Next::Wait;
                }
            } else {
                let log = raft.log();
                let pending = log.committed() < log.last_index() || applied < log.committed();
                if pending && now.duration_since(self.since) < self.drain_for {
                    return Next::Wait;
                }
                if let Some(to) = successor(raft) {
                    return Next::Transfer(to);
                }
            }
        }
        if writing { Next::Wait } else { Next::Stop }
    }
}

/// The voter other than this node whose log matches the leader's furthest
/// (ties to the lowest id), if any: the one a transfer reaches soonest.
pub(crate) fn successor(raft: &Raft) -> Option<NodeId> {
    let me = raft.id();
    let voters = raft.membership().voters();
    voters
        .ids()
        .filter(|id| *id != me)
        .filter_map(|id| raft.progress(id).map(|p| (p.matched, id)))
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, id)| id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_raft::{
        AppendOutcome, Bytes, Config, Driver, Message, MessageBody, Persisted, Role,
    };

    /// Node 1 leading {1, 2, 3} with its no-op committed, node 3 having
    /// acknowledged more than node 2.
    fn leader() -> Driver {
        let mut cfg = Config::new(1, [1, 2, 3]);
        // Straight to a candidate on its timeout, so the votes below decide.
        cfg.pre_vote = false;
        let mut d = Driver::new(Raft::new(cfg, Persisted::default()).unwrap());
        let settle = |d: &mut Driver| {
            while let Some(b) = d.poll() {
                if b.write.is_some() {
                    let _ = d.persisted();
                }
            }
        };
        while d.raft().role() != Role::Candidate {
            d.tick();
            settle(&mut d);
        }
        let term = d.raft().term();
        for from in [2, 3] {
            d.step(Message {
                from,
                to: 1,
                term,
                body: MessageBody::VoteResponse { granted: true },
            })
            .unwrap();
        }
        settle(&mut d);
        assert_eq!(d.raft().role(), Role::Leader);
        let ack = |from, last_index| Message {
            from,
            to: 1,
            term,
            body: MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }),
        };
        d.step(ack(2, 1)).unwrap();
        d.step(ack(3, 1)).unwrap();
        settle(&mut d);
        d.propose(Bytes::from_static(b"x")).unwrap();
        settle(&mut d);
        d.step(ack(3, 2)).unwrap();
        settle(&mut d);
        d
    }

    fn leaving(since: Instant) -> Leaving {
        Leaving {
            since,
            transfer: None,
            drain_for: Duration::from_secs(5),
            transfer_for: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_leader_hands_over_to_the_voter_furthest_along() {
        let d = leader();
        assert_eq!(successor(d.raft()), Some(3));
        let now = Instant::now();
        let applied = d.raft().log().committed();
        assert_eq!(
            leaving(now).next(d.raft(), applied, false, now),
            Next::Transfer(3)
        );
    }

    #[test]
    fn a_leader_first_lets_what_it_accepted_apply() {
        let d = leader();
        let now = Instant::now();
        let committed = d.raft().log().committed();
        assert_eq!(
            leaving(now).next(d.raft(), committed - 1, false, now),
            Next::Wait,
            "an accepted entry is not applied yet"
        );
        // Not forever: past the drain bound it hands over anyway.
        let later = now + Duration::from_secs(6);
        assert_eq!(
            leaving(now).next(d.raft(), committed - 1, false, later),
            Next::Transfer(3)
        );
    }

    #[test]
    fn a_handover_is_awaited_then_given_up() {
        let mut d = leader();
        let now = Instant::now();
        let mut l = leaving(now);
        l.transfer = Some((3, now));
        let applied = d.raft().log().committed();
        // The core's handover was never started here, so it is not under way.
        assert_eq!(l.next(d.raft(), applied, false, now), Next::Stop);
        d.transfer_leadership(3).unwrap();
        assert_eq!(l.next(d.raft(), applied, false, now), Next::Wait);
        let later = now + Duration::from_secs(3);
        assert_eq!(
            l.next(d.raft(), applied, true, later),
            Next::Wait,
            "a write first"
        );
        assert_eq!(l.next(d.raft(), applied, false, later), Next::Stop);
    }

    #[test]
    fn a_follower_stops_once_its_writes_are_durable() {
        let d = Driver::new(Raft::new(Config::new(2, [1, 2, 3]), Persisted::default()).unwrap());
        let now = Instant::now();
        assert_eq!(leaving(now).next(d.raft(), 0, true, now), Next::Wait);
        assert_eq!(leaving(now).next(d.raft(), 0, false, now), Next::Stop);
    }
}
