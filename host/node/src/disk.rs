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

use kythira_raft::{Entry, EntryKind, HardState, Membership, Persisted, SnapshotMeta, Write};
use kythira_storage::{
    FjallStore, HardStateStore, LogStore, SnapshotInfo, SnapshotStore, StorageError,
};
use tokio::sync::mpsc;

use crate::NodeError;
use crate::entry::{self, from_storage, to_storage};
use crate::image::Image;

/// What the node recovered from disk.
pub struct Recovered {
    /// State for the core.
    pub persisted: Persisted,
    /// Largest leader timestamp in the log, so that new entries never go back in time.
    pub last_timestamp_ms: u64,
    /// The latest snapshot's state, which the state machines start from.
    pub image: Option<Image>,
}

/// The core's view of a stored snapshot's metadata.
pub fn snapshot_meta(info: &SnapshotInfo) -> Result<SnapshotMeta, NodeError> {
    let membership = Membership::decode(&info.meta.configuration).map_err(|e| {
        NodeError::Corrupt(format!(
            "the membership of the snapshot at index {} does not decode: {e}",
            info.meta.index
        ))
    })?;
    Ok(SnapshotMeta {
        index: info.meta.index,
        term: info.meta.term,
        membership,
    })
}

/// The storage form of a snapshot's metadata.
pub fn storage_meta(meta: &SnapshotMeta) -> kythira_storage::SnapshotMeta {
    kythira_storage::SnapshotMeta {
        index: meta.index,
        term: meta.term,
        configuration: meta.membership.encode(),
    }
}

/// Reads the latest snapshot and the durable log after it, and the hard state.
///
/// A crash while installing a received snapshot can leave the new snapshot
/// beside the old log (the snapshot file is published before the log is
/// reset). The log is kept only if it holds the snapshot's last entry;
/// otherwise it is reset to the snapshot here, as the install would have.
pub fn recover(store: &FjallStore, snapshots: &SnapshotStore) -> Result<Recovered, NodeError> {
    let hs = store.hard_state();
    let latest = snapshots.latest();
    let snapshot = latest.as_ref().map(snapshot_meta).transpose()?;
    let image = match &snapshot {
        Some(meta) => {
            let image = crate::applier::read_image(snapshots).map_err(|e| {
                NodeError::Corrupt(format!("the snapshot at index {}: {e}", meta.index))
            })?;
            if image.applied != meta.index {
                return Err(NodeError::Corrupt(format!(
                    "the snapshot at index {} holds the state at index {}",
                    meta.index, image.applied
                )));
            }
            Some(image)
        }
        None => None,
    };
    let base = snapshot.as_ref().map_or(0, |m| m.index);
    if let Some(meta) = &snapshot {
        let holds = store.first_index() <= meta.index + 1
            && store.last_index() >= meta.index
            && store.term(meta.index).ok() == Some(meta.term);
        if !holds {
            tracing::info!(
                index = meta.index,
                term = meta.term,
                "the log does not hold the snapshot's last entry: finishing its install"
            );
            store.reset(meta.index, meta.term)?;
        }
    }
    let (first, last) = (store.first_index(), store.last_index());
    if first > base + 1 && last >= first {
        return Err(NodeError::Corrupt(format!(
            "the log starts at index {first}, but the latest snapshot ends at index {base}"
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(last.saturating_sub(base) as usize);
    let mut next = base + 1;
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
    if hs.commit > last.max(base) {
        // Committed entries are never truncated: they were lost.
        return Err(NodeError::Corrupt(format!(
            "the hard state says entries up to {} are committed, but the log ends at {last}",
            hs.commit
        )));
    }
    let mut last_timestamp_ms = image.as_ref().map_or(0, |i| i.last_timestamp_ms);
    for e in entries.iter().filter(|e| e.kind == EntryKind::Normal) {
        // An unreadable envelope is answered with an error at apply; it
        // carries no time to respect.
        if let Ok(ts) = entry::timestamp(e.index, &e.data) {
            last_timestamp_ms = last_timestamp_ms.max(ts);
        }
    }
    Ok(Recovered {
        persisted: Persisted {
            snapshot,
            hard_state: HardState {
                term: hs.term,
                vote: hs.vote,
                commit: hs.commit.max(base),
            },
            entries,
            // The state machines live in memory: they start from the
            // snapshot and replay the log after it.
            applied: base,
        },
        last_timestamp_ms,
        image,
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
        let store = self.store.as_ref().expect("present until dropped");
        if let Some(meta) = &w.snapshot {
            crate::crash_point("snapshot-install");
            // The snapshot's file is durable already (received, verified and
            // synced before the core saw its message); the log now restarts
            // after it. A failed reset stops the node; the write queued
            // behind it then fails too.
            let done = self.done.clone();
            store.reset_then(meta.index, meta.term, move |result| {
                if let Err(e) = result {
                    let _ = done.send(Err(e));
                }
            })?;
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
        store.save_then(hs, entries, move |result| done.finish(result))?;
        Ok(())
    }
}

impl Disk {
    /// Drops the log up to `upto`, which a durable snapshot covers, behind
    /// every write already queued. A failure stops the node.
    pub fn compact(&self, upto: u64) -> Result<(), NodeError> {
        let done = self.done.clone();
        let store = self.store.as_ref().expect("present until dropped");
        store.compact_then(upto, move |result| {
            if let Err(e) = result {
                let _ = done.send(Err(e));
            }
        })?;
        Ok(())
    }
}

/// Name of the file that ties a data directory to one node of one cluster.
const IDENTITY_FILE: &str = "kythira-node";

/// Name of the file a running node holds an exclusive lock on.
const LOCK_FILE: &str = "lock";

/// A data directory this process holds: the lock is released when it is
/// dropped (or the process ends, however it ends).
#[derive(Debug)]
pub struct Claim {
    _lock: std::fs::File,
}

/// The log store's directory under a data directory.
pub fn log_dir(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.join("log")
}

/// What an interrupted [`init`] can leave in a data directory: it writes the
/// identity file last, so a directory without one never served.
const INIT_LEFTOVERS: [&str; 4] = ["log", "snapshots", LOCK_FILE, "kythira-node.tmp"];

/// Creates a new node's data directory, deliberately and once: owner-only,
/// with an empty log and an empty snapshot store, and the node's identity
/// written last. A directory that holds anything else is refused, so this
/// can never wipe or shadow a node's state; one that holds only what an
/// interrupted `init` leaves is initialized again.
pub fn init(dir: &std::path::Path, id: u64, cluster: &str) -> Result<(), NodeError> {
    use std::os::unix::fs::DirBuilderExt;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let name = entry?.file_name();
            if !INIT_LEFTOVERS.iter().any(|l| name == *l) {
                return Err(NodeError::Config(format!(
                    "{} is not empty (it holds {}); a data directory is initialized once, and \
                     `serve` uses it as it is",
                    dir.display(),
                    name.to_string_lossy()
                )));
            }
        }
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let lock = lock(dir)?;
    for leftover in ["log", "snapshots"] {
        let path = dir.join(leftover);
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
    }
    drop(FjallStore::open(log_dir(dir))?);
    drop(kythira_storage::SnapshotStore::open(
        crate::node::snapshot_dir(dir),
    )?);
    // Last: the identity says the directory is whole.
    check_identity(dir, id, cluster)?;
    // The directory's own entry, or a power cut could lose all of it.
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::File::open(parent)?.sync_all()?;
    }
    drop(lock);
    Ok(())
}

/// [`claim`] for a node that is to serve: its directory must have been
/// created by [`init`]. A missing or empty directory is refused rather than
/// taken for a new node: after a failed mount or a lost disk, a node that
/// started afresh would have no vote and no log, and could vote twice in a
/// term or help elect a leader that lacks committed entries.
pub fn claim_existing(dir: &std::path::Path, id: u64, cluster: &str) -> Result<Claim, NodeError> {
    if !dir.join(IDENTITY_FILE).is_file() {
        let state = if dir.exists() { "empty" } else { "missing" };
        return Err(NodeError::Config(format!(
            "the data directory {} is {state}. If node {id} is new, create it once with \
             `kythira init --config FILE`. If node {id} has been a member, its log and vote \
             are lost and it must not start afresh: remove it from the cluster (`kythira \
             members remove {id}`) and add it back as a new node with a new id",
            dir.display()
        )));
    }
    let claim = claim(dir, id, cluster)?;
    let log = log_dir(dir);
    // fjall's format marker: an empty `log` would be taken for a new store.
    if !log.join("version").is_file() {
        return Err(NodeError::Config(format!(
            "the data directory {} of node {id} has lost its log ({} is missing or empty); the node \
             must not start without it: restore the directory, or remove node {id} from the \
             cluster and add it back as a new node with a new id",
            dir.display(),
            log.display()
        )));
    }
    Ok(claim)
}

/// Refuses a data directory written by another node or another cluster, or
/// in use by another process, and claims it (a new one is created owner-only).
/// Starting node 2 on node 1's log, or on another cluster's, would make it
/// vote and acknowledge with state it never had; two processes on one
/// directory would overwrite each other's log and snapshots.
pub fn claim(dir: &std::path::Path, id: u64, cluster: &str) -> Result<Claim, NodeError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Another node's or cluster's directory is named as such, whether or
    // not its node runs.
    check_identity(dir, id, cluster)?;
    // The log, snapshots and identity are this node's alone.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    let claim = lock(dir)?;
    // Again under the lock: two first starts may have raced to create it.
    check_identity(dir, id, cluster)?;
    Ok(claim)
}

/// Takes the exclusive lock on a data directory.
fn lock(dir: &std::path::Path) -> Result<Claim, NodeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))?;
    match lock.try_lock() {
        Ok(()) => Ok(Claim { _lock: lock }),
        Err(std::fs::TryLockError::WouldBlock) => Err(NodeError::Config(format!(
            "{} is in use by another kythira process; stop it first, or point data_dir \
             elsewhere",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

fn check_identity(dir: &std::path::Path, id: u64, cluster: &str) -> Result<(), NodeError> {
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

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<kythira_storage::LogEntry> {
        range
            .map(|index| {
                to_storage(&Entry {
                    index,
                    term,
                    kind: EntryKind::Noop,
                    data: Default::default(),
                })
            })
            .collect()
    }

    /// A snapshot of the (empty) state at `index`, published in `store`.
    fn snapshot(store: &SnapshotStore, index: u64, term: u64) {
        let mut image = crate::machines::Machines::new(crate::engines::Engines::new(None)).image();
        image.applied = index;
        let meta = SnapshotMeta {
            index,
            term,
            membership: Membership::new([1, 2, 3], []).unwrap(),
        };
        let mut w = store.begin(storage_meta(&meta)).unwrap();
        w.write_chunk(&image.encode()).unwrap();
        w.finish().unwrap();
    }

    fn stores(dir: &std::path::Path) -> (FjallStore, SnapshotStore) {
        (
            FjallStore::open(dir.join("log")).unwrap(),
            SnapshotStore::open(dir.join("snapshots")).unwrap(),
        )
    }

    /// A crash in the middle of installing a received snapshot leaves the
    /// new snapshot beside the old log: recovery finishes the install.
    #[test]
    fn a_snapshot_past_the_log_resets_it_at_recovery() {
        use kythira_storage::RaftStorage;
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, snaps) = stores(dir.path());
            log.save(
                Some(&kythira_storage::HardState {
                    term: 1,
                    vote: Some(1),
                    commit: 5,
                }),
                &entries(1..=10, 1),
            )
            .unwrap();
            snapshot(&snaps, 20, 2);
        }
        let (log, snaps) = stores(dir.path());
        let r = recover(&log, &snaps).unwrap();
        assert_eq!(r.persisted.snapshot.as_ref().map(|m| m.index), Some(20));
        assert!(r.persisted.entries.is_empty());
        assert_eq!(r.persisted.applied, 20);
        assert_eq!(r.persisted.hard_state.commit, 20);
        assert_eq!(r.image.unwrap().applied, 20);
        assert_eq!((log.first_index(), log.last_index()), (21, 20));
    }

    /// A log that holds the snapshot's last entry keeps what follows it.
    #[test]
    fn a_log_holding_the_snapshot_keeps_the_entries_after_it() {
        use kythira_storage::RaftStorage;
        let dir = tempfile::tempdir().unwrap();
        {
            let (log, snaps) = stores(dir.path());
            log.save(None, &entries(1..=30, 2)).unwrap();
            snapshot(&snaps, 20, 2);
        }
        let (log, snaps) = stores(dir.path());
        let r = recover(&log, &snaps).unwrap();
        let indexes: Vec<u64> = r.persisted.entries.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (21..=30).collect::<Vec<_>>());
        // A conflicting term at the snapshot's index means the log is not
        // the snapshot's history: it is reset.
        drop((log, snaps));
        let dir2 = tempfile::tempdir().unwrap();
        {
            let (log, snaps) = stores(dir2.path());
            log.save(None, &entries(1..=30, 1)).unwrap();
            snapshot(&snaps, 20, 2);
        }
        let (log, snaps) = stores(dir2.path());
        let r = recover(&log, &snaps).unwrap();
        assert!(r.persisted.entries.is_empty());
        assert_eq!(log.last_index(), 20);
    }

    #[test]
    fn a_directory_is_held_by_one_process_at_a_time_and_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("node-1");
        let held = claim(&dir, 1, "abc").unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let e = claim(&dir, 1, "abc").unwrap_err().to_string();
        assert!(e.contains("in use by another kythira process"), "{e}");
        drop(held);
        claim(&dir, 1, "abc").unwrap();
    }

    #[test]
    fn a_directory_belongs_to_one_node_of_one_cluster() {
        let dir = tempfile::tempdir().unwrap();
        drop(claim(dir.path(), 1, "abc").unwrap());
        drop(claim(dir.path(), 1, "abc").unwrap());
        let e = claim(dir.path(), 2, "abc").unwrap_err().to_string();
        assert!(e.contains("belongs to node 1 of cluster abc"), "{e}");
        let e = claim(dir.path(), 1, "def").unwrap_err().to_string();
        assert!(e.contains("this is node 1 of cluster def"), "{e}");
    }

    #[test]
    fn init_starts_over_after_an_interrupted_init_and_refuses_anything_else() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        // As an init that died before it wrote the identity.
        std::fs::create_dir_all(data.join("log")).unwrap();
        std::fs::write(data.join("log/0.jnl"), b"partial").unwrap();
        std::fs::write(data.join("lock"), b"").unwrap();
        assert!(claim_existing(&data, 1, "abc").is_err());
        init(&data, 1, "abc").unwrap();
        drop(claim_existing(&data, 1, "abc").unwrap());
        // Whole now: never initialized again.
        let e = init(&data, 1, "abc").unwrap_err().to_string();
        assert!(e.contains("not empty"), "{e}");
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("precious"), b"x").unwrap();
        let e = init(&other, 1, "abc").unwrap_err().to_string();
        assert!(e.contains("precious"), "{e}");
        assert!(other.join("precious").exists());
    }
}
