//! ReadIndex (Raft thesis §6.4) with batching: all requests that arrive while
//! a confirmation round is in flight share the next round, so any number of
//! concurrent reads costs at most two rounds of heartbeats.

use crate::ready::ReadState;
use crate::types::Index;

#[derive(Debug, Default)]
pub(crate) struct ReadRounds {
    /// Id of the most recently started round; unique within a leadership.
    last_id: u64,
    in_flight: Option<Round>,
    waiting: Vec<u64>,
}

#[derive(Debug)]
struct Round {
    id: u64,
    /// Commit index when the round started, i.e. after every read in it arrived.
    index: Index,
    ctxs: Vec<u64>,
}

impl ReadRounds {
    pub(crate) fn request(&mut self, ctx: u64) {
        self.waiting.push(ctx);
    }

    /// Round id to put on heartbeats (0: none in flight).
    pub(crate) fn current(&self) -> u64 {
        self.in_flight.as_ref().map_or(0, |r| r.id)
    }

    /// Start a round for the waiting requests if none is in flight. The caller
    /// guarantees the leader has committed an entry of its term, so `commit`
    /// is at least the commit index of any earlier leader. Returns the new
    /// round's id, to be sent on heartbeats.
    pub(crate) fn maybe_start(&mut self, commit: Index) -> Option<u64> {
        if self.in_flight.is_some() || self.waiting.is_empty() {
            return None;
        }
        self.last_id += 1;
        self.in_flight = Some(Round {
            id: self.last_id,
            index: commit,
            ctxs: std::mem::take(&mut self.waiting),
        });
        Some(self.last_id)
    }

    /// If a quorum acknowledged the round in flight (`quorum_acked` answers
    /// for a round id), completes it. A follower's acknowledgement of a later
    /// round also confirms earlier ones: it answered a heartbeat sent after
    /// they started.
    pub(crate) fn maybe_confirm(
        &mut self,
        quorum_acked: impl Fn(u64) -> bool,
        out: &mut Vec<ReadState>,
    ) -> bool {
        let Some(round) = &self.in_flight else {
            return false;
        };
        if !quorum_acked(round.id) {
            return false;
        }
        let round = self.in_flight.take().expect("checked above");
        out.extend(round.ctxs.into_iter().map(|ctx| ReadState {
            index: round.index,
            ctx,
        }));
        true
    }

    /// Every request not yet confirmed, for failing them on step-down.
    pub(crate) fn drain(&mut self) -> impl Iterator<Item = u64> + '_ {
        self.in_flight
            .take()
            .into_iter()
            .flat_map(|r| r.ctxs)
            .chain(self.waiting.drain(..))
    }
}
