//! Key/value store plugin, version 2: everything `kythira-plugin-kv` does,
//! with the same bytes and the same JSON, plus an `append` command and a
//! per-key `revision` (the log index of the entry that last wrote the key).
//!
//! It is the example of an upgrade that migrates state: it keeps each key's
//! revision next to its value, so its state layout is not kv's, and
//! [`StateMachine::restore`] reads both (see [`KvStore`] and this crate's
//! README). kv's commands, queries and responses are the first variants of
//! this crate's enums, in kv's order, so clients that speak kv keep working
//! across the upgrade.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::ops::Bound;

use kythira_guest::{ApplyContext, Key, RestoreError, StateMachine, codec};
use serde::{Deserialize, Serialize};

use kythira_plugin_kv as v1;
pub use kythira_plugin_kv::{KvError, MAX_SCAN_LIMIT, Scan};

/// A command, applied through the replicated log.
///
/// Variants 0 to 4 are kv's [`Command`](v1::Command), field for field, so kv's
/// encodings (postcard and JSON) read as the same commands here. New variants
/// go at the end: postcard writes a variant as its position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Sets `key` to `value`. Answers [`Response::Value`] with the previous value.
    Put {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
        #[serde(with = "kythira_guest::bytes")]
        value: Vec<u8>,
    },
    /// Reads `key`, ordered with the writes around it. Answers [`Response::Value`].
    Get {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
    },
    /// Removes `key`. Answers [`Response::Value`] with the removed value.
    Delete {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
    },
    /// Sets `key` to `new` (removes it if `None`) only if its current value is
    /// `expected` (`None`: the key is absent). Answers [`Response::Swapped`] or
    /// [`Response::Mismatch`].
    CompareAndSwap {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
        #[serde(default, with = "kythira_guest::bytes")]
        expected: Option<Vec<u8>>,
        #[serde(default, with = "kythira_guest::bytes")]
        new: Option<Vec<u8>>,
    },
    /// Lists entries in key order. Answers [`Response::Entries`].
    Scan(Scan),
    /// Appends `value` to `key`'s value, creating the key if it is absent.
    /// Answers [`Response::Value`] with the previous value.
    Append {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
        #[serde(with = "kythira_guest::bytes")]
        value: Vec<u8>,
    },
}

/// A read-only request, answered from the current state without the log.
///
/// Variants 0 and 1 are kv's [`Query`](v1::Query); new ones are appended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Query {
    /// Reads `key`. Answers [`Response::Value`].
    Get {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
    },
    /// Lists entries in key order. Answers [`Response::Entries`].
    Scan(Scan),
    /// Reads `key`'s revision. Answers [`Response::Revision`].
    Revision {
        #[serde(with = "kythira_guest::bytes")]
        key: Vec<u8>,
    },
}

/// The answer to a [`Command`] or a [`Query`].
///
/// Variants 0 to 3 are kv's [`Response`](v1::Response), so a client decoding
/// answers with kv's type reads every answer to a kv command or query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// A key's value: the current one for `Get`, the one before the command
    /// for `Put`, `Append` and `Delete`. `None` if the key was absent.
    Value(#[serde(with = "kythira_guest::bytes")] Option<Vec<u8>>),
    /// The compare-and-swap matched and was applied.
    Swapped,
    /// The compare-and-swap did not match; nothing changed.
    Mismatch {
        #[serde(with = "kythira_guest::bytes")]
        current: Option<Vec<u8>>,
    },
    /// The scanned entries; `more` tells whether further keys match (continue
    /// with `start_after` set to the last key returned).
    Entries {
        #[serde(with = "kythira_plugin_kv::entry_list")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        more: bool,
    },
    /// The log index of the entry that last wrote the key: 0 if that was
    /// before this version was deployed, `None` if the key is absent.
    Revision(Option<u64>),
}

impl From<v1::Command> for Command {
    fn from(command: v1::Command) -> Self {
        match command {
            v1::Command::Put { key, value } => Self::Put { key, value },
            v1::Command::Get { key } => Self::Get { key },
            v1::Command::Delete { key } => Self::Delete { key },
            v1::Command::CompareAndSwap { key, expected, new } => {
                Self::CompareAndSwap { key, expected, new }
            }
            v1::Command::Scan(scan) => Self::Scan(scan),
        }
    }
}

impl From<v1::Query> for Query {
    fn from(query: v1::Query) -> Self {
        match query {
            v1::Query::Get { key } => Self::Get { key },
            v1::Query::Scan(scan) => Self::Scan(scan),
        }
    }
}

impl From<v1::Response> for Response {
    fn from(response: v1::Response) -> Self {
        match response {
            v1::Response::Value(value) => Self::Value(value),
            v1::Response::Swapped => Self::Swapped,
            v1::Response::Mismatch { current } => Self::Mismatch { current },
            v1::Response::Entries { entries, more } => Self::Entries { entries, more },
        }
    }
}

/// The first bytes of every state this version writes.
///
/// kv's state is the postcard encoding of its map: the number of entries as
/// a varint, then the entries. A varint whose first byte is `00` ends there
/// (no continuation bit) with the value 0, and an empty map has nothing after
/// its count, while the codec refuses trailing bytes. So the only kv state
/// that starts with `00` is the single byte `00`, and any longer state that
/// starts with `00` cannot be kv's: the first byte alone tells the layouts
/// apart. The three bytes after it are not needed for that. They name the
/// layout (`KV`, version 2) so that a state of another plugin or of a later
/// layout is refused with a reason instead of being misread, and so that a
/// later version can start its own layout with `00 4b 56 03` and still
/// recognise both earlier ones.
const LAYOUT_TAG: [u8; 4] = [0x00, b'K', b'V', 2];

/// A key's value and its revision.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    value: Vec<u8>,
    /// The log index of the entry that last wrote the key (etcd's
    /// mod_revision); 0 for a key carried over from kv's state, which
    /// recorded none. Log indexes start at 1, so 0 means "before".
    revision: u64,
}

/// The store: an ordered map from keys to their value and revision, so its
/// state is canonical.
///
/// Its serde form, which is its state ([`StateMachine::snapshot`]'s
/// default), is the tag `00 4b 56 02` (`LAYOUT_TAG`), then the map: the
/// number of entries, then each entry in ascending key order as its key, its
/// value (both byte strings) and its revision (a varint).
/// [`StateMachine::restore`] also reads kv's state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KvStore {
    entries: BTreeMap<Key, Slot>,
}

/// kv's state carried over: the same entries, all at revision 0.
impl From<v1::KvStore> for KvStore {
    fn from(store: v1::KvStore) -> Self {
        // kv yields its entries in key order, which lets `BTreeMap` build the
        // tree bottom up instead of searching it for every insert.
        let entries = store
            .into_entries()
            .map(|(key, value)| (key, Slot { value, revision: 0 }))
            .collect();
        Self { entries }
    }
}

impl Serialize for KvStore {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (LAYOUT_TAG, slot_map::Ref(&self.entries)).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for KvStore {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (tag, slot_map::Owned(entries)) =
            <([u8; 4], slot_map::Owned)>::deserialize(deserializer)?;
        if tag != LAYOUT_TAG {
            return Err(serde::de::Error::custom(format_args!(
                "not a kv2 state: tag {tag:02x?}"
            )));
        }
        Ok(Self { entries })
    }
}

/// The map of a kv2 state, with values as byte strings: the same bytes as a
/// map of `Vec<u8>` to `(Vec<u8>, u64)`, but values copied in bulk instead of
/// byte by byte, as kv's state does.
mod slot_map {
    use std::collections::BTreeMap;
    use std::fmt;

    use kythira_guest::Key;
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    use super::Slot;

    pub struct Ref<'a>(pub &'a BTreeMap<Key, Slot>);

    impl Serialize for Ref<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_map(
                self.0
                    .iter()
                    .map(|(key, slot)| (key, (Bytes::new(&slot.value), slot.revision))),
            )
        }
    }

    pub struct Owned(pub BTreeMap<Key, Slot>);

    impl<'de> Deserialize<'de> for Owned {
        /// Collects the entries and builds the map in one pass, as kv does:
        /// every restore (each checkpoint of the host) pays for this.
        /// Out-of-order input is still accepted, with the meaning inserts
        /// would give it (a repeated key keeps its last value).
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Entries;

            impl<'de> Visitor<'de> for Entries {
                type Value = BTreeMap<Key, Slot>;

                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a map of byte strings to values and revisions")
                }

                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                    // The length prefix comes from untrusted bytes: cap the
                    // reservation, the entries themselves prove the rest.
                    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 16));
                    while let Some((key, (value, revision))) =
                        map.next_entry::<Key, (ByteBuf, u64)>()?
                    {
                        let value = value.into_vec();
                        entries.push((key, Slot { value, revision }));
                    }
                    Ok(entries.into_iter().collect())
                }
            }

            deserializer.deserialize_map(Entries).map(Owned)
        }
    }
}

impl KvStore {
    /// Number of keys stored.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no keys.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn get(&self, key: Vec<u8>) -> Response {
        Response::Value(
            self.entries
                .get(&Key::from(key))
                .map(|slot| slot.value.clone()),
        )
    }

    fn scan(&self, scan: &Scan) -> Result<Response, KvError> {
        if scan.limit > MAX_SCAN_LIMIT {
            return Err(KvError::ScanLimitTooLarge { limit: scan.limit });
        }
        let lower = match &scan.start_after {
            Some(after) if after.as_slice() >= scan.prefix.as_slice() => {
                Bound::Excluded(Key::from(after.as_slice()))
            }
            _ => Bound::Included(Key::from(scan.prefix.as_slice())),
        };
        let mut matching = self
            .entries
            .range((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&scan.prefix));
        let entries: Vec<_> = matching
            .by_ref()
            .take(scan.limit as usize)
            .map(|(key, slot)| (key.to_vec(), slot.value.clone()))
            .collect();
        let more = matching.next().is_some();
        Ok(Response::Entries { entries, more })
    }

    /// Decodes a state this version wrote: `LAYOUT_TAG`, then the map.
    fn restore_v2(state: &[u8]) -> Result<Self, RestoreError> {
        if !state.starts_with(&LAYOUT_TAG) {
            let reason = match state {
                [0x00, b'K', b'V', version, ..] => format!(
                    "kv state layout {version} is unknown to kv2, which reads kv's layout and \
                     layout {}",
                    LAYOUT_TAG[3]
                ),
                _ => format!(
                    "not a kv state: it starts with 00 but not with the kv2 tag {LAYOUT_TAG:02x?}"
                ),
            };
            return Err(RestoreError::Refused(reason));
        }
        codec::decode(state).map_err(|e| RestoreError::Refused(format!("malformed kv2 state: {e}")))
    }

    /// Decodes a state kv wrote and migrates it.
    fn restore_v1(state: &[u8]) -> Result<Self, RestoreError> {
        codec::decode::<v1::KvStore>(state)
            .map(Self::from)
            .map_err(|e| RestoreError::Refused(format!("neither a kv2 nor a kv state: {e}")))
    }
}

impl StateMachine for KvStore {
    type Command = Command;
    type Response = Response;
    type Query = Query;
    type QueryResponse = Response;
    type Error = KvError;

    fn apply(&mut self, ctx: &ApplyContext, command: Command) -> Result<Response, KvError> {
        let revision = ctx.index;
        Ok(match command {
            Command::Put { key, value } => {
                let previous = self.entries.insert(key.into(), Slot { value, revision });
                Response::Value(previous.map(|slot| slot.value))
            }
            Command::Get { key } => self.get(key),
            Command::Delete { key } => {
                Response::Value(self.entries.remove(&Key::from(key)).map(|slot| slot.value))
            }
            Command::CompareAndSwap { key, expected, new } => {
                let key = Key::from(key);
                let current = self.entries.get(&key).map(|slot| &slot.value);
                if current != expected.as_ref() {
                    return Ok(Response::Mismatch {
                        current: current.cloned(),
                    });
                }
                match new {
                    Some(value) => self.entries.insert(key, Slot { value, revision }),
                    None => self.entries.remove(&key),
                };
                Response::Swapped
            }
            Command::Scan(scan) => self.scan(&scan)?,
            Command::Append { key, value } => match self.entries.entry(Key::from(key)) {
                Entry::Occupied(mut entry) => {
                    let slot = entry.get_mut();
                    // The answer is the previous value: build the new one
                    // beside it rather than copying the old one to answer.
                    let mut joined = Vec::with_capacity(slot.value.len() + value.len());
                    joined.extend_from_slice(&slot.value);
                    joined.extend_from_slice(&value);
                    slot.revision = revision;
                    Response::Value(Some(std::mem::replace(&mut slot.value, joined)))
                }
                Entry::Vacant(entry) => {
                    entry.insert(Slot { value, revision });
                    Response::Value(None)
                }
            },
        })
    }

    fn query(&self, query: Query) -> Result<Response, KvError> {
        match query {
            Query::Get { key } => Ok(self.get(key)),
            Query::Scan(scan) => self.scan(&scan),
            Query::Revision { key } => Ok(Response::Revision(
                self.entries.get(&Key::from(key)).map(|slot| slot.revision),
            )),
        }
    }

    /// Reads kv's state (what the upgrade entry hands over) and this
    /// version's (every snapshot after it), told apart by their first byte
    /// (see `LAYOUT_TAG`). Anything else is refused: at an upgrade the
    /// refusal is the same on every replica, and kv keeps running.
    fn restore(state: &[u8]) -> Result<Self, RestoreError> {
        match state {
            [0x00, _, ..] => Self::restore_v2(state),
            _ => Self::restore_v1(state),
        }
    }
}

#[cfg(feature = "component")]
kythira_guest::export!(KvStore);

#[cfg(test)]
mod tests;
