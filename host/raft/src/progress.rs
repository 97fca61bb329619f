//! The leader's view of each follower's replication.

use std::collections::VecDeque;

use crate::types::Index;

/// How the leader sends entries to one follower.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicationState {
    /// The follower's match point is unknown: one `Append` at a time until
    /// one is accepted. `paused` while that append is unanswered (a heartbeat
    /// response unpauses, so a lost probe is retried).
    ///
    /// Also the fallback of a window that stayed full, with nothing
    /// accepted, for a whole election timeout while the follower answered
    /// heartbeats: its appends are taken as lost and probing restarts from
    /// `matched + 1`.
    Probe {
        /// An append is outstanding.
        paused: bool,
    },
    /// The follower is known to match: appends are pipelined optimistically,
    /// at most `max_inflight_messages` unacknowledged at once. Only an
    /// acknowledgement frees a slot: a heartbeat response says the follower
    /// is alive, not that it keeps up.
    Replicate {
        /// Last index of each unacknowledged append, oldest first.
        inflight: VecDeque<Index>,
    },
    /// The follower's next entry is compacted away: the snapshot at `index`
    /// is being sent, and nothing else until the driver reports on it (or a
    /// whole election timeout passes with the follower answering heartbeats
    /// and nothing accepted: the report was lost).
    Snapshot {
        /// The snapshot's last index.
        index: Index,
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
    /// Ticks the window has been full with nothing accepted.
    full_ticks: u32,
}

impl Progress {
    pub(crate) fn new(next: Index) -> Self {
        Self {
            matched: 0,
            next,
            state: ReplicationState::Probe { paused: false },
            recent_active: false,
            read_ack: 0,
            full_ticks: 0,
        }
    }

    /// Whether another append may be sent now.
    pub(crate) fn can_send(&self, max_inflight: usize) -> bool {
        match &self.state {
            ReplicationState::Probe { paused } => !paused,
            ReplicationState::Replicate { inflight } => inflight.len() < max_inflight,
            ReplicationState::Snapshot { .. } => false,
        }
    }

    /// The snapshot at `index` is being sent.
    pub(crate) fn become_snapshot(&mut self, index: Index) {
        self.full_ticks = 0;
        self.state = ReplicationState::Snapshot { index };
    }

    /// The driver reported on the snapshot at `index`: probe after it if it
    /// was delivered (the follower's acceptance moves it to replicate), or
    /// from the match again if not.
    pub(crate) fn snapshot_done(&mut self, index: Index, delivered: bool) {
        self.next = if delivered {
            index + 1
        } else {
            self.matched + 1
        };
        self.state = ReplicationState::Probe { paused: false };
    }

    /// Record that an append ending at `last` was sent (`entries` non-empty).
    pub(crate) fn sent(&mut self, last: Index, had_entries: bool) {
        match &mut self.state {
            ReplicationState::Probe { paused } => *paused = true,
            ReplicationState::Snapshot { .. } => {
                debug_assert!(false, "nothing is sent while a snapshot is");
            }
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
        self.full_ticks = 0;
        self.next = self.next.max(index + 1);
        match &mut self.state {
            // Matched entries are durable on the follower and can only be
            // replaced by a leader of a later term, so any acceptance gives a
            // reliable starting point for pipelining. (A follower that
            // accepted installs the snapshot, or already had its entries.)
            ReplicationState::Probe { .. } => self.become_replicate(),
            // Only an acceptance reaching the snapshot ends its transfer. A
            // lower one (a late answer to an append sent before it) leaves
            // the follower needing entries that are compacted away:
            // replicating from its match would send the snapshot a second
            // time while the first is still being streamed.
            ReplicationState::Snapshot { index: pending } => {
                if index >= *pending {
                    self.become_replicate();
                }
            }
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
            // An answer to an append sent before the snapshot: stale.
            ReplicationState::Snapshot { .. } => false,
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

    /// One tick of the leader: counts how long a full window has gone
    /// without an acceptance.
    pub(crate) fn tick(&mut self, max_inflight: usize) {
        match &self.state {
            ReplicationState::Replicate { inflight } if inflight.len() >= max_inflight => {
                self.full_ticks = self.full_ticks.saturating_add(1);
            }
            ReplicationState::Snapshot { .. } => {
                self.full_ticks = self.full_ticks.saturating_add(1);
            }
            _ => self.full_ticks = 0,
        }
    }

    /// Heartbeat response: the follower is alive. Retries a probe
    /// (`retry_probe`, always but for a mutant). A full window is left
    /// alone, or a slow follower would be sent one more append per
    /// heartbeat. But a follower that still answers heartbeats while a full
    /// window has gone unacknowledged for `stall_ticks` (an election timeout:
    /// far longer than any round trip a live cluster sees) most likely lost
    /// those appends, and nothing else would ever be sent to find out:
    /// probing restarts from `matched + 1`. A heartbeat response cannot tell
    /// by itself, since it may answer a heartbeat sent before the window
    /// filled; tagging heartbeats would allow a faster rule.
    pub(crate) fn heard_from(&mut self, max_inflight: usize, retry_probe: bool, stall_ticks: u32) {
        match &mut self.state {
            ReplicationState::Probe { paused } => {
                if retry_probe {
                    *paused = false;
                }
            }
            ReplicationState::Replicate { inflight } => {
                if inflight.len() >= max_inflight && self.full_ticks >= stall_ticks {
                    self.next = self.matched + 1;
                    self.state = ReplicationState::Probe { paused: false };
                    self.full_ticks = 0;
                }
            }
            ReplicationState::Snapshot { .. } => {
                if self.full_ticks >= stall_ticks {
                    self.next = self.matched + 1;
                    self.state = ReplicationState::Probe { paused: false };
                    self.full_ticks = 0;
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

    /// Leader at 20, follower matched at 4, a window of two appends in flight.
    fn full_window() -> Progress {
        let mut p = Progress::new(1);
        p.accepted(4);
        p.sent(7, true);
        p.sent(10, true);
        assert!(!p.can_send(2));
        p
    }

    fn tick(p: &mut Progress, ticks: u32) {
        for _ in 0..ticks {
            p.tick(2);
        }
    }

    #[test]
    fn heartbeat_response_leaves_a_full_window_full() {
        let mut p = full_window();
        tick(&mut p, 9);
        p.heard_from(2, true, 10);
        assert!(!p.can_send(2), "alive is not caught up");
        let ReplicationState::Replicate { inflight } = &p.state else {
            panic!("still replicating");
        };
        assert_eq!(inflight.len(), 2);
        assert_eq!(p.next, 11);
    }

    #[test]
    fn a_window_full_for_the_stall_time_is_probed_from_the_match() {
        let mut p = full_window();
        tick(&mut p, 10);
        p.heard_from(2, true, 10);
        assert_eq!(p.state, ReplicationState::Probe { paused: false });
        assert_eq!(p.next, 5);
        assert_eq!(p.matched, 4);
        p.sent(7, true);
        assert!(!p.can_send(2), "one probe at a time");
        assert!(p.accepted(7));
        assert!(matches!(p.state, ReplicationState::Replicate { .. }));
        assert_eq!(p.next, 8);
    }

    #[test]
    fn an_acceptance_or_room_in_the_window_restarts_the_count() {
        let mut p = full_window();
        tick(&mut p, 9);
        p.accepted(7);
        p.sent(13, true);
        tick(&mut p, 9);
        p.heard_from(2, true, 10);
        assert!(matches!(p.state, ReplicationState::Replicate { .. }));
        let mut p = full_window();
        tick(&mut p, 9);
        p.tick(3);
        tick(&mut p, 9);
        p.heard_from(2, true, 10);
        assert!(matches!(p.state, ReplicationState::Replicate { .. }));
    }

    #[test]
    fn heartbeat_response_retries_a_paused_probe() {
        let mut p = Progress::new(11);
        p.sent(12, true);
        assert!(!p.can_send(2));
        p.heard_from(2, false, 10);
        assert!(!p.can_send(2), "unless told not to");
        p.heard_from(2, true, 10);
        assert!(p.can_send(2));
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
