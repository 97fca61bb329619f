//! Key/value store plugin: put, get, delete, compare-and-swap and prefix scans
//! over byte-string keys and values.
//!
//! Commands, queries and responses are postcard encodings of [`Command`],
//! [`Query`] and [`Response`] (see this crate's README for the wire format);
//! encode them with [`kythira_guest::codec`]. Clients of the daemon write them
//! as JSON instead, which the component translates: `{"put": {"key": "a",
//! "value": "1"}}`, with byte strings as text (README, "JSON").

use std::collections::BTreeMap;
use std::ops::Bound;

use kythira_guest::{ApplyContext, Key, StateMachine};
use serde::{Deserialize, Serialize};

/// The most entries one scan returns; page through larger ranges with
/// `start_after`.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// A command, applied through the replicated log.
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
}

/// A read-only request, answered from the current state without the log.
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
}

/// A prefix scan: keys starting with `prefix`, greater than `start_after` if
/// given, in ascending order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scan {
    #[serde(with = "kythira_guest::bytes")]
    pub prefix: Vec<u8>,
    #[serde(default, with = "kythira_guest::bytes")]
    pub start_after: Option<Vec<u8>>,
    pub limit: u32,
}

/// The answer to a [`Command`] or a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    /// A key's value: the current one for `Get`, the one before the command
    /// for `Put` and `Delete`. `None` if the key was absent.
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
        #[serde(with = "entry_list")]
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        more: bool,
    },
}

/// Scanned entries as `{key, value}` pairs of byte strings: in JSON
/// `[{"key": "a", "value": "1"}]`, in postcard the same bytes as the list of
/// tuples (a struct's fields are written in order, like a tuple's).
///
/// Public for later versions of this plugin, whose responses must keep this
/// form: use it as `#[serde(with = "kythira_plugin_kv::entry_list")]` on a
/// `Vec<(Vec<u8>, Vec<u8>)>`.
pub mod entry_list {
    use kythira_guest::bytes::{ByteStr, ByteString};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    struct EntryRef<'a> {
        key: ByteStr<'a>,
        value: ByteStr<'a>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        key: ByteString,
        value: ByteString,
    }

    /// The field's type: key/value pairs.
    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    /// Writes the pairs as a sequence of `{key, value}` structs.
    ///
    /// # Errors
    ///
    /// The serializer's.
    pub fn serialize<S: Serializer>(
        entries: &[(Vec<u8>, Vec<u8>)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(entries.iter().map(|(key, value)| EntryRef {
            key: ByteStr(key),
            value: ByteStr(value),
        }))
    }

    /// Reads what [`serialize`] writes.
    ///
    /// # Errors
    ///
    /// The deserializer's, or an entry that is not a `{key, value}` pair.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        let entries = Vec::<Entry>::deserialize(deserializer)?;
        Ok(entries
            .into_iter()
            .map(|Entry { key, value }| (key.into_vec(), value.into_vec()))
            .collect())
    }
}

/// Why a command or query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("scan limit {limit} exceeds the maximum of {MAX_SCAN_LIMIT}")]
    ScanLimitTooLarge { limit: u32 },
}

/// The store: an ordered map, so its snapshot is canonical.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    #[serde(with = "byte_map")]
    entries: BTreeMap<Key, Vec<u8>>,
}

/// Serializes the map with keys and values as byte strings: the same postcard
/// bytes as a map of `Vec<u8>`, but copied in bulk instead of byte by byte,
/// which is what makes large snapshots cheap in fuel.
mod byte_map {
    use std::collections::BTreeMap;
    use std::fmt;

    use kythira_guest::Key;
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<Key, Vec<u8>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(map.iter().map(|(k, v)| (k, Bytes::new(v))))
    }

    /// Collects the entries and builds the map in one pass. A snapshot lists
    /// its keys in order, and `BTreeMap`'s `FromIterator` then builds the
    /// tree bottom up instead of searching it for every insert: restoring a
    /// state, which every checkpoint does, costs a fraction of inserting its
    /// entries one by one. Out-of-order input is still accepted, with the
    /// meaning inserts would give it (a repeated key keeps its last value).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<BTreeMap<Key, Vec<u8>>, D::Error> {
        struct Entries;

        impl<'de> Visitor<'de> for Entries {
            type Value = BTreeMap<Key, Vec<u8>>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of byte strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                // The length prefix comes from untrusted bytes: cap the
                // reservation, the entries themselves prove the rest.
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0).min(1 << 16));
                while let Some((key, value)) = map.next_entry::<Key, ByteBuf>()? {
                    entries.push((key, value.into_vec()));
                }
                Ok(entries.into_iter().collect())
            }
        }

        deserializer.deserialize_map(Entries)
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

    /// The entries in ascending key order, by value: what a later version of
    /// this plugin migrates from after decoding this version's state.
    pub fn into_entries(self) -> impl Iterator<Item = (Key, Vec<u8>)> {
        self.entries.into_iter()
    }

    fn get(&self, key: Vec<u8>) -> Response {
        Response::Value(self.entries.get(&Key::from(key)).cloned())
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
            .map(|(key, value)| (key.to_vec(), value.clone()))
            .collect();
        let more = matching.next().is_some();
        Ok(Response::Entries { entries, more })
    }
}

impl StateMachine for KvStore {
    type Command = Command;
    type Response = Response;
    type Query = Query;
    type QueryResponse = Response;
    type Error = KvError;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<Response, KvError> {
        Ok(match command {
            Command::Put { key, value } => Response::Value(self.entries.insert(key.into(), value)),
            Command::Get { key } => self.get(key),
            Command::Delete { key } => Response::Value(self.entries.remove(&Key::from(key))),
            Command::CompareAndSwap { key, expected, new } => {
                let key = Key::from(key);
                let current = self.entries.get(&key);
                if current != expected.as_ref() {
                    return Ok(Response::Mismatch {
                        current: current.cloned(),
                    });
                }
                match new {
                    Some(value) => self.entries.insert(key, value),
                    None => self.entries.remove(&key),
                };
                Response::Swapped
            }
            Command::Scan(scan) => self.scan(&scan)?,
        })
    }

    fn query(&self, query: Query) -> Result<Response, KvError> {
        match query {
            Query::Get { key } => Ok(self.get(key)),
            Query::Scan(scan) => self.scan(&scan),
        }
    }
}

#[cfg(feature = "component")]
kythira_guest::export!(KvStore);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    fn put(key: &[u8], value: &[u8]) -> Command {
        Command::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    fn scan(prefix: &[u8], start_after: Option<&[u8]>, limit: u32) -> Scan {
        Scan {
            prefix: prefix.to_vec(),
            start_after: start_after.map(<[u8]>::to_vec),
            limit,
        }
    }

    fn entries(pairs: &[(&[u8], &[u8])], more: bool) -> Response {
        Response::Entries {
            entries: pairs
                .iter()
                .map(|(key, value)| (key.to_vec(), value.to_vec()))
                .collect(),
            more,
        }
    }

    /// The examples of this crate's README, byte for byte.
    #[test]
    fn wire_format_matches_the_readme() {
        use kythira_guest::codec::encode;
        assert_eq!(
            encode(&put(b"k", b"vv")).unwrap(),
            [0x00, 0x01, 0x6b, 0x02, 0x76, 0x76]
        );
        let cas = Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: None,
            new: Some(b"v".to_vec()),
        };
        assert_eq!(
            encode(&cas).unwrap(),
            [0x03, 0x01, 0x6b, 0x00, 0x01, 0x01, 0x76]
        );
        assert_eq!(
            encode(&Query::Scan(scan(b"a", None, 300))).unwrap(),
            [0x01, 0x01, 0x61, 0x00, 0xac, 0x02]
        );
        assert_eq!(encode(&Response::Value(None)).unwrap(), [0x00, 0x00]);
        assert_eq!(
            encode(&entries(&[(b"a", b"1")], false)).unwrap(),
            [0x03, 0x01, 0x01, 0x61, 0x01, 0x31, 0x00]
        );
    }

    /// The JSON examples of this crate's README, through the same
    /// translation the component exports.
    #[test]
    fn json_matches_the_readme() {
        use kythira_guest::Raw;
        use kythira_guest::codec::encode;
        let command = |json: &str| Raw::<KvStore>::command_from_json(json);
        let query = |json: &str| Raw::<KvStore>::query_from_json(json);
        let response = |r: &Response| Raw::<KvStore>::response_to_json(&encode(r).unwrap());

        assert_eq!(
            command(r#"{"put":{"key":"k","value":"vv"}}"#),
            Ok(encode(&put(b"k", b"vv")).unwrap())
        );
        assert_eq!(
            command(r#"{"get":{"key":"k"}}"#),
            Ok(encode(&Command::Get { key: b"k".to_vec() }).unwrap())
        );
        assert_eq!(
            command(r#"{"delete":{"key":{"hex":"00ff"}}}"#),
            Ok(encode(&Command::Delete { key: vec![0, 0xff] }).unwrap())
        );
        let cas = Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: None,
            new: Some(b"v".to_vec()),
        };
        assert_eq!(
            command(r#"{"compare_and_swap":{"key":"k","expected":null,"new":"v"}}"#),
            Ok(encode(&cas).unwrap())
        );
        // Absent options are `null`.
        assert_eq!(
            command(r#"{"compare_and_swap":{"key":"k","new":"v"}}"#),
            Ok(encode(&cas).unwrap())
        );
        assert_eq!(
            command(r#"{"scan":{"prefix":"b/","start_after":"b/1","limit":10}}"#),
            Ok(encode(&Command::Scan(scan(b"b/", Some(b"b/1"), 10))).unwrap())
        );
        assert_eq!(
            query(r#"{"scan":{"prefix":"a","limit":300}}"#),
            Ok(encode(&Query::Scan(scan(b"a", None, 300))).unwrap())
        );
        assert_eq!(
            query(r#"{"get":{"key":"a"}}"#),
            Ok(encode(&Query::Get { key: b"a".to_vec() }).unwrap())
        );

        assert_eq!(
            response(&Response::Value(None)).as_deref(),
            Ok(r#"{"value":null}"#)
        );
        assert_eq!(
            response(&Response::Value(Some(b"1".to_vec()))).as_deref(),
            Ok(r#"{"value":"1"}"#)
        );
        assert_eq!(response(&Response::Swapped).as_deref(), Ok(r#""swapped""#));
        assert_eq!(
            response(&Response::Mismatch {
                current: Some(b"v1".to_vec())
            })
            .as_deref(),
            Ok(r#"{"mismatch":{"current":"v1"}}"#)
        );
        assert_eq!(
            response(&entries(&[(b"a", b"1"), (b"b", &[0xff])], false)).as_deref(),
            Ok(
                r#"{"entries":{"entries":[{"key":"a","value":"1"},{"key":"b","value":{"hex":"ff"}}],"more":false}}"#
            )
        );
    }

    #[test]
    fn json_that_is_not_a_command_names_the_problem() {
        use kythira_guest::Raw;
        for (json, reason) in [
            (
                r#"{"Put":{"key":"a","value":"1"}}"#,
                "unknown variant `Put`",
            ),
            (r#"{"put":{"key":"a"}}"#, "missing field `value`"),
            (
                r#"{"put":{"key":"a","value":"1","ttl":5}}"#,
                "unknown field `ttl`",
            ),
            (r#"{"scan":{"prefix":"a","limit":-1}}"#, "invalid value"),
            ("put a 1", "expected value"),
        ] {
            let error = Raw::<KvStore>::command_from_json(json).unwrap_err();
            assert!(
                error.starts_with("invalid command JSON: ") && error.contains(reason),
                "{json}: {error}"
            );
        }
        // The JSON form of the state machine's answers, end to end.
        let mut kv = Harness::<KvStore>::new();
        assert_eq!(
            kv.apply_json(r#"{"put":{"key":"a","value":"1"}}"#)
                .as_deref(),
            Ok(r#"{"value":null}"#)
        );
        assert_eq!(
            kv.query_json(r#"{"scan":{"prefix":"","limit":20000}}"#),
            Err("scan limit 20000 exceeds the maximum of 10000".to_owned())
        );
    }

    #[test]
    fn put_get_delete() {
        let mut kv = Harness::<KvStore>::new();
        assert_eq!(kv.apply(&put(b"a", b"1")), Ok(Response::Value(None)));
        assert_eq!(
            kv.apply(&put(b"a", b"2")),
            Ok(Response::Value(Some(b"1".to_vec())))
        );
        assert_eq!(
            kv.apply(&Command::Get { key: b"a".to_vec() }),
            Ok(Response::Value(Some(b"2".to_vec())))
        );
        assert_eq!(
            kv.query(&Query::Get { key: b"a".to_vec() }),
            Ok(Response::Value(Some(b"2".to_vec())))
        );
        assert_eq!(
            kv.apply(&Command::Delete { key: b"a".to_vec() }),
            Ok(Response::Value(Some(b"2".to_vec())))
        );
        assert_eq!(
            kv.apply(&Command::Delete { key: b"a".to_vec() }),
            Ok(Response::Value(None))
        );
        assert_eq!(
            kv.query(&Query::Get { key: b"a".to_vec() }),
            Ok(Response::Value(None))
        );
        assert!(kv.machine().is_empty());
        kv.assert_deterministic();
        kv.assert_snapshot_transparent();
    }

    #[test]
    fn compare_and_swap() {
        let mut kv = Harness::<KvStore>::new();
        let cas = |expected: Option<&[u8]>, new: Option<&[u8]>| Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        // Create only if absent.
        assert_eq!(kv.apply(&cas(None, Some(b"v1"))), Ok(Response::Swapped));
        assert_eq!(
            kv.apply(&cas(None, Some(b"other"))),
            Ok(Response::Mismatch {
                current: Some(b"v1".to_vec())
            })
        );
        assert_eq!(
            kv.apply(&cas(Some(b"v1"), Some(b"v2"))),
            Ok(Response::Swapped)
        );
        assert_eq!(
            kv.apply(&cas(Some(b"v1"), None)),
            Ok(Response::Mismatch {
                current: Some(b"v2".to_vec())
            })
        );
        // Delete only if unchanged.
        assert_eq!(kv.apply(&cas(Some(b"v2"), None)), Ok(Response::Swapped));
        assert!(kv.machine().is_empty());
        assert_eq!(
            kv.apply(&cas(Some(b"v2"), None)),
            Ok(Response::Mismatch { current: None })
        );
        kv.assert_deterministic();
        kv.assert_snapshot_transparent();
    }

    #[test]
    fn scans_by_prefix_in_pages() {
        let mut kv = Harness::<KvStore>::new();
        for key in [&b"a"[..], b"b/1", b"b/2", b"b/3", b"b", b"c/1"] {
            kv.apply(&put(key, key)).unwrap();
        }
        assert_eq!(
            kv.query(&Query::Scan(scan(b"b/", None, 2))),
            Ok(entries(&[(b"b/1", b"b/1"), (b"b/2", b"b/2")], true))
        );
        assert_eq!(
            kv.query(&Query::Scan(scan(b"b/", Some(b"b/2"), 2))),
            Ok(entries(&[(b"b/3", b"b/3")], false))
        );
        // A cursor before the prefix starts at the prefix.
        assert_eq!(
            kv.query(&Query::Scan(scan(b"b/", Some(b"a"), 10))),
            Ok(entries(
                &[(b"b/1", b"b/1"), (b"b/2", b"b/2"), (b"b/3", b"b/3")],
                false
            ))
        );
        // The empty prefix scans everything; the command form answers alike.
        assert_eq!(
            kv.apply(&Command::Scan(scan(b"", None, 3))),
            Ok(entries(
                &[(b"a", b"a"), (b"b", b"b"), (b"b/1", b"b/1")],
                true
            ))
        );
        assert_eq!(
            kv.query(&Query::Scan(scan(b"b/", None, 0))),
            Ok(entries(&[], true))
        );
        assert_eq!(
            kv.query(&Query::Scan(scan(b"z", None, 5))),
            Ok(entries(&[], false))
        );
        assert_eq!(
            kv.query(&Query::Scan(scan(b"", None, MAX_SCAN_LIMIT + 1))),
            Err(format!(
                "scan limit {} exceeds the maximum of {MAX_SCAN_LIMIT}",
                MAX_SCAN_LIMIT + 1
            ))
        );
        kv.assert_snapshot_round_trip();
    }

    #[test]
    fn refuses_malformed_commands_without_changing_state() {
        let mut kv = Harness::<KvStore>::new();
        kv.apply(&put(b"k", b"v")).unwrap();
        let before = kv.state();
        let error = kv.apply_bytes(&[0, 5, b'k']).unwrap_err();
        assert!(error.starts_with("invalid command"), "{error}");
        let error = kv.apply_bytes(&[42]).unwrap_err();
        assert!(error.starts_with("invalid command"), "{error}");
        assert_eq!(kv.state(), before);
    }

    #[test]
    fn restores_maps_in_any_order_with_the_last_of_repeated_keys() {
        use kythira_guest::codec::{decode, encode};
        let pairs = |list: &[(&[u8], &[u8])]| -> Vec<(Vec<u8>, Vec<u8>)> {
            list.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
        };
        // A map encodes as a list of pairs; build non-canonical ones by hand.
        let shuffled = pairs(&[(b"b", b"2"), (b"a", b"1"), (b"b", b"3"), (b"c", b"4")]);
        let store: KvStore = decode(&encode(&shuffled).unwrap()).unwrap();
        let expected = pairs(&[(b"a", b"1"), (b"b", b"3"), (b"c", b"4")]);
        assert_eq!(encode(&store).unwrap(), encode(&expected).unwrap());
        // Canonical input round-trips unchanged.
        let store: KvStore = decode(&encode(&expected).unwrap()).unwrap();
        assert_eq!(encode(&store).unwrap(), encode(&expected).unwrap());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn many_keys_are_deterministic_and_snapshot_transparent() {
        let mut kv = Harness::<KvStore>::new();
        for i in 0u32..200 {
            // A fixed pseudo-random walk over 50 keys.
            let key = (i.wrapping_mul(2_654_435_761) % 50).to_be_bytes();
            let command = match i % 4 {
                0 | 1 => put(&key, &i.to_le_bytes()),
                2 => Command::Delete { key: key.to_vec() },
                _ => Command::CompareAndSwap {
                    key: key.to_vec(),
                    expected: None,
                    new: Some(vec![1]),
                },
            };
            kv.apply(&command).unwrap();
        }
        assert!(!kv.machine().is_empty());
        kv.assert_snapshot_round_trip();
        kv.assert_deterministic();
        kv.assert_snapshot_transparent();
    }
}
