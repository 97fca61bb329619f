//! The node's log on disk: recovery at start, and writes handed to the
//! store's writer thread, which makes each [`Write`] durable while the event
//! loop goes on.
//!
//! The core hands out several writes before the first is durable (the
//! driver bounds how many); the writer thread takes every write queued
//! behind a busy disk into its next atomic batch and fsync, and reports each
//! one in order. Group commit thus happens twice: proposals made during a
//! write join the next batch, and batches queued during an fsync share the
//! next one.

use std::sync::Arc;

use kythira_raft::{Entry, EntryKind, HardState, Persisted, Write};
use kythira_storage::{FjallStore, HardStateStore, LogStore, StorageError};
use tokio::sync::mpsc;

use crate::NodeError;
use crate::entry::{self, from_storage, to_storage};

/// What the node recovered from disk.
pub struct Recovered {
    /// State for the core.
    pub persisted: Persisted,
    /// Largest leader timestamp in the log, so that new entries never go back in time.
    pub last_timestamp_ms: u64,
}

/// Reads the whole durable log and hard state.
pub fn recover(store: &FjallStore) -> Result<Recovered, NodeError> {
    let hs = store.hard_state();
    let (first, last) = (store.first_index(), store.last_index());
    if first > 1 && last >= first {
        return Err(NodeError::Corrupt(format!(
            "the log starts at index {first}, but this node has no snapshot to start from"
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(last as usize);
    let mut next = 1;
    while next <= last {
        let chunk = store.entries(next..last + 1, 64 << 20)?;
        if chunk.is_empty() {
            return Err(NodeError::Corrupt(format!("entry {next} is missing")));
        }
        for e in chunk {
            if e.index != next {
                return Err(NodeError::Corrupt(format!(
                    "expected entry {next}, found entry {}",
                    e.index
                )));
            }
            next = e.index + 1;
            entries.push(from_storage(e).map_err(|e| NodeError::Corrupt(e.to_string()))?);
        }
    }
    if hs.commit > last {
        // Committed entries are never truncated: they were lost.
        return Err(NodeError::Corrupt(format!(
            "the hard state says entries up to {} are committed, but the log ends at {last}",
            hs.commit
        )));
    }
    let mut last_timestamp_ms = 0;
    for e in entries.iter().filter(|e| e.kind == EntryKind::Normal) {
        // An unreadable envelope is answered with an error at apply; it
        // carries no time to respect.
        if let Ok(ts) = entry::timestamp(e.index, &e.data) {
            last_timestamp_ms = last_timestamp_ms.max(ts);
        }
    }
    Ok(Recovered {
        persisted: Persisted {
            snapshot: None,
            hard_state: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit,
            },
            entries,
            // The state machines live in memory: replay everything.
            applied: 0,
        },
        last_timestamp_ms,
    })
}

/// Hands writes to the store's writer thread; their completions arrive on
/// the channel given to [`Disk::new`], in order.
pub struct Disk {
    /// `Some` until dropped.
    store: Option<Arc<FjallStore>>,
    done: mpsc::UnboundedSender<Result<(), StorageError>>,
}

impl Drop for Disk {
    fn drop(&mut self) {
        // Closing the store joins its writer and waits for fjall's flush of
        // the memtables: blocking work that must not run on (and, with the
        // runtime shutting down, can deadlock) an async worker thread. Every
        // write is durable already; the close only spares the next open a
        // journal replay.
        if let Some(store) = self.store.take() {
            let _ = std::thread::Builder::new()
                .name("kythira-close".into())
                .spawn(move || drop(store));
        }
    }
}

impl Disk {
    /// Writes to `store`; each finished write sends one `Ok(())` (or the
    /// error that stops the node) on `done`.
    pub fn new(
        store: Arc<FjallStore>,
        done: mpsc::UnboundedSender<Result<(), StorageError>>,
    ) -> Self {
        Self {
            store: Some(store),
            done,
        }
    }

    /// Queues a write without waiting for it.
    pub fn write(&self, w: Write) -> Result<(), NodeError> {
        // The daemon never compacts its log and its peer codec carries no
        // snapshot, so no core of it can accept one: stop rather than go on
        // without the state it stands for.
        if w.snapshot.is_some() {
            return Err(NodeError::Stopped(
                "the core accepted a snapshot, which this node cannot install",
            ));
        }
        let hs = w.hard_state.map(|hs| kythira_storage::HardState {
            term: hs.term,
            vote: hs.vote,
            commit: hs.commit,
        });
        let entries: Vec<_> = w.entries.iter().map(to_storage).collect();
        // If the writer thread dies with this write queued, the callback is
        // dropped uncalled: the guard then reports it, so the node stops
        // instead of waiting forever on a write that never completes.
        let mut done = Completion {
            tx: Some(self.done.clone()),
            path: store_path(self.store.as_ref()),
        };
        // Durability: the store writes the hard state and entries atomically
        // and calls back only after fdatasync; the event loop sends votes and
        // acknowledgements only after that callback.
        let store = self.store.as_ref().expect("present until dropped");
        store.save_then(hs, entries, move |result| done.finish(result))?;
        Ok(())
    }
}

/// Name of the file that ties a data directory to one node of one cluster.
const IDENTITY_FILE: &str = "kythira-node";

/// Refuses a data directory written by another node or another cluster, and
/// claims a new one. Starting node 2 on node 1's log, or on another
/// cluster's, would make it vote and acknowledge with state it never had.
pub fn claim(dir: &std::path::Path, id: u64, cluster: &str) -> Result<(), NodeError> {
    let path = dir.join(IDENTITY_FILE);
    let expected = format!("node = {id}\ncluster = {cluster}\n");
    match std::fs::read_to_string(&path) {
        Ok(found) if found == expected => Ok(()),
        Ok(found) => {
            let field = |name: &str| {
                found
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim_start_matches([' ', '=']).trim().to_string())
                    .unwrap_or_else(|| "?".into())
            };
            Err(NodeError::Config(format!(
                "{} belongs to node {} of cluster {}, but this is node {id} of cluster {cluster}; \
                 point data_dir elsewhere",
                dir.display(),
                field("node"),
                field("cluster"),
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
            {
                use std::io::Write as _;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(expected.as_bytes())?;
                // Durable before the log it vouches for is written.
                f.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn store_path(store: Option<&Arc<FjallStore>>) -> std::path::PathBuf {
    store.map(|s| s.path().to_path_buf()).unwrap_or_default()
}

/// A write's completion, reported exactly once: by the writer's callback,
/// or, if the writer drops it uncalled, as a failure.
struct Completion {
    tx: Option<mpsc::UnboundedSender<Result<(), StorageError>>>,
    path: std::path::PathBuf,
}

impl Completion {
    fn finish(&mut self, result: Result<(), StorageError>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(result);
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.path);
        self.finish(Err(StorageError::Poisoned {
            path,
            cause: "the log writer stopped before the write completed".into(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_belongs_to_one_node_of_one_cluster() {
        let dir = tempfile::tempdir().unwrap();
        claim(dir.path(), 1, "abc").unwrap();
        claim(dir.path(), 1, "abc").unwrap();
        let e = claim(dir.path(), 2, "abc").unwrap_err().to_string();
        assert!(e.contains("belongs to node 1 of cluster abc"), "{e}");
        let e = claim(dir.path(), 1, "def").unwrap_err().to_string();
        assert!(e.contains("this is node 1 of cluster def"), "{e}");
    }
}
