//! Named locks with leases.
//!
//! A lock is held by an owner until it releases it or its lease runs out.
//! Leases expire by log time — the leader-assigned timestamp of the entry being
//! applied ([`ApplyContext::timestamp_ms`]) — never by a clock, so every replica
//! agrees on exactly which entry found a lease expired.
//!
//! Each grant carries a fencing token: the log index of the entry that
//! acquired the lock. Tokens only grow, so a resource that remembers the
//! highest token it has seen can refuse a holder whose lease already ran out.
//!
//! Commands, queries and responses are postcard encodings of [`Command`],
//! [`Query`], [`Response`] and `Option<Lease>`; encode them with
//! [`kythira_guest::codec`]. In JSON (the daemon's API and CLI):
//! `{"acquire": {"name": "db", "owner": "a", "lease_ms": 5000}}`, answered
//! `{"granted": {"owner": "a", "expires_at_ms": …, "token": 7}}`.

use std::collections::{BTreeMap, BTreeSet};

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest lease one command may ask for: one day.
pub const MAX_LEASE_MS: u64 = 24 * 60 * 60 * 1000;

/// A command, applied through the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Takes the lock `name` until `lease_ms` after this entry's log time, if
    /// it is free or its lease has run out. If `owner` already holds it, the
    /// lease is reset to that expiry and the token kept, so a retried acquire
    /// is harmless. Answers
    /// [`Response::Granted`] or [`Response::Busy`].
    Acquire {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
        #[serde(with = "kythira_guest::bytes")]
        owner: Vec<u8>,
        lease_ms: u64,
    },
    /// Resets `owner`'s lease on `name` to run out `lease_ms` after this
    /// entry's log time (which may shorten it). Answers
    /// [`Response::Granted`] or [`Response::NotHolder`].
    Renew {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
        #[serde(with = "kythira_guest::bytes")]
        owner: Vec<u8>,
        lease_ms: u64,
    },
    /// Frees `name` if `owner` holds it. Answers [`Response::Released`] or
    /// [`Response::NotHolder`].
    Release {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
        #[serde(with = "kythira_guest::bytes")]
        owner: Vec<u8>,
    },
}

/// A read-only request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// Answers the lease on `name`, if one is recorded. A query carries no
    /// log time, so the lease may have run out already: compare
    /// `expires_at_ms` with the time the caller goes by.
    Get {
        #[serde(with = "kythira_guest::bytes")]
        name: Vec<u8>,
    },
}

/// A lock's current holder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds the lock.
    #[serde(with = "kythira_guest::bytes")]
    pub owner: Vec<u8>,
    /// Log time at which the lease runs out; the lock is free for any entry
    /// with `timestamp_ms >= expires_at_ms`.
    pub expires_at_ms: u64,
    /// Fencing token: the log index of the acquiring entry.
    pub token: u64,
}

/// The answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// The caller holds the lock under this lease.
    Granted(Lease),
    /// Another owner holds the lock under this lease.
    Busy(Lease),
    /// The lock was freed.
    Released,
    /// The caller does not hold the lock (never did, or its lease ran out);
    /// `current` is whoever does.
    NotHolder { current: Option<Lease> },
}

/// Why a command was refused; the state is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    #[error("lease of {lease_ms} ms is outside 1..={MAX_LEASE_MS} ms")]
    InvalidLease { lease_ms: u64 },
}

/// The lock table, with an expiry index so that run-out leases are dropped in
/// order as log time passes instead of lingering forever.
///
/// Only `leases` is serialized; the index is derived from it on restore, so a
/// snapshot cannot hold an inconsistent pair.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Locks {
    leases: BTreeMap<Vec<u8>, Lease>,
    by_expiry: BTreeSet<(u64, Vec<u8>)>,
}

impl Locks {
    /// The lease recorded on `name`, possibly run out (see [`Query::Get`]).
    #[must_use]
    pub fn lease(&self, name: &[u8]) -> Option<&Lease> {
        self.leases.get(name)
    }

    /// Number of leases recorded.
    #[must_use]
    pub fn len(&self) -> usize {
        self.leases.len()
    }

    /// Whether no lease is recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.leases.is_empty()
    }

    fn from_leases(leases: BTreeMap<Vec<u8>, Lease>) -> Self {
        let by_expiry = leases
            .iter()
            .map(|(name, lease)| (lease.expires_at_ms, name.clone()))
            .collect();
        Self { leases, by_expiry }
    }

    /// Drops every lease that has run out by `now_ms`: O(log n) plus the
    /// number dropped.
    fn expire(&mut self, now_ms: u64) {
        // Entries ordered before (now_ms + 1, "") are those with
        // expires_at_ms <= now_ms.
        let still_held = match now_ms.checked_add(1) {
            Some(bound) => self.by_expiry.split_off(&(bound, Vec::new())),
            None => BTreeSet::new(),
        };
        for (_, name) in std::mem::replace(&mut self.by_expiry, still_held) {
            let removed = self.leases.remove(&name);
            debug_assert!(removed.is_some(), "expiry index out of step with leases");
        }
        debug_assert_eq!(self.leases.len(), self.by_expiry.len());
    }

    fn acquire(
        &mut self,
        index: u64,
        name: Vec<u8>,
        owner: Vec<u8>,
        expires_at_ms: u64,
    ) -> Response {
        let token = match self.leases.get(&name) {
            Some(held) if held.owner != owner => return Response::Busy(held.clone()),
            Some(held) => held.token,
            None => index,
        };
        self.grant(
            name,
            Lease {
                owner,
                expires_at_ms,
                token,
            },
        )
    }

    fn renew(&mut self, name: Vec<u8>, owner: Vec<u8>, expires_at_ms: u64) -> Response {
        let token = match self.leases.get(&name) {
            Some(held) if held.owner == owner => held.token,
            current => {
                return Response::NotHolder {
                    current: current.cloned(),
                };
            }
        };
        self.grant(
            name,
            Lease {
                owner,
                expires_at_ms,
                token,
            },
        )
    }

    fn release(&mut self, name: Vec<u8>, owner: &[u8]) -> Response {
        match self.leases.get(&name) {
            Some(held) if held.owner == owner => {
                let expires_at_ms = held.expires_at_ms;
                self.leases.remove(&name);
                self.by_expiry.remove(&(expires_at_ms, name));
                Response::Released
            }
            current => Response::NotHolder {
                current: current.cloned(),
            },
        }
    }

    fn grant(&mut self, name: Vec<u8>, lease: Lease) -> Response {
        if let Some(old) = self.leases.get(&name) {
            self.by_expiry.remove(&(old.expires_at_ms, name.clone()));
        }
        self.by_expiry.insert((lease.expires_at_ms, name.clone()));
        self.leases.insert(name, lease.clone());
        debug_assert_eq!(self.leases.len(), self.by_expiry.len());
        Response::Granted(lease)
    }
}

fn expiry(ctx: &ApplyContext, lease_ms: u64) -> Result<u64, LockError> {
    if lease_ms == 0 || lease_ms > MAX_LEASE_MS {
        return Err(LockError::InvalidLease { lease_ms });
    }
    // Saturating: a lease cannot outlive the end of log time anyway.
    Ok(ctx.timestamp_ms.saturating_add(lease_ms))
}

impl StateMachine for Locks {
    type Command = Command;
    type Response = Response;
    type Query = Query;
    type QueryResponse = Option<Lease>;
    type Error = LockError;

    fn apply(&mut self, ctx: &ApplyContext, command: Command) -> Result<Response, LockError> {
        match command {
            Command::Acquire {
                name,
                owner,
                lease_ms,
            } => {
                let expires_at_ms = expiry(ctx, lease_ms)?;
                self.expire(ctx.timestamp_ms);
                Ok(self.acquire(ctx.index, name, owner, expires_at_ms))
            }
            Command::Renew {
                name,
                owner,
                lease_ms,
            } => {
                let expires_at_ms = expiry(ctx, lease_ms)?;
                self.expire(ctx.timestamp_ms);
                Ok(self.renew(name, owner, expires_at_ms))
            }
            Command::Release { name, owner } => {
                self.expire(ctx.timestamp_ms);
                Ok(self.release(name, &owner))
            }
        }
    }

    fn query(&self, Query::Get { name }: Query) -> Result<Option<Lease>, LockError> {
        Ok(self.leases.get(&name).cloned())
    }
}

impl Serialize for Locks {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.leases.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Locks {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(deserializer).map(Self::from_leases)
    }
}

kythira_guest::export!(Locks);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    fn acquire(name: &[u8], owner: &[u8], lease_ms: u64) -> Command {
        Command::Acquire {
            name: name.to_vec(),
            owner: owner.to_vec(),
            lease_ms,
        }
    }

    fn renew(name: &[u8], owner: &[u8], lease_ms: u64) -> Command {
        Command::Renew {
            name: name.to_vec(),
            owner: owner.to_vec(),
            lease_ms,
        }
    }

    fn release(name: &[u8], owner: &[u8]) -> Command {
        Command::Release {
            name: name.to_vec(),
            owner: owner.to_vec(),
        }
    }

    fn lease(owner: &[u8], expires_at_ms: u64, token: u64) -> Lease {
        Lease {
            owner: owner.to_vec(),
            expires_at_ms,
            token,
        }
    }

    #[test]
    fn speaks_json_with_names_and_owners_as_text() {
        let mut locks = Harness::<Locks>::new();
        locks.advance_ms(1_000);
        assert_eq!(
            locks
                .apply_json(r#"{"acquire":{"name":"db","owner":"alice","lease_ms":500}}"#)
                .as_deref(),
            Ok(r#"{"granted":{"owner":"alice","expires_at_ms":1500,"token":1}}"#)
        );
        assert_eq!(
            locks
                .apply_json(r#"{"acquire":{"name":"db","owner":"bob","lease_ms":500}}"#)
                .as_deref(),
            Ok(r#"{"busy":{"owner":"alice","expires_at_ms":1500,"token":1}}"#)
        );
        assert_eq!(
            locks
                .apply_json(r#"{"release":{"name":"db","owner":"bob"}}"#)
                .as_deref(),
            Ok(r#"{"not_holder":{"current":{"owner":"alice","expires_at_ms":1500,"token":1}}}"#)
        );
        assert_eq!(
            locks.query_json(r#"{"get":{"name":"db"}}"#).as_deref(),
            Ok(r#"{"owner":"alice","expires_at_ms":1500,"token":1}"#)
        );
        assert_eq!(
            locks
                .apply_json(r#"{"release":{"name":"db","owner":"alice"}}"#)
                .as_deref(),
            Ok(r#""released""#)
        );
        assert_eq!(
            locks.query_json(r#"{"get":{"name":"db"}}"#).as_deref(),
            Ok("null")
        );
        assert_eq!(
            locks.log()[0].command,
            kythira_guest::codec::encode(&acquire(b"db", b"alice", 500)).unwrap()
        );
        locks.assert_deterministic();
        locks.assert_snapshot_transparent();
    }

    #[test]
    fn one_holder_at_a_time_until_release() {
        let mut locks = Harness::<Locks>::new();
        locks.advance_ms(1_000);
        assert_eq!(
            locks.apply(&acquire(b"job", b"alice", 500)),
            Ok(Response::Granted(lease(b"alice", 1_500, 1)))
        );
        assert_eq!(
            locks.apply(&acquire(b"job", b"bob", 500)),
            Ok(Response::Busy(lease(b"alice", 1_500, 1)))
        );
        assert_eq!(
            locks.apply(&release(b"job", b"bob")),
            Ok(Response::NotHolder {
                current: Some(lease(b"alice", 1_500, 1))
            })
        );
        assert_eq!(
            locks.apply(&release(b"job", b"alice")),
            Ok(Response::Released)
        );
        assert_eq!(
            locks.query(&Query::Get {
                name: b"job".to_vec()
            }),
            Ok(None)
        );
        // The next holder's token is its own entry's index: higher than alice's.
        assert_eq!(
            locks.apply(&acquire(b"job", b"bob", 500)),
            Ok(Response::Granted(lease(b"bob", 1_500, 5)))
        );
        locks.assert_deterministic();
        locks.assert_snapshot_transparent();
    }

    #[test]
    fn leases_expire_by_log_time() {
        let mut locks = Harness::<Locks>::new();
        locks.apply(&acquire(b"job", b"alice", 100)).unwrap();
        locks.advance_ms(99);
        assert_eq!(
            locks.apply(&acquire(b"job", b"bob", 100)),
            Ok(Response::Busy(lease(b"alice", 100, 1)))
        );
        locks.advance_ms(1);
        assert_eq!(
            locks.apply(&acquire(b"job", b"bob", 100)),
            Ok(Response::Granted(lease(b"bob", 200, 3)))
        );
        // Alice's lease ran out: she can neither renew nor release.
        assert_eq!(
            locks.apply(&renew(b"job", b"alice", 100)),
            Ok(Response::NotHolder {
                current: Some(lease(b"bob", 200, 3))
            })
        );
        locks.advance_ms(1_000);
        assert_eq!(
            locks.apply(&release(b"job", b"bob")),
            Ok(Response::NotHolder { current: None })
        );
        locks.assert_deterministic();
        locks.assert_snapshot_transparent();
    }

    #[test]
    fn renewal_and_reacquisition_keep_the_token() {
        let mut locks = Harness::<Locks>::new();
        locks.apply(&acquire(b"job", b"alice", 100)).unwrap();
        locks.advance_ms(80);
        assert_eq!(
            locks.apply(&renew(b"job", b"alice", 100)),
            Ok(Response::Granted(lease(b"alice", 180, 1)))
        );
        locks.advance_ms(90);
        assert_eq!(
            locks.apply(&acquire(b"job", b"alice", 50)),
            Ok(Response::Granted(lease(b"alice", 220, 1)))
        );
        assert_eq!(
            locks.apply(&renew(b"job", b"bob", 100)),
            Ok(Response::NotHolder {
                current: Some(lease(b"alice", 220, 1))
            })
        );
        locks.assert_snapshot_transparent();
    }

    #[test]
    fn expired_leases_are_dropped_from_the_state() {
        let mut locks = Harness::<Locks>::new();
        for name in [&b"a"[..], b"b", b"c"] {
            locks.apply(&acquire(name, b"alice", 10)).unwrap();
        }
        locks.apply(&acquire(b"d", b"alice", 1_000)).unwrap();
        assert_eq!(locks.machine().len(), 4);
        locks.advance_ms(10);
        locks.apply(&release(b"nothing", b"alice")).unwrap();
        assert_eq!(locks.machine().len(), 1);
        assert!(locks.machine().lease(b"d").is_some());
        locks.assert_snapshot_round_trip();
        locks.assert_snapshot_transparent();
    }

    #[test]
    fn refuses_invalid_leases_and_changes_nothing() {
        let mut locks = Harness::<Locks>::new();
        locks.apply(&acquire(b"job", b"alice", 10)).unwrap();
        locks.advance_ms(50);
        let before = locks.state();
        for lease_ms in [0, MAX_LEASE_MS + 1] {
            assert_eq!(
                locks.apply(&acquire(b"job", b"bob", lease_ms)),
                Err(format!(
                    "lease of {lease_ms} ms is outside 1..={MAX_LEASE_MS} ms"
                ))
            );
            assert!(locks.apply(&renew(b"job", b"alice", lease_ms)).is_err());
        }
        // Not even the run-out lease was dropped by the refused commands.
        assert_eq!(locks.state(), before);
    }

    #[test]
    fn a_snapshot_cannot_desynchronize_the_expiry_index() {
        let mut locks = Harness::<Locks>::new();
        locks.apply(&acquire(b"x", b"o", 5)).unwrap();
        let restored: Locks = kythira_guest::codec::decode(&locks.state()).unwrap();
        assert_eq!(&restored, locks.machine());
    }
}
