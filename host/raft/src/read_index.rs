//! ReadIndex (Raft thesis §6.4) with batching, and the leader lease that
//! lease reads rely on (§6.4.1).
//!
//! Every heartbeat broadcast is a numbered round. A read waits for the first
//! round started after it arrived; all reads that arrive while a round is in
//! flight share the next one, so any number of concurrent reads costs at most
//! two rounds of heartbeats. A follower's acknowledgement of a round also
//! acknowledges every earlier one. With lease reads on, the tick each round
//! was sent is kept: once a quorum acknowledged a round, no other leader can
//! be elected for an election timeout (less a drift margin) from its sending.

use std::collections::VecDeque;

use crate::types::{Index, NodeId};

/// Who asked for a read: this node's driver, or a follower that forwarded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadRequest {
    /// The asker's context.
    pub(crate) ctx: u64,
    /// The follower to answer, `None` for a local read.
    pub(crate) from: Option<NodeId>,
}

#[derive(Debug, Default)]
pub(crate) struct ReadRounds {
    /// Id of the most recently started round; unique within a leadership.
    last_id: u64,
    in_flight: Option<Round>,
    waiting: Vec<ReadRequest>,
    /// (round, tick it was sent) of the rounds not yet known to be
    /// acknowledged by a quorum, oldest first; kept only for lease reads.
    sent: VecDeque<(u64, u64)>,
    /// Tick at which the newest round a quorum acknowledged was sent.
    lease_from: Option<u64>,
}

#[derive(Debug)]
struct Round {
    id: u64,
    /// Commit index when the round started, i.e. after every read in it arrived.
    index: Index,
    reqs: Vec<ReadRequest>,
}

impl ReadRounds {
    pub(crate) fn request(&mut self, req: ReadRequest) {
        self.waiting.push(req);
    }

    /// Reads waiting for the next round.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The newest round, to put on heartbeats (0: none yet).
    pub(crate) fn latest(&self) -> u64 {
        self.last_id
    }

    /// Number a new round sent at `tick` (`keep_tick` with lease reads on).
    pub(crate) fn next_round(&mut self, tick: u64, keep_tick: bool) -> u64 {
        self.last_id += 1;
        if keep_tick {
            self.sent.push_back((self.last_id, tick));
        }
        self.last_id
    }

    /// Start a round for the waiting requests if none is in flight. The caller
    /// guarantees the leader has committed an entry of its term, so `commit`
    /// is at least the commit index of any earlier leader. Returns the new
    /// round's id, to be sent on heartbeats.
    pub(crate) fn maybe_start(&mut self, commit: Index, tick: u64, keep_tick: bool) -> Option<u64> {
        if self.in_flight.is_some() || self.waiting.is_empty() {
            return None;
        }
        let id = self.next_round(tick, keep_tick);
        self.in_flight = Some(Round {
            id,
            index: commit,
            reqs: std::mem::take(&mut self.waiting),
        });
        Some(id)
    }

    /// If a quorum acknowledged the round in flight (`quorum_acked` answers
    /// for a round id), completes it, handing each request with its index to
    /// `out`.
    pub(crate) fn maybe_confirm(
        &mut self,
        quorum_acked: impl Fn(u64) -> bool,
        out: &mut Vec<(ReadRequest, Index)>,
    ) -> bool {
        let Some(round) = &self.in_flight else {
            return false;
        };
        if !quorum_acked(round.id) {
            return false;
        }
        let round = self.in_flight.take().expect("checked above");
        out.extend(round.reqs.into_iter().map(|r| (r, round.index)));
        true
    }

    /// A quorum has acknowledged every round up to `round`: the lease runs
    /// from the tick that one was sent.
    pub(crate) fn quorum_acked(&mut self, round: u64) {
        while let Some(&(id, tick)) = self.sent.front() {
            if id > round {
                break;
            }
            self.lease_from = Some(tick);
            self.sent.pop_front();
        }
    }

    /// Tick at which the newest round known to be acknowledged by a quorum
    /// was sent.
    pub(crate) fn lease_from(&self) -> Option<u64> {
        self.lease_from
    }

    /// Tick at which the newest round was sent (what a lease would run from
    /// if acknowledgements did not matter: only the mutant that ignores them
    /// asks).
    #[cfg(feature = "mutants")]
    pub(crate) fn newest_sent(&self) -> Option<u64> {
        self.sent.back().map(|&(_, tick)| tick).or(self.lease_from)
    }

    /// Every request not yet confirmed, for failing them on step-down.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = ReadRequest> + '_ {
        self.in_flight
            .take()
            .into_iter()
            .flat_map(|r| r.reqs)
            .chain(self.waiting.drain(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(ctx: u64) -> ReadRequest {
        ReadRequest { ctx, from: None }
    }

    #[test]
    fn reads_share_a_round_and_later_rounds_confirm_earlier_ones() {
        let mut r = ReadRounds::default();
        r.request(local(1));
        let id = r.maybe_start(7, 0, false).unwrap();
        r.request(local(2));
        assert_eq!(r.maybe_start(7, 0, false), None, "one round in flight");
        let mut out = Vec::new();
        assert!(!r.maybe_confirm(|acked| acked > id, &mut out));
        assert!(r.maybe_confirm(|acked| acked >= id, &mut out));
        assert_eq!(out, [(local(1), 7)]);
        let next = r.maybe_start(9, 0, false).unwrap();
        assert!(next > id);
        assert_eq!(r.drain().collect::<Vec<_>>(), [local(2)]);
    }

    #[test]
    fn the_lease_runs_from_the_sending_of_the_acknowledged_round() {
        let mut r = ReadRounds::default();
        let a = r.next_round(10, true);
        let b = r.next_round(12, true);
        assert_eq!(r.lease_from(), None);
        r.quorum_acked(a);
        assert_eq!(r.lease_from(), Some(10));
        r.quorum_acked(a);
        assert_eq!(r.lease_from(), Some(10), "an old round changes nothing");
        r.quorum_acked(b);
        assert_eq!(r.lease_from(), Some(12));
    }
}
