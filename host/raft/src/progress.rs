//! The leader's view of each follower's replication.

use std::collections::VecDeque;

use crate::types::Index;

/// How the leader sends entries to one follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// The follower's match point is unknown: one `Append` at a time until
    /// one is accepted. `paused` while that append is unanswered (a heartbeat
    /// response unpauses, so a lost probe is retried).
    Probe {
        /// An append is outstanding.
        paused: bool,
    },
    /// The follower is known to match: appends are pipelined optimistically,
    /// at most `max_inflight_messages` unacknowledged at once.
    Replicate {
        /// Last index of each unacknowledged append, oldest first.
        inflight: VecDeque<Index>,
    },
}

/// Replication progress of one follower.
#[derive(Clone, Debug)]
pub struct Progress {
    /// Highest index known to be replicated (durably) on the follower.
    pub matched: Index,
    /// Next index to send.
    pub next: Index,
    /// Probe or replicate.
    pub state: ReplicationState,
    /// Heard from since the last check-quorum round.
    pub(crate) recent_active: bool,
    /// Highest ReadIndex round the follower has acknowledged in this term.
    pub(crate) read_ack: u64,
}

impl Progress {
    pub(crate) fn new(next: Index) -> Self {
        Self {
            matched: 0,
            next,
            state: ReplicationState::Probe { paused: false },
            recent_active: false,
            read_ack: 0,
        }
    }

    /// Whether another append may be sent now.
    pub(crate) fn can_send(&self, max_inflight: usize) -> bool {
        match &self.state {
            ReplicationState::Probe { paused } => !paused,
            ReplicationState::Replicate { inflight } => inflight.len() < max_inflight,
        }
    }

    /// Record that an append ending at `last` was sent (`entries` non-empty).
    pub(crate) fn sent(&mut self, last: Index, had_entries: bool) {
        match &mut self.state {
            ReplicationState::Probe { paused } => *paused = true,
            ReplicationState::Replicate { inflight } => {
                if had_entries {
                    debug_assert!(inflight.back().is_none_or(|&b| b < last));
                    inflight.push_back(last);
                    self.next = last + 1;
                }
            }
        }
    }

    /// The follower matches up to `index`. Returns whether that was news.
    pub(crate) fn accepted(&mut self, index: Index) -> bool {
        let news = index > self.matched;
        if news {
            self.matched = index;
        }
        self.next = self.next.max(index + 1);
        match &mut self.state {
            // Matched entries are durable on the follower and can only be
            // replaced by a leader of a later term, so any acceptance gives a
            // reliable starting point for pipelining.
            ReplicationState::Probe { .. } => self.become_replicate(),
            ReplicationState::Replicate { inflight } => {
                while inflight.front().is_some_and(|&f| f <= index) {
                    inflight.pop_front();
                }
            }
        }
        news
    }

    /// An append with `prev_index == rejected` was refused; `hint` is the
    /// follower's (possibly leader-refined) guess of the last matching index.
    /// Returns whether the rejection was current (not a stale duplicate).
    pub(crate) fn rejected(&mut self, rejected: Index, hint: Index) -> bool {
        match &self.state {
            ReplicationState::Replicate { .. } => {
                if rejected <= self.matched {
                    return false;
                }
                self.next = (hint + 1).min(rejected).max(self.matched + 1);
                self.state = ReplicationState::Probe { paused: false };
                true
            }
            ReplicationState::Probe { .. } => {
                if self.next.checked_sub(1) != Some(rejected) {
                    return false;
                }
                self.next = (hint + 1).min(rejected).max(self.matched + 1);
                self.state = ReplicationState::Probe { paused: false };
                true
            }
        }
    }

    fn become_replicate(&mut self) {
        self.next = self.matched + 1;
        self.state = ReplicationState::Replicate {
            inflight: VecDeque::new(),
        };
    }

    /// Heartbeat response: the follower is alive. Retry a probe, and free
    /// the oldest slot of a full window: its append may have been lost, and
    /// without a slot nothing would be sent to find out (the follower
    /// rejects the next append if so, which falls back to probing).
    pub(crate) fn heard_from(&mut self, max_inflight: usize) {
        match &mut self.state {
            ReplicationState::Probe { paused } => *paused = false,
            ReplicationState::Replicate { inflight } => {
                if inflight.len() >= max_inflight {
                    inflight.pop_front();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_then_replicate_pipelines_up_to_window() {
        let mut p = Progress::new(11);
        assert!(p.can_send(2));
        p.sent(12, true);
        assert!(!p.can_send(2), "a probe waits for its answer");
        assert!(p.accepted(12));
        assert!(matches!(p.state, ReplicationState::Replicate { .. }));
        assert_eq!(p.next, 13);
        p.sent(14, true);
        p.sent(16, true);
        assert!(!p.can_send(2), "window of two is full");
        p.accepted(14);
        assert!(p.can_send(2));
        assert_eq!(p.next, 17);
    }

    #[test]
    fn stale_rejections_are_ignored() {
        let mut p = Progress::new(11);
        p.sent(12, true);
        assert!(!p.rejected(5, 0), "not the outstanding probe");
        assert!(p.rejected(10, 7));
        assert_eq!(p.next, 8);
        assert!(p.can_send(1));
    }

    #[test]
    fn rejection_in_replicate_falls_back_to_probe() {
        let mut p = Progress::new(1);
        p.accepted(5);
        p.sent(9, true);
        assert!(!p.rejected(4, 0), "below match: stale");
        assert!(p.rejected(6, 6));
        assert_eq!(p.next, 6);
        assert_eq!(p.state, ReplicationState::Probe { paused: false });
    }
}
