//! The replicated table of client sessions, for exactly-once commands
//! (Raft thesis §6.3).
//!
//! Every decision here depends only on the log: a session's id is the index
//! of the entry that registered it, and it expires by leader-assigned log
//! time, never by a replica's clock, so every replica keeps and drops the
//! same sessions.

use std::collections::BTreeMap;

use kythira_api::SessionSeq;

/// Most answers one session keeps for retries. A client that never
/// acknowledges cannot make the table grow without bound: the oldest go first.
pub const MAX_CACHED_PER_SESSION: usize = 1024;

/// What to do with a command that belongs to a session.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<'a, T> {
    /// Apply it, then [`Sessions::record`] the answer.
    Apply,
    /// Already applied: answer with this, do not apply again.
    Duplicate(&'a T),
    /// The session is unknown or expired.
    Expired,
    /// The serial was acknowledged and its answer forgotten; a client that
    /// sends it again is confused about its own numbering.
    Forgotten,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Session<T> {
    ttl_ms: u64,
    last_active_ms: u64,
    /// Serials below this were acknowledged by the client, or their answers
    /// evicted: a retry of one cannot be told from a new command.
    acked: u64,
    answers: BTreeMap<u64, T>,
}

/// Open sessions and their cached answers.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sessions<T> {
    open: BTreeMap<u64, Session<T>>,
    /// Log time of the last sweep for expired sessions.
    swept_ms: u64,
}

impl<T> Default for Sessions<T> {
    fn default() -> Self {
        Self {
            open: BTreeMap::new(),
            swept_ms: 0,
        }
    }
}

/// How often, in log time, the table is swept for expired sessions.
const SWEEP_EVERY_MS: u64 = 1_000;

impl<T> Sessions<T> {
    /// Number of open sessions.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Whether no session is open.
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Opens session `id` (the registering entry's index) at log time `now_ms`.
    pub fn register(&mut self, id: u64, ttl_ms: u64, now_ms: u64) {
        let previous = self.open.insert(
            id,
            Session {
                ttl_ms,
                last_active_ms: now_ms,
                acked: 0,
                answers: BTreeMap::new(),
            },
        );
        assert!(previous.is_none(), "session {id} registered twice");
    }

    /// Drops sessions idle for longer than their ttl at log time `now_ms`.
    /// Called for every entry; sweeps at most once per second of log time.
    pub fn expire(&mut self, now_ms: u64) {
        if now_ms < self.swept_ms.saturating_add(SWEEP_EVERY_MS) {
            return;
        }
        self.swept_ms = now_ms;
        self.open.retain(|_, s| !s.expired(now_ms));
    }

    /// Decides whether the command at `seq`, at log time `now_ms`, is applied.
    pub fn admit(&mut self, seq: SessionSeq, now_ms: u64) -> Admit<'_, T> {
        if self.open.get(&seq.id).is_none_or(|s| s.expired(now_ms)) {
            self.open.remove(&seq.id);
            return Admit::Expired;
        }
        let s = self.open.get_mut(&seq.id).expect("checked above");
        s.last_active_ms = s.last_active_ms.max(now_ms);
        if seq.acked > s.acked {
            s.acked = seq.acked;
            s.answers = s.answers.split_off(&seq.acked);
        }
        if seq.serial < s.acked {
            return Admit::Forgotten;
        }
        match s.answers.get(&seq.serial) {
            Some(answer) => Admit::Duplicate(answer),
            None => Admit::Apply,
        }
    }

    /// Caches the answer of the command at `seq`, which [`Self::admit`] let apply.
    ///
    /// The session may have expired between the two, at an entry applied in
    /// between (answers of a batch are recorded after the batch): then there
    /// is nothing to cache into, on every replica alike.
    pub fn record(&mut self, seq: SessionSeq, answer: T) {
        let Some(s) = self.open.get_mut(&seq.id) else {
            return;
        };
        let previous = s.answers.insert(seq.serial, answer);
        assert!(previous.is_none(), "serial {} applied twice", seq.serial);
        while s.answers.len() > MAX_CACHED_PER_SESSION {
            let (evicted, _) = s.answers.pop_first().expect("not empty");
            // Its retry must not apply again: refuse it as acknowledged.
            s.acked = s.acked.max(evicted + 1);
        }
    }
}

impl<T> Session<T> {
    fn expired(&self, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_active_ms) > self.ttl_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(id: u64, serial: u64, acked: u64) -> SessionSeq {
        SessionSeq { id, serial, acked }
    }

    #[test]
    fn a_retried_serial_gets_the_first_answer() {
        let mut s = Sessions::default();
        s.register(4, 10_000, 0);
        assert_eq!(s.admit(seq(4, 1, 0), 5), Admit::Apply);
        s.record(seq(4, 1, 0), "first");
        assert_eq!(s.admit(seq(4, 1, 0), 6), Admit::Duplicate(&"first"));
        assert_eq!(s.admit(seq(4, 2, 1), 7), Admit::Apply);
        s.record(seq(4, 2, 1), "second");
        // Serial 1 was acknowledged: its answer is gone.
        assert_eq!(s.admit(seq(4, 1, 2), 8), Admit::Forgotten);
    }

    #[test]
    fn sessions_expire_by_log_time() {
        let mut s: Sessions<()> = Sessions::default();
        s.register(1, 1_000, 0);
        s.register(2, 1_000, 0);
        assert_eq!(s.admit(seq(1, 1, 0), 900), Admit::Apply);
        s.record(seq(1, 1, 0), ());
        // Session 1 was active at 900, session 2 idle since 0.
        assert_eq!(s.admit(seq(2, 1, 0), 1_001), Admit::Expired);
        s.expire(1_500);
        assert_eq!(s.len(), 1);
        s.expire(5_000);
        assert!(s.is_empty());
        assert_eq!(s.admit(seq(9, 1, 0), 0), Admit::Expired);
    }

    #[test]
    fn cached_answers_are_bounded() {
        let mut s = Sessions::default();
        s.register(1, u64::MAX, 0);
        for serial in 1..=(MAX_CACHED_PER_SESSION as u64 + 10) {
            assert_eq!(s.admit(seq(1, serial, 0), 0), Admit::Apply);
            s.record(seq(1, serial, 0), serial);
        }
        assert_eq!(s.open[&1].answers.len(), MAX_CACHED_PER_SESSION);
        // An evicted serial is refused, never applied again.
        assert_eq!(s.admit(seq(1, 1, 0), 0), Admit::Forgotten);
    }

    #[test]
    fn an_answer_for_a_session_that_expired_meanwhile_is_dropped() {
        let mut s = Sessions::default();
        s.register(1, 1_000, 0);
        assert_eq!(s.admit(seq(1, 1, 0), 10), Admit::Apply);
        s.expire(5_000);
        s.record(seq(1, 1, 0), "late");
        assert!(s.is_empty());
    }
}
