//! The binary encoding of [`kythira_raft::Message`] between nodes.
//!
//! postcard over serde mirror types: the core stays free of serde, and the
//! wire layout is written down here, in one place, where a change is visible
//! as a change of the frame version. Integers are varints, so heartbeats and
//! votes take a few bytes. Entry payloads are borrowed when encoding and
//! sliced out of the frame when decoding ([`Bytes::slice_ref`]), so entry data
//! is never copied by this layer.
//!
//! Decoding untrusted bytes returns an error and never panics: postcard checks
//! every length against the input, and trailing bytes are refused so that a
//! message has exactly one encoding.
//!
//! A `Snapshot` message has an encoding, but only the snapshot stream carries
//! it, together with the data it stands for (see [`crate::snapshot`]); the
//! peer message stream refuses it on both ends.

use std::sync::Arc;

use bytes::Bytes;
use kythira_raft::{
    AppendOutcome, Entry, EntryKind, Membership, MembershipError, Message, MessageBody,
    SnapshotMeta,
};
use serde::{Deserialize, Serialize};

/// Errors of encoding and decoding messages.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// An entry kind this version of the wire format cannot carry (the core's
    /// `EntryKind` is non-exhaustive; a new kind needs a new wire version).
    #[error("entry kind {kind} has no wire encoding")]
    UnsupportedEntryKind {
        /// `Debug` of the kind.
        kind: String,
    },
    /// A snapshot's membership that does not decode.
    #[error("malformed message: snapshot membership: {0}")]
    Membership(Arc<MembershipError>),
    /// postcard failed to encode.
    #[error("encode: {0}")]
    Encode(postcard::Error),
    /// The bytes are not a message.
    #[error("malformed message: {0}")]
    Decode(postcard::Error),
    /// A message followed by extra bytes.
    #[error("malformed message: {extra} trailing bytes")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
}

#[derive(Serialize, Deserialize)]
struct WireMessage<'a> {
    from: u64,
    to: u64,
    term: u64,
    #[serde(borrow)]
    body: WireBody<'a>,
}

// Variant order is the wire tag: append new variants at the end only.
#[derive(Serialize, Deserialize)]
enum WireBody<'a> {
    PreVote {
        last_index: u64,
        last_term: u64,
    },
    PreVoteResponse {
        granted: bool,
    },
    Vote {
        last_index: u64,
        last_term: u64,
        transfer: bool,
    },
    VoteResponse {
        granted: bool,
    },
    Append {
        prev_index: u64,
        prev_term: u64,
        #[serde(borrow)]
        entries: Vec<WireEntry<'a>>,
        commit: u64,
    },
    AppendResponse(WireOutcome),
    Heartbeat {
        commit: u64,
        read_round: u64,
    },
    HeartbeatResponse {
        read_round: u64,
    },
    TimeoutNow,
    ReadIndexRequest {
        ctx: u64,
    },
    ReadIndexResponse {
        ctx: u64,
        index: u64,
    },
    Snapshot {
        index: u64,
        term: u64,
        /// [`Membership::encode`], which has its own version byte.
        membership: Bytes,
    },
}

#[derive(Serialize, Deserialize)]
enum WireOutcome {
    Accepted {
        last_index: u64,
    },
    Rejected {
        prev_index: u64,
        hint_index: u64,
        hint_term: u64,
    },
}

#[derive(Serialize, Deserialize)]
struct WireEntry<'a> {
    term: u64,
    index: u64,
    kind: WireKind,
    #[serde(borrow, with = "serde_bytes")]
    data: &'a [u8],
}

#[derive(Serialize, Deserialize)]
enum WireKind {
    Normal,
    Noop,
    Config,
}

fn entry_to_wire(entry: &Entry) -> Result<WireEntry<'_>, WireError> {
    let kind = match entry.kind {
        EntryKind::Normal => WireKind::Normal,
        EntryKind::Noop => WireKind::Noop,
        EntryKind::Config => WireKind::Config,
        other => {
            return Err(WireError::UnsupportedEntryKind {
                kind: format!("{other:?}"),
            });
        }
    };
    Ok(WireEntry {
        term: entry.term,
        index: entry.index,
        kind,
        data: &entry.data,
    })
}

fn to_wire(message: &Message) -> Result<WireMessage<'_>, WireError> {
    let body = match &message.body {
        MessageBody::PreVote {
            last_index,
            last_term,
        } => WireBody::PreVote {
            last_index: *last_index,
            last_term: *last_term,
        },
        MessageBody::PreVoteResponse { granted } => WireBody::PreVoteResponse { granted: *granted },
        MessageBody::Vote {
            last_index,
            last_term,
            transfer,
        } => WireBody::Vote {
            last_index: *last_index,
            last_term: *last_term,
            transfer: *transfer,
        },
        MessageBody::VoteResponse { granted } => WireBody::VoteResponse { granted: *granted },
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => WireBody::Append {
            prev_index: *prev_index,
            prev_term: *prev_term,
            entries: entries
                .iter()
                .map(entry_to_wire)
                .collect::<Result<_, _>>()?,
            commit: *commit,
        },
        MessageBody::AppendResponse(outcome) => WireBody::AppendResponse(match *outcome {
            AppendOutcome::Accepted { last_index } => WireOutcome::Accepted { last_index },
            AppendOutcome::Rejected {
                prev_index,
                hint_index,
                hint_term,
            } => WireOutcome::Rejected {
                prev_index,
                hint_index,
                hint_term,
            },
        }),
        MessageBody::Heartbeat { commit, read_round } => WireBody::Heartbeat {
            commit: *commit,
            read_round: *read_round,
        },
        MessageBody::HeartbeatResponse { read_round } => WireBody::HeartbeatResponse {
            read_round: *read_round,
        },
        MessageBody::TimeoutNow => WireBody::TimeoutNow,
        MessageBody::Snapshot { meta } => WireBody::Snapshot {
            index: meta.index,
            term: meta.term,
            membership: meta.membership.encode(),
        },
        MessageBody::ReadIndexRequest { ctx } => WireBody::ReadIndexRequest { ctx: *ctx },
        MessageBody::ReadIndexResponse { ctx, index } => WireBody::ReadIndexResponse {
            ctx: *ctx,
            index: *index,
        },
    };
    Ok(WireMessage {
        from: message.from,
        to: message.to,
        term: message.term,
        body,
    })
}

/// Appends the encoding of `message` to `out`.
pub fn encode_into(message: &Message, out: &mut Vec<u8>) -> Result<(), WireError> {
    let wire = to_wire(message)?;
    let taken = std::mem::take(out);
    *out = postcard::to_extend(&wire, taken).map_err(WireError::Encode)?;
    Ok(())
}

/// The encoding of `message`.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    let mut out = Vec::new();
    encode_into(message, &mut out)?;
    Ok(out)
}

/// Decodes a message; entry payloads share `bytes`' buffer.
pub fn decode(bytes: &Bytes) -> Result<Message, WireError> {
    let (wire, rest): (WireMessage<'_>, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(WireError::Decode)?;
    if !rest.is_empty() {
        return Err(WireError::TrailingBytes { extra: rest.len() });
    }
    let body = match wire.body {
        WireBody::PreVote {
            last_index,
            last_term,
        } => MessageBody::PreVote {
            last_index,
            last_term,
        },
        WireBody::PreVoteResponse { granted } => MessageBody::PreVoteResponse { granted },
        WireBody::Vote {
            last_index,
            last_term,
            transfer,
        } => MessageBody::Vote {
            last_index,
            last_term,
            transfer,
        },
        WireBody::VoteResponse { granted } => MessageBody::VoteResponse { granted },
        WireBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
        } => MessageBody::Append {
            prev_index,
            prev_term,
            entries: entries
                .into_iter()
                .map(|e| Entry {
                    term: e.term,
                    index: e.index,
                    kind: match e.kind {
                        WireKind::Normal => EntryKind::Normal,
                        WireKind::Noop => EntryKind::Noop,
                        WireKind::Config => EntryKind::Config,
                    },
                    data: if e.data.is_empty() {
                        Bytes::new()
                    } else {
                        bytes.slice_ref(e.data)
                    },
                })
                .collect(),
            commit,
        },
        WireBody::AppendResponse(outcome) => MessageBody::AppendResponse(match outcome {
            WireOutcome::Accepted { last_index } => AppendOutcome::Accepted { last_index },
            WireOutcome::Rejected {
                prev_index,
                hint_index,
                hint_term,
            } => AppendOutcome::Rejected {
                prev_index,
                hint_index,
                hint_term,
            },
        }),
        WireBody::Heartbeat { commit, read_round } => MessageBody::Heartbeat { commit, read_round },
        WireBody::HeartbeatResponse { read_round } => MessageBody::HeartbeatResponse { read_round },
        WireBody::TimeoutNow => MessageBody::TimeoutNow,
        WireBody::ReadIndexRequest { ctx } => MessageBody::ReadIndexRequest { ctx },
        WireBody::ReadIndexResponse { ctx, index } => MessageBody::ReadIndexResponse { ctx, index },
        WireBody::Snapshot {
            index,
            term,
            membership,
        } => MessageBody::Snapshot {
            meta: SnapshotMeta {
                index,
                term,
                membership: Membership::decode(&membership)
                    .map_err(|e| WireError::Membership(Arc::new(e)))?,
            },
        },
    };
    Ok(Message {
        from: wire.from,
        to: wire.to,
        term: wire.term,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = Entry> {
        (
            any::<u64>(),
            any::<u64>(),
            0..3usize,
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(term, index, kind, data)| Entry {
                term,
                index,
                kind: [EntryKind::Normal, EntryKind::Noop, EntryKind::Config][kind],
                data: Bytes::from(data),
            })
    }

    fn body() -> impl Strategy<Value = MessageBody> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(last_index, last_term)| {
                MessageBody::PreVote {
                    last_index,
                    last_term,
                }
            }),
            any::<bool>().prop_map(|granted| MessageBody::PreVoteResponse { granted }),
            (any::<u64>(), any::<u64>(), any::<bool>()).prop_map(
                |(last_index, last_term, transfer)| MessageBody::Vote {
                    last_index,
                    last_term,
                    transfer,
                }
            ),
            any::<bool>().prop_map(|granted| MessageBody::VoteResponse { granted }),
            (
                any::<u64>(),
                any::<u64>(),
                proptest::collection::vec(entry(), 0..8),
                any::<u64>()
            )
                .prop_map(|(prev_index, prev_term, entries, commit)| {
                    MessageBody::Append {
                        prev_index,
                        prev_term,
                        entries,
                        commit,
                    }
                }),
            any::<u64>().prop_map(|last_index| MessageBody::AppendResponse(
                AppendOutcome::Accepted { last_index }
            )),
            (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(
                |(prev_index, hint_index, hint_term)| {
                    MessageBody::AppendResponse(AppendOutcome::Rejected {
                        prev_index,
                        hint_index,
                        hint_term,
                    })
                }
            ),
            (any::<u64>(), any::<u64>())
                .prop_map(|(commit, read_round)| MessageBody::Heartbeat { commit, read_round }),
            any::<u64>().prop_map(|read_round| MessageBody::HeartbeatResponse { read_round }),
            Just(MessageBody::TimeoutNow),
            any::<u64>().prop_map(|ctx| MessageBody::ReadIndexRequest { ctx }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(ctx, index)| MessageBody::ReadIndexResponse { ctx, index }),
            (any::<u64>(), any::<u64>(), membership()).prop_map(|(index, term, membership)| {
                MessageBody::Snapshot {
                    meta: SnapshotMeta {
                        index,
                        term,
                        membership,
                    },
                }
            }),
        ]
    }

    /// Valid memberships, simple or joint, with learners. A joint one can
    /// only be made by the core or decoded, so it is decoded here.
    fn membership() -> impl Strategy<Value = Membership> {
        let ids = |range: std::ops::Range<u64>, len| {
            proptest::collection::btree_set(range, len).prop_map(|s| s.into_iter().collect())
        };
        (
            ids(1..20, 1..5),
            proptest::option::of(ids(1..20, 1..5)),
            ids(20..30, 0..3),
        )
            .prop_map(|(voters, outgoing, learners): (Vec<u64>, _, Vec<u64>)| {
                let list = |out: &mut Vec<u8>, ids: &[u64]| {
                    out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                    ids.iter()
                        .for_each(|id| out.extend_from_slice(&id.to_le_bytes()));
                };
                let mut bytes = vec![1];
                list(&mut bytes, &voters);
                match &outgoing {
                    Some(outgoing) => {
                        bytes.push(1);
                        list(&mut bytes, outgoing);
                    }
                    None => bytes.push(0),
                }
                list(&mut bytes, &learners);
                Membership::decode(&bytes).unwrap()
            })
    }

    fn message() -> impl Strategy<Value = Message> {
        (any::<u64>(), any::<u64>(), any::<u64>(), body()).prop_map(|(from, to, term, body)| {
            Message {
                from,
                to,
                term,
                body,
            }
        })
    }

    proptest! {
        #[test]
        fn every_message_roundtrips(m in message()) {
            let bytes = Bytes::from(encode(&m).unwrap());
            prop_assert_eq!(decode(&bytes).unwrap(), m);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&Bytes::from(bytes));
        }

        #[test]
        fn every_truncation_is_an_error(m in message()) {
            let bytes = encode(&m).unwrap();
            for cut in 0..bytes.len() {
                prop_assert!(decode(&Bytes::copy_from_slice(&bytes[..cut])).is_err());
            }
        }

        #[test]
        fn corrupted_messages_never_panic(m in message(), at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = encode(&m).unwrap();
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = decode(&Bytes::from(bytes));
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let m = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::VoteResponse { granted: true },
        };
        let mut bytes = encode(&m).unwrap();
        bytes.push(0);
        assert_eq!(
            decode(&Bytes::from(bytes)),
            Err(WireError::TrailingBytes { extra: 1 })
        );
    }

    #[test]
    fn entry_data_is_not_copied() {
        let m = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::Append {
                prev_index: 0,
                prev_term: 0,
                entries: vec![Entry {
                    term: 3,
                    index: 1,
                    kind: EntryKind::Normal,
                    data: Bytes::from_static(b"payload"),
                }],
                commit: 0,
            },
        };
        let bytes = Bytes::from(encode(&m).unwrap());
        let MessageBody::Append { entries, .. } = decode(&bytes).unwrap().body else {
            panic!("not an append");
        };
        let range = bytes.as_ptr_range();
        assert!(range.contains(&entries[0].data.as_ptr()));
    }

    #[test]
    fn a_snapshot_with_a_malformed_membership_is_refused() {
        let m = Message {
            from: 1,
            to: 2,
            term: 3,
            body: MessageBody::Snapshot {
                meta: SnapshotMeta {
                    index: 10,
                    term: 3,
                    membership: Membership::new([1, 2, 3], []).unwrap(),
                },
            },
        };
        let mut bytes = encode(&m).unwrap();
        // from, to, term, tag, index, term, length, then the membership's
        // version byte.
        assert_eq!(bytes[3], 11, "Snapshot is the last variant");
        bytes[7] = 9;
        assert!(matches!(
            decode(&Bytes::from(bytes)),
            Err(WireError::Membership(_))
        ));
    }

    #[test]
    fn a_huge_entry_count_is_an_error_not_an_allocation() {
        // from, to, term, tag Append, prev_index, prev_term, then a count of
        // u64::MAX entries with nothing behind it.
        let mut bytes = vec![1, 2, 3, 4, 0, 0];
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(decode(&Bytes::from(bytes)).is_err());
    }
}
