//! What the node writes into the log: the storage encoding of a core
//! [`Entry`], and the versioned envelope inside each `Normal` entry.
//!
//! Storage payload: one byte of entry kind, then the entry's data. The data of
//! a `Normal` entry is `[version][leader timestamp, u64 LE][postcard Op]`: the
//! timestamp sits at a fixed place so the node can track log time without
//! decoding commands.

use bytes::{BufMut, Bytes, BytesMut};
use kythira_api::{DeployLimits, SessionSeq};
use kythira_raft::{Entry, EntryKind};
use kythira_storage::LogEntry;
use serde::{Deserialize, Serialize};

/// Version of the envelope this node writes. A node refuses to apply an
/// entry of a version it does not know rather than guess; it reads every
/// earlier version. Version 2 gave deploy limits a snapshot fuel budget.
pub const ENVELOPE_VERSION: u8 = 2;

/// The first version, still read (see [`v1`]).
const ENVELOPE_V1: u8 = 1;

const KIND_NORMAL: u8 = 0;
const KIND_NOOP: u8 = 1;
const KIND_CONFIG: u8 = 2;
const HEADER: usize = 1 + 8;

/// A log entry the node cannot read back.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// The storage payload is empty or names an unknown kind.
    #[error("entry {index}: unknown entry kind {kind:?}")]
    UnknownKind {
        /// The entry's index.
        index: u64,
        /// The kind byte, if any.
        kind: Option<u8>,
    },
    /// The envelope's version is not one this node understands.
    #[error(
        "entry {index}: envelope version {version} is not supported (this node writes {ENVELOPE_VERSION})"
    )]
    UnsupportedVersion {
        /// The entry's index.
        index: u64,
        /// Its version byte.
        version: u8,
    },
    /// The envelope does not decode.
    #[error("entry {index}: malformed envelope: {reason}")]
    Malformed {
        /// The entry's index.
        index: u64,
        /// What is wrong.
        reason: String,
    },
}

/// An operation carried by a `Normal` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// A command for a named state machine.
    Apply {
        /// Name of the machine.
        machine: String,
        /// Session position, for exactly-once application.
        session: Option<SessionSeq>,
        /// The command, in the plugin's encoding.
        command: Bytes,
    },
    /// Install or upgrade a machine's code.
    Deploy {
        /// Name of the machine.
        machine: String,
        /// The component's bytes.
        component: Bytes,
        /// Its sha256, checked at apply so a corrupted entry cannot install
        /// other code than the one the operator deployed.
        sha256: [u8; 32],
        /// Resource limits of its calls.
        limits: DeployLimits,
    },
    /// Open a client session whose id is this entry's index.
    RegisterSession {
        /// Log time after which an idle session expires, in milliseconds.
        ttl_ms: u64,
    },
    /// Record where node `id` listens. The core's configuration entries
    /// carry ids only; this makes the addresses replicated state, so every
    /// replica (and a restarted one, by replay) can dial a new member and
    /// name it in redirects.
    SetAddress {
        /// The node.
        id: u64,
        /// Its peer address.
        peer: std::net::SocketAddr,
        /// Its client address.
        client: std::net::SocketAddr,
    },
    /// Node `id` is being removed from the cluster. The node itself stops
    /// once it applies this entry; the others forget it once the core's
    /// configuration no longer holds it. Its id is never given out again.
    RemoveMember {
        /// The node.
        id: u64,
    },
    /// Upgrade an existing machine's code (a `Deploy` also creates one).
    /// New variants go last: postcard numbers them by position.
    Upgrade {
        /// Name of the machine.
        machine: String,
        /// The new component's bytes.
        component: Bytes,
        /// Its sha256, checked at apply.
        sha256: [u8; 32],
        /// The limits asked for; the rest are the machine's when it applies.
        limits: DeployLimits,
    },
    /// Move a machine to other limits, same code.
    SetLimits {
        /// Name of the machine.
        machine: String,
        /// The limits asked for; the rest stay as they are.
        limits: DeployLimits,
    },
    /// Remove a machine and its state.
    Undeploy {
        /// Name of the machine.
        machine: String,
    },
}

/// Postcard's tags of the ops that carry a component, by position above.
const CODE_OPS: [u8; 2] = [1, 5];

/// Whether the `Normal` entry `data` deploys or upgrades code, without
/// decoding it: the event loop looks at every entry it writes.
pub fn carries_code(data: &[u8]) -> bool {
    data.len() > HEADER && data[0] == ENVELOPE_VERSION && CODE_OPS.contains(&data[HEADER])
}

/// Envelope version 1, whose deploy limits had no snapshot fuel; every
/// other op was as it is now. Kept so that a log written by the version
/// before still reads. (Its deploys apply by today's rules: see
/// ARCHITECTURE.md, "What the log carries".)
mod v1 {
    use bytes::Bytes;
    use kythira_api::SessionSeq;
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct Limits {
        apply_fuel: Option<u64>,
        query_fuel: Option<u64>,
        memory_bytes: Option<u64>,
    }

    #[derive(Deserialize)]
    pub(super) enum Op {
        Apply {
            machine: String,
            session: Option<SessionSeq>,
            command: Bytes,
        },
        Deploy {
            machine: String,
            component: Bytes,
            sha256: [u8; 32],
            limits: Limits,
        },
        RegisterSession {
            ttl_ms: u64,
        },
        SetAddress {
            id: u64,
            peer: std::net::SocketAddr,
            client: std::net::SocketAddr,
        },
        RemoveMember {
            id: u64,
        },
    }

    impl From<Op> for super::Op {
        fn from(op: Op) -> Self {
            match op {
                Op::Apply {
                    machine,
                    session,
                    command,
                } => Self::Apply {
                    machine,
                    session,
                    command,
                },
                Op::Deploy {
                    machine,
                    component,
                    sha256,
                    limits,
                } => Self::Deploy {
                    machine,
                    component,
                    sha256,
                    // Snapshot fuel then was the runtime's default, which
                    // an absent value still resolves to.
                    limits: kythira_api::DeployLimits {
                        apply_fuel: limits.apply_fuel,
                        query_fuel: limits.query_fuel,
                        memory_bytes: limits.memory_bytes,
                        snapshot_fuel: None,
                    },
                },
                Op::RegisterSession { ttl_ms } => Self::RegisterSession { ttl_ms },
                Op::SetAddress { id, peer, client } => Self::SetAddress { id, peer, client },
                Op::RemoveMember { id } => Self::RemoveMember { id },
            }
        }
    }
}

/// A decoded `Normal` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// Leader-assigned time, ms since the Unix epoch; never decreases along the log.
    pub timestamp_ms: u64,
    /// What to do.
    pub op: Op,
}

impl Envelope {
    /// The data of a `Normal` entry carrying `op` at `timestamp_ms`. Ops
    /// whose encoding version 1 shares are written as version 1, which
    /// the build before reads too.
    pub fn encode(timestamp_ms: u64, op: &Op) -> Bytes {
        let body = postcard::to_allocvec(op).expect("ops always serialize");
        let version = match op {
            Op::Apply { .. }
            | Op::RegisterSession { .. }
            | Op::SetAddress { .. }
            | Op::RemoveMember { .. } => ENVELOPE_V1,
            Op::Deploy { .. } | Op::Upgrade { .. } | Op::SetLimits { .. } | Op::Undeploy { .. } => {
                ENVELOPE_VERSION
            }
        };
        let mut buf = BytesMut::with_capacity(HEADER + body.len());
        buf.put_u8(version);
        buf.put_u64_le(timestamp_ms);
        buf.put_slice(&body);
        buf.freeze()
    }

    /// Decodes the data of the `Normal` entry at `index`.
    pub fn decode(index: u64, data: &[u8]) -> Result<Self, EntryError> {
        let timestamp_ms = timestamp(index, data)?;
        let body = &data[HEADER..];
        let op = if data[0] == ENVELOPE_V1 {
            postcard::from_bytes::<v1::Op>(body).map(Op::from)
        } else {
            postcard::from_bytes(body)
        };
        let op = op.map_err(|e| EntryError::Malformed {
            index,
            reason: e.to_string(),
        })?;
        Ok(Self { timestamp_ms, op })
    }
}

/// The leader timestamp of a `Normal` entry's data, without decoding the rest.
pub fn timestamp(index: u64, data: &[u8]) -> Result<u64, EntryError> {
    match data.first() {
        None => Err(EntryError::Malformed {
            index,
            reason: "empty".into(),
        }),
        Some(&(ENVELOPE_V1 | ENVELOPE_VERSION)) if data.len() >= HEADER => Ok(u64::from_le_bytes(
            data[1..HEADER].try_into().expect("eight bytes"),
        )),
        Some(&(ENVELOPE_V1 | ENVELOPE_VERSION)) => Err(EntryError::Malformed {
            index,
            reason: format!("{} bytes is shorter than the header", data.len()),
        }),
        Some(&version) => Err(EntryError::UnsupportedVersion { index, version }),
    }
}

/// The storage form of a core entry.
pub fn to_storage(e: &Entry) -> LogEntry {
    let kind = match e.kind {
        EntryKind::Normal => KIND_NORMAL,
        EntryKind::Noop => KIND_NOOP,
        EntryKind::Config => KIND_CONFIG,
        other => unreachable!("the node writes no {other:?} entries"),
    };
    let mut buf = BytesMut::with_capacity(1 + e.data.len());
    buf.put_u8(kind);
    buf.put_slice(&e.data);
    LogEntry::new(e.index, e.term, buf.freeze())
}

/// A stored entry back as a core entry.
pub fn from_storage(e: LogEntry) -> Result<Entry, EntryError> {
    let kind = match e.payload.first() {
        Some(&KIND_NORMAL) => EntryKind::Normal,
        Some(&KIND_NOOP) => EntryKind::Noop,
        Some(&KIND_CONFIG) => EntryKind::Config,
        other => {
            return Err(EntryError::UnknownKind {
                index: e.index,
                kind: other.copied(),
            });
        }
    };
    Ok(Entry {
        term: e.term,
        index: e.index,
        kind,
        data: e.payload.slice(1..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let op = Op::Apply {
            machine: "kv".into(),
            session: Some(SessionSeq {
                id: 3,
                serial: 9,
                acked: 8,
            }),
            command: Bytes::from_static(b"cmd"),
        };
        let data = Envelope::encode(1234, &op);
        assert_eq!(timestamp(7, &data).unwrap(), 1234);
        let env = Envelope::decode(7, &data).unwrap();
        assert_eq!(
            env,
            Envelope {
                timestamp_ms: 1234,
                op
            }
        );
    }

    #[test]
    fn a_version_1_deploy_still_reads() {
        // Version 1's deploy: three optional limits, no snapshot fuel.
        let mut body = vec![1, 2, b'k', b'v', 4, 0, b'a', b's', b'm'];
        body.extend([7; 32]);
        body.extend([1, 100, 0, 1, 128, 1]);
        let mut data = vec![1];
        data.extend(42u64.to_le_bytes());
        data.extend(&body);
        let env = Envelope::decode(3, &data).unwrap();
        assert_eq!(env.timestamp_ms, 42);
        assert_eq!(
            env.op,
            Op::Deploy {
                machine: "kv".into(),
                component: Bytes::from_static(b"\0asm"),
                sha256: [7; 32],
                limits: DeployLimits {
                    apply_fuel: Some(100),
                    query_fuel: None,
                    memory_bytes: Some(128),
                    snapshot_fuel: None,
                },
            }
        );
        // This version writes version 2, and sees code only there.
        assert!(!carries_code(&data));
        assert_eq!(Envelope::encode(1, &env.op)[0], ENVELOPE_VERSION);
    }

    #[test]
    fn exactly_the_ops_with_a_component_carry_code() {
        let component = Bytes::from_static(b"\0asm");
        let limits = DeployLimits::default();
        let ops = [
            (
                Op::Deploy {
                    machine: "kv".into(),
                    component: component.clone(),
                    sha256: [1; 32],
                    limits,
                },
                true,
            ),
            (
                Op::Upgrade {
                    machine: "kv".into(),
                    component,
                    sha256: [1; 32],
                    limits,
                },
                true,
            ),
            (
                Op::SetLimits {
                    machine: "kv".into(),
                    limits,
                },
                false,
            ),
            (
                Op::Undeploy {
                    machine: "kv".into(),
                },
                false,
            ),
            (Op::RegisterSession { ttl_ms: 5 }, false),
            (
                Op::Apply {
                    machine: "kv".into(),
                    session: None,
                    command: Bytes::from_static(&[1, 5]),
                },
                false,
            ),
            (Op::RemoveMember { id: 1 }, false),
        ];
        for (op, code) in ops {
            let data = Envelope::encode(9, &op);
            assert_eq!(carries_code(&data), code, "{op:?}");
            assert_eq!(Envelope::decode(2, &data).unwrap().op, op);
        }
        assert!(!carries_code(&[]));
    }

    #[test]
    fn membership_ops_round_trip() {
        for op in [
            Op::SetAddress {
                id: 4,
                peer: "127.0.0.1:7104".parse().unwrap(),
                client: "[::1]:7004".parse().unwrap(),
            },
            Op::RemoveMember { id: 3 },
        ] {
            assert_eq!(
                Envelope::decode(2, &Envelope::encode(9, &op)).unwrap().op,
                op
            );
        }
    }

    #[test]
    fn malformed_envelopes_are_errors() {
        assert!(matches!(
            Envelope::decode(1, b""),
            Err(EntryError::Malformed { .. })
        ));
        assert!(matches!(
            Envelope::decode(1, &[9, 0, 0, 0, 0, 0, 0, 0, 0]),
            Err(EntryError::UnsupportedVersion { version: 9, .. })
        ));
        assert!(matches!(
            Envelope::decode(1, &[ENVELOPE_VERSION, 1, 2]),
            Err(EntryError::Malformed { .. })
        ));
        let mut data = Envelope::encode(5, &Op::RegisterSession { ttl_ms: 10 }).to_vec();
        data.push(0xff);
        data[HEADER] = 0x7f; // no such op
        assert!(Envelope::decode(1, &data).is_err());
    }

    #[test]
    fn storage_form_round_trips_and_refuses_unknown_kinds() {
        for kind in [EntryKind::Normal, EntryKind::Noop, EntryKind::Config] {
            let e = Entry {
                term: 2,
                index: 5,
                kind,
                data: Bytes::from_static(b"abc"),
            };
            assert_eq!(from_storage(to_storage(&e)).unwrap(), e);
        }
        let bad = LogEntry::new(1, 1, Bytes::from_static(&[42, 1]));
        assert!(matches!(
            from_storage(bad),
            Err(EntryError::UnknownKind { kind: Some(42), .. })
        ));
    }
}
