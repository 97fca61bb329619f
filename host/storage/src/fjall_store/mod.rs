//! The durable log and hard-state store on fjall.
//!
//! # Layout
//!
//! One fjall database per node with two keyspaces (see [`layout`]): `log` maps
//! big-endian indexes to checksummed entries, `meta` holds the format marker, the
//! log bounds and the hard state, each checksummed.
//!
//! # Durability and group commit
//!
//! All writes go through one writer thread. It takes every request that is queued,
//! validates each against the log as it will be after the ones before it, writes
//! all of them as one atomic fjall batch together with the new log bounds, syncs
//! the journal once, and only then publishes the new state to readers and answers
//! every caller. So a write is acknowledged only after it is on disk, and concurrent
//! writers share one sync.
//!
//! # Recovery
//!
//! Because the bounds record travels in the same atomic batch as the entries, it
//! is a "synced up to" watermark: fjall's journal recovery drops a torn batch as a
//! whole (entries and bounds together), and after that every index inside the
//! bounds must be present, checksum-clean and in term order. Anything else is
//! corruption and [`FjallStore::open`] fails with an error naming the database
//! directory and the index. Opening reads and verifies every retained entry, which
//! keeps open time proportional to the retained log (compact it after snapshots).
//!
//! Reopen cost is fjall's journal replay plus that verification. The journals are
//! capped at 64 MiB and a clean close flushes the memtables, so replay is short
//! after a clean shutdown and bounded after a crash.
//!
//! Below that, the patched fjall (`vendor/fjall/KYTHIRA.md`) tells a torn final
//! batch of its journal, which it drops, from damage followed by intact batches,
//! which fails the open. Damage to the very last batch is indistinguishable
//! from a torn write of it.

mod recovery;
mod writer;

use crate::{
    HardState, HardStateStore, LogEntry, LogStore, RaftStorage, Result, StorageError,
    codec::{self, decode_log_key},
    shape::LogShape,
};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, Readable, config::CompressionPolicy};
use std::{
    ops::Range,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};
use writer::{Op, Request, Writer};

/// Names and keys of the on-disk layout, for tools that inspect a store.
pub mod layout {
    /// Keyspace of log entries, keyed by big-endian index.
    pub const LOG_KEYSPACE: &str = "log";
    /// Keyspace of the metadata records below.
    pub const META_KEYSPACE: &str = "meta";
    /// Key of the format marker.
    pub const FORMAT_KEY: &[u8] = b"format";
    /// Value of the format marker this version writes and reads.
    pub const FORMAT_VALUE: &[u8] = b"kythira-storage/1";
    /// Key of the durable log bounds.
    pub const BOUNDS_KEY: &[u8] = b"log_bounds";
    /// Key of the hard state.
    pub const HARD_STATE_KEY: &[u8] = b"hard_state";
    pub use crate::codec::{encode_entry, log_key};
}

/// Options of the log keyspace.
fn log_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default()
        // After a crash fjall replays the journal of the unflushed memtables; a
        // smaller memtable bounds that replay and so the time to reopen.
        .max_memtable_size(LOG_MEMTABLE_BYTES)
        // Payloads are opaque and often already compact; compressing them costs
        // CPU on every read and on the full verification at open.
        .data_block_compression_policy(CompressionPolicy::disabled())
        // Every point read is for an index known to be present.
        .expect_point_read_hits(true)
}

/// Cap on the total size of fjall's journals (fjall's minimum).
const MAX_JOURNALING_BYTES: u64 = 64 << 20;

/// Memtable size of the log keyspace.
const LOG_MEMTABLE_BYTES: u64 = 16 << 20;

/// What readers see: the state as of the last durable group commit.
struct View {
    shape: LogShape,
    hard_state: HardState,
    /// Database snapshot taken right after that commit, so reads never observe a
    /// later, not yet synced, batch.
    snapshot: fjall::Snapshot,
}

struct Shared {
    path: PathBuf,
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    view: RwLock<Arc<View>>,
    /// Journal syncs issued by the writer, for metrics and tests of group commit.
    syncs: AtomicU64,
    /// Set by the writer after a failed write or sync: nothing more is
    /// written, not even the memtable flush of a clean close.
    failed: AtomicBool,
}

impl Shared {
    /// Opens the database and verifies it; returns it with the recovered state.
    fn open(path: &Path) -> Result<(Self, LogShape, HardState)> {
        let path = path.to_path_buf();
        let db_error = |source| StorageError::database(&path, source);
        if path.exists() {
            forget_cached_pages(&path)?;
        }
        // Syncs are issued by the writer only, once per group.
        let db = Database::builder(&path)
            .manual_journal_persist(true)
            // Recovery after a crash replays every journal not yet covered by
            // flushed tables; fjall's smallest cap keeps that replay short.
            .max_journaling_size(MAX_JOURNALING_BYTES)
            // A compressed value's checksum was checked against a new
            // compression of the decompressed bytes, which holds only while
            // LZ4 gives the same output; payloads are opaque anyway.
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(db_error)?;
        let log = db
            .keyspace(layout::LOG_KEYSPACE, log_options)
            .map_err(db_error)?;
        let meta = db
            .keyspace(layout::META_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(db_error)?;
        let recovered = recovery::recover(&path, &db, &log, &meta)?;
        let view = View {
            shape: recovered.shape.clone(),
            hard_state: recovered.hard_state,
            snapshot: db.snapshot(),
        };
        let shared = Self {
            path,
            db,
            log,
            meta,
            view: RwLock::new(Arc::new(view)),
            syncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        };
        Ok((shared, recovered.shape, recovered.hard_state))
    }

    fn db_error(&self, source: fjall::Error) -> StorageError {
        StorageError::database(&self.path, source)
    }

    fn view(&self) -> Arc<View> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn publish(&self, view: View) {
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

/// Drops the page cache's clean pages of every file under `dir`, so that
/// recovery reads what the disk holds. After a failed fsync Linux marks the
/// pages that did not reach the disk clean and keeps them: a process that
/// reopened the store would read them back and take an unsynced batch for
/// a durable one, and later acknowledged batches would land after a hole on
/// the disk. Dirty pages (a process killed before its sync) are kept and
/// written back as usual.
fn forget_cached_pages(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let io = |op, path: &Path, e| StorageError::io(op, path, e);
    for item in std::fs::read_dir(dir).map_err(|e| io("read directory", dir, e))? {
        let item = item.map_err(|e| io("read directory", dir, e))?;
        let path = item.path();
        let kind = item.file_type().map_err(|e| io("inspect", &path, e))?;
        if kind.is_dir() {
            forget_cached_pages(&path)?;
        } else if kind.is_file() {
            let file = std::fs::File::open(&path).map_err(|e| io("open", &path, e))?;
            // SAFETY: a plain system call on a descriptor this function owns.
            let rc =
                unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if rc != 0 {
                let e = std::io::Error::from_raw_os_error(rc);
                return Err(io("drop cached pages of", &path, e));
            }
        }
    }
    Ok(())
}

/// Durable [`RaftStorage`] on fjall with group commit. See the module docs.
///
/// All methods block (writes until their sync completes); call them from
/// `spawn_blocking` or a dedicated thread in an async program. The store may be
/// shared between threads; concurrent writes are committed together.
pub struct FjallStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl FjallStore {
    /// Opens (or creates) the store in directory `path`, verifying every retained
    /// entry. Fails with a corruption error if acknowledged data is damaged.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let writer = Writer::open(path.as_ref())?;
        let shared = Arc::clone(writer.shared());
        let (requests, queue) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("kythira-storage-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| StorageError::io("spawn writer thread for", &shared.path, e))?;
        Ok(Self {
            shared,
            requests: Some(requests),
            writer: Some(writer),
        })
    }

    /// Directory of the database.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Number of journal syncs since open. Concurrent writes share syncs, so this
    /// grows slower than the number of writes under load.
    pub fn sync_count(&self) -> u64 {
        self.shared.syncs.load(Ordering::Relaxed)
    }

    /// Term of the last entry (or of the compacted prefix when the log is empty).
    pub fn last_term(&self) -> u64 {
        self.shared.view().shape.last_term()
    }

    fn submit(&self, op: Op) -> Result<()> {
        let (done, outcome) = mpsc::sync_channel(1);
        let poisoned = || StorageError::Poisoned {
            path: self.shared.path.clone(),
            cause: "the writer thread stopped".into(),
        };
        self.submit_then(
            op,
            Box::new(move |r| {
                let _ = done.send(r);
            }),
        )?;
        outcome.recv().map_err(|_| poisoned())?
    }

    fn submit_then(&self, op: Op, done: writer::Done) -> Result<()> {
        // Before the writer thread: an oversized write must not reach fjall.
        crate::types::check_sizes(op.entries())?;
        self.requests
            .as_ref()
            .expect("present until drop")
            .send(Request { op, done })
            .map_err(|_| StorageError::Poisoned {
                path: self.shared.path.clone(),
                cause: "the writer thread stopped".into(),
            })
    }

    /// [`RaftStorage::save`] without waiting: queues the write and returns at
    /// once; the writer thread calls `done` with the outcome once the write
    /// is durable (fsync), or failed. Writes are made durable in the order
    /// they were queued, and grouped with whatever else is queued meanwhile.
    /// Saves a thread hop per write for a caller that has its own event loop.
    pub fn save_then(
        &self,
        hard_state: Option<HardState>,
        entries: Vec<LogEntry>,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.submit_then(
            Op::Save {
                hard_state,
                entries,
            },
            Box::new(done),
        )
    }

    /// [`LogStore::compact_prefix`] without waiting, like
    /// [`save_then`](Self::save_then): `done` gets the outcome on the writer
    /// thread once it is durable.
    ///
    /// Ordering: every write queued through this store (`save_then`,
    /// `compact_then`, `reset_then` and the blocking calls) is validated against
    /// the log as the writes queued before it leave it, and made durable in queue
    /// order: a write is never durable before one queued earlier. Writes the writer
    /// finds queued together commit as one atomic batch with one sync; which
    /// writes those are depends on timing.
    pub fn compact_then(
        &self,
        upto: u64,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.submit_then(Op::Compact(upto), Box::new(done))
    }

    /// [`LogStore::reset`] without waiting, for installing a snapshot: `done` gets
    /// the outcome on the writer thread once it is durable.
    ///
    /// Ordered with the other writes as [`compact_then`](Self::compact_then)
    /// says: a [`save_then`](Self::save_then) queued after it (hard state and the
    /// entries after the snapshot) is validated against the reset log and is never
    /// durable without the reset. Whether the two share one atomic batch depends on
    /// whether the writer thread wakes between the two calls: usually they do, but
    /// a crash may also find the reset durable and the save not, which is a
    /// consistent state (the log is the snapshot's, the save is simply lost as an
    /// unacknowledged write would be).
    pub fn reset_then(
        &self,
        index: u64,
        term: u64,
        done: impl FnOnce(Result<()>) + Send + 'static,
    ) -> Result<()> {
        self.submit_then(Op::Reset { index, term }, Box::new(done))
    }

    fn missing(&self, view: &View, index: u64) -> StorageError {
        StorageError::MissingEntry {
            path: self.shared.path.clone(),
            index,
            first: view.shape.first_index(),
            last: view.shape.last_index(),
        }
    }

    fn decode(&self, index: u64, value: &[u8]) -> Result<LogEntry> {
        codec::decode_entry(index, value).map_err(|defect| StorageError::CorruptEntry {
            path: self.shared.path.clone(),
            index,
            defect,
        })
    }
}

impl Drop for FjallStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what is queued and exit.
        drop(self.requests.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        // A clean close flushes the memtables, so the next open need not replay
        // their journal. Everything is durable already; a failure here only costs
        // that replay. After a failed write or sync nothing more is written: the
        // memtables may hold a batch that never reached the disk. (The patched
        // fjall gives up waiting for a flush once a worker has failed, so this
        // returns.)
        if self.shared.failed.load(Ordering::Acquire) {
            return;
        }
        for keyspace in [&self.shared.log, &self.shared.meta] {
            let _ = keyspace.rotate_memtable_and_wait();
        }
    }
}

impl LogStore for FjallStore {
    fn first_index(&self) -> u64 {
        self.shared.view().shape.first_index()
    }

    fn last_index(&self) -> u64 {
        self.shared.view().shape.last_index()
    }

    fn term(&self, index: u64) -> Result<u64> {
        self.shared.view().shape.term(index)
    }

    fn entry(&self, index: u64) -> Result<LogEntry> {
        let view = self.shared.view();
        view.shape.check_range(index, index.saturating_add(1))?;
        let value = view
            .snapshot
            .get(&self.shared.log, codec::log_key(index))
            .map_err(|e| self.shared.db_error(e))?
            .ok_or_else(|| self.missing(&view, index))?;
        self.decode(index, &value)
    }

    fn entries(&self, range: Range<u64>, max_bytes: u64) -> Result<Vec<LogEntry>> {
        let view = self.shared.view();
        view.shape.check_range(range.start, range.end)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let keys = codec::log_key(range.start)..codec::log_key(range.end);
        let mut out = Vec::new();
        let mut total = 0u64;
        let mut expected = range.start;
        for item in view.snapshot.range(&self.shared.log, keys) {
            let (key, value) = item.into_inner().map_err(|e| self.shared.db_error(e))?;
            if decode_log_key(&key) != Some(expected) {
                return Err(self.missing(&view, expected));
            }
            let entry = self.decode(expected, &value)?;
            total = total.saturating_add(entry.size());
            if !out.is_empty() && total > max_bytes {
                return Ok(out);
            }
            out.push(entry);
            expected += 1;
        }
        if expected != range.end {
            return Err(self.missing(&view, expected));
        }
        Ok(out)
    }

    fn append(&self, entries: &[LogEntry]) -> Result<()> {
        self.submit(Op::Append(entries.to_vec()))
    }

    fn truncate_suffix(&self, from: u64) -> Result<()> {
        self.submit(Op::Truncate(from))
    }

    fn compact_prefix(&self, upto: u64) -> Result<()> {
        self.submit(Op::Compact(upto))
    }

    fn reset(&self, index: u64, term: u64) -> Result<()> {
        self.submit(Op::Reset { index, term })
    }
}

impl HardStateStore for FjallStore {
    fn hard_state(&self) -> HardState {
        self.shared.view().hard_state
    }

    fn save_hard_state(&self, state: &HardState) -> Result<()> {
        self.submit(Op::Save {
            hard_state: Some(*state),
            entries: Vec::new(),
        })
    }
}

impl RaftStorage for FjallStore {
    fn save(&self, hard_state: Option<&HardState>, entries: &[LogEntry]) -> Result<()> {
        self.submit(Op::Save {
            hard_state: hard_state.copied(),
            entries: entries.to_vec(),
        })
    }
}
