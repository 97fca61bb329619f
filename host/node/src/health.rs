//! When a node is fit to serve: the rule behind `GET /health`.
//!
//! A node is healthy when it knows a leader (itself included) and its
//! state machines keep up with the log: the applied index may trail the
//! commit index, but it must not stand still behind it for longer than a
//! bound. The daemon uses its request timeout as the bound: past it, every
//! write waiting on this node's machines has timed out anyway, so the node
//! is of no use to a client whatever else it does.

use std::time::{Duration, Instant};

use kythira_raft::NodeId;

/// How long the applied index has stood still behind the commit index.
///
/// Observed at intervals (every tick): time counts from the first
/// observation that found the machines behind, and starts again whenever
/// they have made progress since the last one, so a long backlog that is
/// being worked off is not a stall, and neither is a commit that arrives
/// after a quiet spell.
#[derive(Clone, Debug, Default)]
pub struct ApplyWatch {
    applied: u64,
    behind_since: Option<Instant>,
}

impl ApplyWatch {
    /// Records what the machines have applied and what is committed at `now`.
    pub fn observe(&mut self, now: Instant, applied: u64, commit: u64) {
        if applied >= commit {
            self.behind_since = None;
        } else if applied != self.applied || self.behind_since.is_none() {
            self.behind_since = Some(now);
        }
        self.applied = applied;
    }

    /// How long the machines have been behind without progress, as of `now`.
    pub fn stalled_for(&self, now: Instant) -> Duration {
        self.behind_since
            .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

/// What the health rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HealthInput {
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Highest index known committed.
    pub commit: u64,
    /// Highest index applied.
    pub applied: u64,
    /// How long the applied index has stood still behind `commit`.
    pub apply_stalled: Duration,
    /// The longest such stall that is still healthy.
    pub max_apply_stall: Duration,
}

/// Why a node is not fit to serve, or `None` if it is.
pub fn problem(s: &HealthInput) -> Option<String> {
    if s.leader.is_none() {
        return Some("no leader known".into());
    }
    if s.applied < s.commit && s.apply_stalled > s.max_apply_stall {
        return Some(format!(
            "the state machines have applied nothing for {:.1} s while {} committed entries \
             wait (applied {}, commit {})",
            s.apply_stalled.as_secs_f64(),
            s.commit - s.applied,
            s.applied,
            s.commit
        ));
    }
    None
}

/// A node's answer to a health check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// This node's id.
    pub id: NodeId,
    /// Its role, as `kythira status` names it.
    pub role: &'static str,
    /// Its term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
    /// Highest index known committed.
    pub commit: u64,
    /// Highest index applied.
    pub applied: u64,
    /// Why it is not fit to serve, or `None` if it is.
    pub problem: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(10);

    fn input(leader: Option<NodeId>, commit: u64, applied: u64, stalled_s: u64) -> HealthInput {
        HealthInput {
            leader,
            commit,
            applied,
            apply_stalled: Duration::from_secs(stalled_s),
            max_apply_stall: BOUND,
        }
    }

    #[test]
    fn healthy_with_a_leader_and_machines_that_keep_up() {
        assert_eq!(problem(&input(Some(2), 10, 10, 0)), None);
        // Behind, but not for long: a burst being applied.
        assert_eq!(problem(&input(Some(1), 500, 20, 3)), None);
        // Exactly at the bound is still healthy.
        assert_eq!(problem(&input(Some(1), 500, 20, 10)), None);
    }

    #[test]
    fn no_leader_is_unhealthy_whatever_the_indexes() {
        assert_eq!(
            problem(&input(None, 10, 10, 0)).as_deref(),
            Some("no leader known")
        );
        assert_eq!(
            problem(&input(None, 0, 0, 0)).as_deref(),
            Some("no leader known")
        );
    }

    #[test]
    fn machines_stuck_behind_the_commit_index_are_unhealthy() {
        let why = problem(&input(Some(3), 120, 100, 11)).expect("unhealthy");
        assert!(why.contains("20 committed entries"), "{why}");
        assert!(why.contains("applied 100, commit 120"), "{why}");
        // A stall with nothing left to apply is idleness.
        assert_eq!(problem(&input(Some(3), 100, 100, 60)), None);
    }

    #[test]
    fn a_stall_counts_only_while_nothing_is_applied() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut w = ApplyWatch::default();
        w.observe(t0, 5, 5);
        assert_eq!(w.stalled_for(t0 + s(100)), Duration::ZERO, "caught up");
        // A commit after a quiet spell: counted from when it was seen.
        w.observe(t0 + s(100), 5, 9);
        assert_eq!(w.stalled_for(t0 + s(102)), s(2));
        // Progress, still behind: starts again.
        w.observe(t0 + s(103), 7, 12);
        assert_eq!(w.stalled_for(t0 + s(104)), s(1));
        // No progress: keeps counting from the last progress.
        w.observe(t0 + s(110), 7, 12);
        assert_eq!(w.stalled_for(t0 + s(120)), s(17));
        // Caught up: no stall.
        w.observe(t0 + s(121), 12, 12);
        assert_eq!(w.stalled_for(t0 + s(200)), Duration::ZERO);
    }
}
