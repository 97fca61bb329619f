//! Key/value store plugin: put, get, delete, compare-and-swap and prefix scans
//! over byte-string keys and values.
//!
//! Commands, queries and responses are postcard encodings of [`Command`],
//! [`Query`] and [`Response`] (see this crate's README for the wire format);
//! encode them with [`kythira_guest::codec`].

use std::collections::BTreeMap;
use std::ops::Bound;

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// The most entries one scan returns; page through larger ranges with
/// `start_after`.
pub const MAX_SCAN_LIMIT: u32 = 10_000;

/// A command, applied through the replicated log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`. Answers [`Response::Value`] with the previous value.
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Reads `key`, ordered with the writes around it. Answers [`Response::Value`].
    Get { key: Vec<u8> },
    /// Removes `key`. Answers [`Response::Value`] with the removed value.
    Delete { key: Vec<u8> },
    /// Sets `key` to `new` (removes it if `None`) only if its current value is
    /// `expected` (`None`: the key is absent). Answers [`Response::Swapped`] or
    /// [`Response::Mismatch`].
    CompareAndSwap {
        key: Vec<u8>,
        expected: Option<Vec<u8>>,
        new: Option<Vec<u8>>,
    },
    /// Lists entries in key order. Answers [`Response::Entries`].
    Scan(Scan),
}

/// A read-only request, answered from the current state without the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Reads `key`. Answers [`Response::Value`].
    Get { key: Vec<u8> },
    /// Lists entries in key order. Answers [`Response::Entries`].
    Scan(Scan),
}

/// A prefix scan: keys starting with `prefix`, greater than `start_after` if
/// given, in ascending order, at most `limit` of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    pub prefix: Vec<u8>,
    pub start_after: Option<Vec<u8>>,
    pub limit: u32,
}

/// The answer to a [`Command`] or a [`Query`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// A key's value: the current one for `Get`, the one before the command
    /// for `Put` and `Delete`. `None` if the key was absent.
    Value(Option<Vec<u8>>),
    /// The compare-and-swap matched and was applied.
    Swapped,
    /// The compare-and-swap did not match; nothing changed.
    Mismatch { current: Option<Vec<u8>> },
    /// The scanned entries; `more` tells whether further keys match (continue
    /// with `start_after` set to the last key returned).
    Entries {
        entries: Vec<(Vec<u8>, Vec<u8>)>,
        more: bool,
    },
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
    entries: BTreeMap<Vec<u8>, Vec<u8>>,
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

    fn get(&self, key: &[u8]) -> Response {
        Response::Value(self.entries.get(key).cloned())
    }

    fn scan(&self, scan: &Scan) -> Result<Response, KvError> {
        if scan.limit > MAX_SCAN_LIMIT {
            return Err(KvError::ScanLimitTooLarge { limit: scan.limit });
        }
        let lower = match &scan.start_after {
            Some(after) if after.as_slice() >= scan.prefix.as_slice() => {
                Bound::Excluded(after.as_slice())
            }
            _ => Bound::Included(scan.prefix.as_slice()),
        };
        let mut matching = self
            .entries
            .range::<[u8], _>((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&scan.prefix));
        let entries: Vec<_> = matching
            .by_ref()
            .take(scan.limit as usize)
            .map(|(key, value)| (key.clone(), value.clone()))
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
            Command::Put { key, value } => Response::Value(self.entries.insert(key, value)),
            Command::Get { key } => self.get(&key),
            Command::Delete { key } => Response::Value(self.entries.remove(&key)),
            Command::CompareAndSwap { key, expected, new } => {
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
            Query::Get { key } => Ok(self.get(&key)),
            Query::Scan(scan) => self.scan(&scan),
        }
    }
}

kythira_guest::export!(KvStore);
