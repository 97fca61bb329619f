//! Snapshot files: written as a stream, published by an atomic rename, read back
//! in chunks.
//!
//! A snapshot file is `header | data | trailer`:
//! - header: magic `KYTHSNAP`, format version (u32), index, term (u64),
//!   configuration length (u32), configuration bytes, CRC-32C of the header;
//! - trailer: data length (u64), CRC-32C of the data, magic `KYTHEND1`.
//!
//! All integers are big-endian. A file only gets its final name
//! (`snapshot-<index>-<term>.snap`) after it is complete and synced, so a crash
//! leaves either the previous snapshot or the new one, plus at most a temporary file
//! that the next open deletes.
//!
//! A snapshot received from another node ([`SnapshotStore::receive`]) grows in a
//! partial file, `incoming-<index>-<term>-<data_len>-<checksum>.part`, in the same
//! format minus the trailer, so that finishing it only appends the trailer and
//! renames. The name records everything the sender promised, so a later attempt
//! at the same snapshot, even from another sender holding an identical copy,
//! resumes where the last one stopped. Partial files are flushed but not synced:
//! a crash may leave them short (the resume simply starts earlier) or with
//! garbage at the end, which the checksum check at the end catches.

use crate::{Result, SnapshotMeta, StorageError};
use bytes::Bytes;
use std::{
    fs::{self, File},
    io::{self, BufWriter, Read, Write},
    io::{Seek, SeekFrom},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

const MAGIC: &[u8; 8] = b"KYTHSNAP";
const TRAILER_MAGIC: &[u8; 8] = b"KYTHEND1";
const VERSION: u32 = 1;
const FIXED_HEADER_LEN: u64 = 8 + 4 + 8 + 8 + 4;
const TRAILER_LEN: u64 = 8 + 4 + 8;
/// Configurations are small; a larger length means a damaged header.
const MAX_CONFIGURATION_LEN: u32 = 64 << 20;
const SUFFIX: &str = ".snap";
const TEMP_SUFFIX: &str = ".tmp";
const PART_PREFIX: &str = "incoming-";
const PART_SUFFIX: &str = ".part";
/// Buffer of snapshot writes, and the step of reading data back.
const IO_CHUNK: usize = 1 << 20;

/// A complete snapshot: its metadata and the length and checksum of its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// What the snapshot stands for.
    pub meta: SnapshotMeta,
    /// Length of the data in bytes.
    pub data_len: u64,
    /// CRC-32C of the data, for end-to-end checks of a transferred snapshot.
    pub checksum: u32,
}

struct Latest {
    info: SnapshotInfo,
    path: PathBuf,
}

struct Inner {
    dir: PathBuf,
    latest: Mutex<Option<Latest>>,
    next_temp: AtomicU64,
    /// Set while an [`Incoming`] lives: each reception deletes the partial files
    /// of other snapshots, which must not be one still being written.
    receiving: AtomicBool,
    /// An exclusive lock on the directory, held while any clone lives.
    _lock: File,
}

/// The file a snapshot store holds its exclusive lock on.
const LOCK_FILE: &str = "lock";

/// Keeps the latest complete snapshot of a node in one directory.
///
/// Cheap to clone; clones share the directory. Blocking, like the rest of the crate.
/// Two handles are equal when they are clones of one opened store.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

impl PartialEq for SnapshotStore {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for SnapshotStore {}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let latest = self
            .lock()
            .as_ref()
            .map(|latest| (latest.info.meta.index, latest.info.meta.term));
        f.debug_struct("SnapshotStore")
            .field("dir", &self.inner.dir)
            .field("latest", &latest)
            .finish()
    }
}

fn file_name(index: u64, term: u64) -> String {
    format!("snapshot-{index:020}-{term:020}{SUFFIX}")
}

fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("snapshot-")?.strip_suffix(SUFFIX)?;
    let (index, term) = rest.split_once('-')?;
    Some((index.parse().ok()?, term.parse().ok()?))
}

fn part_name(info: &SnapshotInfo) -> String {
    format!(
        "{PART_PREFIX}{:020}-{:020}-{:020}-{:08x}{PART_SUFFIX}",
        info.meta.index, info.meta.term, info.data_len, info.checksum
    )
}

/// The snapshot index in a partial file's name, if it is one's.
fn parse_part_name(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PART_PREFIX)?.strip_suffix(PART_SUFFIX)?;
    let mut fields = rest.split('-');
    let index = fields.next()?.parse().ok()?;
    let _term: u64 = fields.next()?.parse().ok()?;
    let _data_len: u64 = fields.next()?.parse().ok()?;
    u32::from_str_radix(fields.next()?, 16).ok()?;
    fields.next().is_none().then_some(index)
}

/// The header of a snapshot file for `meta`.
fn encode_header(meta: &SnapshotMeta, dir: &Path) -> Result<Vec<u8>> {
    let config_len = u32::try_from(meta.configuration.len())
        .ok()
        .filter(|len| *len <= MAX_CONFIGURATION_LEN)
        .ok_or_else(|| {
            StorageError::io(
                "write snapshot header for",
                dir,
                io::Error::new(io::ErrorKind::InvalidInput, "configuration too large"),
            )
        })?;
    let mut header = Vec::with_capacity(FIXED_HEADER_LEN as usize + meta.configuration.len() + 4);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_be_bytes());
    header.extend_from_slice(&meta.index.to_be_bytes());
    header.extend_from_slice(&meta.term.to_be_bytes());
    header.extend_from_slice(&config_len.to_be_bytes());
    header.extend_from_slice(&meta.configuration);
    header.extend_from_slice(&crc32c::crc32c(&header).to_be_bytes());
    Ok(header)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("sync directory", dir, e))
}

impl SnapshotStore {
    /// Opens (or creates) the snapshot directory: deletes temporary files left by a
    /// crash, verifies the latest snapshot completely and deletes older ones.
    /// A damaged latest snapshot is an error, not a reason to fall back to an older
    /// one: the log may already be compacted past the older one.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            fs::create_dir_all(&dir).map_err(|e| StorageError::io("create directory", &dir, e))?;
            // Its entry in the parent, or a power cut can lose the directory
            // with every snapshot later written into it.
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        // Before anything is deleted: the cleanup below removes temporary and
        // superseded files, which in another process's store are its work.
        let lock_path = dir.join(LOCK_FILE);
        let dir_lock = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .map_err(|e| StorageError::io("open", &lock_path, e))?
        };
        match dir_lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StorageError::Locked { dir: dir.clone() });
            }
            Err(fs::TryLockError::Error(e)) => {
                return Err(StorageError::io("lock", &lock_path, e));
            }
        }
        let mut candidates = Vec::new();
        let mut partials = Vec::new();
        let listing = fs::read_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
        for item in listing {
            let item = item.map_err(|e| StorageError::io("list", &dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            let part = name.starts_with(PART_PREFIX) && name.ends_with(PART_SUFFIX);
            let stray_part = part && parse_part_name(name).is_none();
            if (name.starts_with("snapshot-") && name.ends_with(TEMP_SUFFIX)) || stray_part {
                fs::remove_file(item.path())
                    .map_err(|e| StorageError::io("remove", item.path(), e))?;
            } else if let Some(index) = parse_part_name(name) {
                partials.push((index, item.path()));
            } else if let Some((index, term)) = parse_file_name(name) {
                candidates.push((index, term, item.path()));
            }
        }
        candidates.sort();
        let latest = match candidates.pop() {
            Some((index, term, path)) => {
                let info = verify_file(&path)?;
                if (info.meta.index, info.meta.term) != (index, term) {
                    return Err(StorageError::CorruptSnapshot {
                        path,
                        detail: format!(
                            "header says index {} term {}, the file name says index {index} term {term}",
                            info.meta.index, info.meta.term
                        ),
                    });
                }
                Some(Latest { info, path })
            }
            None => None,
        };
        // Older snapshots are superseded. Their removal need not be synced: if one
        // reappears after a crash, the next open removes it again.
        for (_, _, path) in candidates {
            fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
        }
        // A partial newer than the latest snapshot is kept for the sender's next
        // attempt to resume; one at or below it can never be published.
        let latest_index = latest.as_ref().map(|latest| latest.info.meta.index);
        for (index, path) in partials {
            if latest_index.is_some_and(|latest| index <= latest) {
                fs::remove_file(&path).map_err(|e| StorageError::io("remove", &path, e))?;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                latest: Mutex::new(latest),
                next_temp: AtomicU64::new(0),
                receiving: AtomicBool::new(false),
                _lock: dir_lock,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Latest>> {
        self.inner
            .latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Directory of the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The latest complete snapshot, if any.
    pub fn latest(&self) -> Option<SnapshotInfo> {
        self.lock().as_ref().map(|latest| latest.info.clone())
    }

    /// Path of the latest snapshot file, if any.
    pub fn latest_path(&self) -> Option<PathBuf> {
        self.lock().as_ref().map(|latest| latest.path.clone())
    }

    /// Starts writing a snapshot for `meta`. Nothing becomes visible until
    /// [`SnapshotWriter::finish`]; dropping the writer discards it.
    pub fn begin(&self, meta: SnapshotMeta) -> Result<SnapshotWriter> {
        self.check_not_stale(&meta, self.lock().as_ref())?;
        let header = encode_header(&meta, &self.inner.dir)?;
        let temp = self.inner.dir.join(format!(
            "{}.{}{TEMP_SUFFIX}",
            file_name(meta.index, meta.term),
            self.inner.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let file = File::options()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| StorageError::io("create", &temp, e))?;
        let mut writer = SnapshotWriter {
            store: self.clone(),
            file: Some(BufWriter::with_capacity(IO_CHUNK, file)),
            temp,
            meta,
            data_len: 0,
            checksum: 0,
        };
        writer.put(&header)?;
        Ok(writer)
    }

    fn check_not_stale(&self, meta: &SnapshotMeta, latest: Option<&Latest>) -> Result<()> {
        match latest {
            Some(latest) if latest.info.meta.index > meta.index => {
                Err(StorageError::StaleSnapshot {
                    index: meta.index,
                    latest: latest.info.meta.index,
                })
            }
            _ => Ok(()),
        }
    }

    /// Starts or resumes receiving the snapshot described by `info` (its
    /// metadata, data length and checksum, as the sender announced them).
    ///
    /// Partial data kept from an earlier attempt at the same snapshot (same index,
    /// term, data length and checksum, and the same header) is kept, and
    /// [`Incoming::received`] says how much; its checksum is recomputed by reading
    /// it back. Every other partial file is deleted: one reception runs at a time
    /// per store, and another one while an [`Incoming`] lives is refused with
    /// [`StorageError::ReceptionInProgress`]. Refused with
    /// [`StorageError::StaleSnapshot`] if the latest complete snapshot is at a
    /// higher index.
    pub fn receive(&self, info: &SnapshotInfo) -> Result<Incoming> {
        self.check_not_stale(&info.meta, self.lock().as_ref())?;
        let header = encode_header(&info.meta, &self.inner.dir)?;
        if self.inner.receiving.swap(true, Ordering::AcqRel) {
            return Err(StorageError::ReceptionInProgress {
                dir: self.inner.dir.clone(),
            });
        }
        let reception = Reception(self.clone());
        let dir = &self.inner.dir;
        let name = part_name(info);
        let listing = fs::read_dir(dir).map_err(|e| StorageError::io("list", dir, e))?;
        for item in listing {
            let item = item.map_err(|e| StorageError::io("list", dir, e))?;
            let other = item.file_name();
            let Some(other) = other.to_str() else {
                continue;
            };
            if other != name && other.starts_with(PART_PREFIX) && other.ends_with(PART_SUFFIX) {
                fs::remove_file(item.path())
                    .map_err(|e| StorageError::io("remove", item.path(), e))?;
            }
        }
        let path = dir.join(name);
        let mut file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let (received, checksum) = resume_partial(&mut file, &path, &header, info.data_len)?;
        Ok(Incoming {
            store: self.clone(),
            info: info.clone(),
            path,
            file: Some(BufWriter::with_capacity(IO_CHUNK, file)),
            received,
            checksum,
            _reception: reception,
        })
    }

    /// Completes a snapshot file whose header and data `file` holds: appends the
    /// trailer, syncs, renames `temp` to the final name, syncs the directory, and
    /// makes it the latest snapshot, removing the one it replaces. On an error
    /// `temp` is left for the caller to remove.
    fn publish(
        &self,
        mut file: BufWriter<File>,
        temp: &Path,
        info: SnapshotInfo,
    ) -> Result<SnapshotInfo> {
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.extend_from_slice(&info.data_len.to_be_bytes());
        trailer.extend_from_slice(&info.checksum.to_be_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        file.write_all(&trailer)
            .map_err(|e| StorageError::io("write", temp, e))?;
        let file = file
            .into_inner()
            .map_err(|e| StorageError::io("write", temp, e.into_error()))?;
        // SYNC POINT: the snapshot's contents are durable before it gets its final
        // name, so a visible snapshot is always complete.
        file.sync_all()
            .map_err(|e| StorageError::io("sync", temp, e))?;
        drop(file);

        let dir = &self.inner.dir;
        let path = dir.join(file_name(info.meta.index, info.meta.term));
        let mut latest = self.lock();
        // Checked again under the lock: another writer may have finished a newer one.
        self.check_not_stale(&info.meta, latest.as_ref())?;
        fs::rename(temp, &path).map_err(|e| StorageError::io("rename", temp, e))?;
        // SYNC POINT: the rename is durable before the snapshot is reported complete
        // (and before the caller compacts the log it replaces).
        sync_dir(dir)?;
        let previous = latest.replace(Latest {
            info: info.clone(),
            path: path.clone(),
        });
        drop(latest);
        if let Some(previous) = previous.filter(|previous| previous.path != path) {
            // Not synced: a resurrected older snapshot is removed at the next open.
            fs::remove_file(&previous.path)
                .map_err(|e| StorageError::io("remove", &previous.path, e))?;
        }
        Ok(info)
    }

    /// Opens the latest snapshot for reading, if there is one. The reader keeps
    /// working even if a newer snapshot replaces this one meanwhile.
    pub fn open_latest(&self) -> Result<Option<SnapshotReader>> {
        let latest = self.lock();
        let Some(latest) = latest.as_ref() else {
            return Ok(None);
        };
        let file =
            File::open(&latest.path).map_err(|e| StorageError::io("open", &latest.path, e))?;
        Ok(Some(SnapshotReader {
            file,
            path: latest.path.clone(),
            data_offset: FIXED_HEADER_LEN + latest.info.meta.configuration.len() as u64 + 4,
            info: latest.info.clone(),
            position: 0,
            checksum: 0,
        }))
    }
}

/// A snapshot being written. Feed it chunks with [`write_chunk`](Self::write_chunk)
/// (or as an [`io::Write`]), then call [`finish`](Self::finish).
pub struct SnapshotWriter {
    store: SnapshotStore,
    file: Option<BufWriter<File>>,
    temp: PathBuf,
    meta: SnapshotMeta,
    data_len: u64,
    checksum: u32,
}

impl SnapshotWriter {
    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .as_mut()
            .expect("present until finish")
            .write_all(bytes)
            .map_err(|e| StorageError::io("write", &self.temp, e))
    }

    /// Appends `chunk` to the snapshot data.
    pub fn write_chunk(&mut self, chunk: &[u8]) -> Result<()> {
        self.put(chunk)?;
        self.checksum = crc32c::crc32c_append(self.checksum, chunk);
        self.data_len += chunk.len() as u64;
        Ok(())
    }

    /// Bytes of data written so far.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Completes the snapshot and makes it the latest one, durably, then deletes
    /// the one it replaces.
    pub fn finish(mut self) -> Result<SnapshotInfo> {
        let file = self.file.take().expect("present until finish");
        let info = SnapshotInfo {
            meta: self.meta.clone(),
            data_len: self.data_len,
            checksum: self.checksum,
        };
        // On an error, Drop removes the temporary file.
        self.store.publish(file, &self.temp, info)
    }
}

impl Write for SnapshotWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_chunk(buf).map_err(io::Error::other)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // Abandoned, or finish() failed before its rename: the temporary file was
        // never visible. Remove it now rather than at the next open; after a
        // successful finish it no longer exists. Failure here is harmless.
        if self.file.take().is_some() || self.temp.exists() {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Clears the store's reception flag when the [`Incoming`] holding it goes.
struct Reception(SnapshotStore);

impl Drop for Reception {
    fn drop(&mut self) {
        self.0.inner.receiving.store(false, Ordering::Release);
    }
}

/// Checks what a partial file holds of the snapshot whose header is `header` and
/// positions `file` at its end for appending. Returns the data bytes held and their
/// checksum; a file that cannot be a prefix of this snapshot is started over.
fn resume_partial(
    file: &mut File,
    path: &Path,
    header: &[u8],
    data_len: u64,
) -> Result<(u64, u32)> {
    let io_error = |op| move |e| StorageError::io(op, path, e);
    let file_len = file.metadata().map_err(io_error("read"))?.len();
    let header_len = header.len() as u64;
    let mut resumable = file_len >= header_len && file_len - header_len <= data_len;
    if resumable {
        let mut stored = vec![0; header.len()];
        file.read_exact_at(&mut stored, 0)
            .map_err(io_error("read"))?;
        resumable = stored == header;
    }
    if !resumable {
        file.set_len(0).map_err(io_error("truncate"))?;
        file.write_all_at(header, 0).map_err(io_error("write"))?;
        file.seek(SeekFrom::Start(header_len))
            .map_err(io_error("seek"))?;
        return Ok((0, 0));
    }
    let held = file_len - header_len;
    let mut checksum = 0;
    let mut buf = vec![0; IO_CHUNK.min(held as usize)];
    let mut at = 0;
    while at < held {
        let want = (held - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..want], header_len + at)
            .map_err(io_error("read"))?;
        checksum = crc32c::crc32c_append(checksum, &buf[..want]);
        at += want as u64;
    }
    file.seek(SeekFrom::Start(file_len))
        .map_err(io_error("seek"))?;
    Ok((held, checksum))
}

/// A snapshot being received from another node, possibly resuming an earlier
/// attempt. Feed it the data in order with [`write_chunk`](Self::write_chunk), then
/// call [`finish`](Self::finish).
///
/// Dropping it keeps the partial file (flushed, not synced) for a later
/// [`SnapshotStore::receive`] of the same snapshot to resume.
pub struct Incoming {
    store: SnapshotStore,
    info: SnapshotInfo,
    path: PathBuf,
    /// `None` after a failed write, which leaves the file's end unknown.
    file: Option<BufWriter<File>>,
    received: u64,
    checksum: u32,
    /// Declared last, so it is released only after the file is flushed.
    _reception: Reception,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("info", &self.info)
            .field("path", &self.path)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The snapshot being received, as announced by its sender.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Data bytes already held: where the next chunk must start.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Appends `chunk`, which must start at `offset == received()` and not run past
    /// the snapshot's length; otherwise [`StorageError::UnexpectedChunk`] and
    /// nothing is written. After a failed write the partial file is deleted (its
    /// end is unknown) and every later call fails.
    pub fn write_chunk(&mut self, offset: u64, chunk: &[u8]) -> Result<()> {
        let len = chunk.len() as u64;
        if offset != self.received || len > self.info.data_len - self.received {
            return Err(StorageError::UnexpectedChunk {
                offset,
                len,
                received: self.received,
                data_len: self.info.data_len,
            });
        }
        let Some(file) = self.file.as_mut() else {
            return Err(self.abandoned());
        };
        if let Err(e) = file.write_all(chunk) {
            self.file = None;
            let _ = fs::remove_file(&self.path);
            return Err(StorageError::io("write", &self.path, e));
        }
        self.checksum = crc32c::crc32c_append(self.checksum, chunk);
        self.received += len;
        Ok(())
    }

    fn abandoned(&self) -> StorageError {
        StorageError::io(
            "write",
            &self.path,
            io::Error::other("reception abandoned after a failed write"),
        )
    }

    /// Completes the reception once all data is held: checks the length and the
    /// CRC-32C against [`info`](Self::info), then publishes the snapshot exactly as
    /// [`SnapshotWriter::finish`] does (trailer, sync, rename, directory sync; it
    /// becomes the latest and the previous one is removed).
    ///
    /// Before all data is held: [`StorageError::IncompleteSnapshot`], and the
    /// partial file is kept. A checksum mismatch deletes the partial file, so that
    /// the next attempt starts from zero, and returns
    /// [`StorageError::CorruptSnapshot`]; any other failure deletes it too.
    pub fn finish(mut self) -> Result<SnapshotInfo> {
        if self.received != self.info.data_len {
            return Err(StorageError::IncompleteSnapshot {
                received: self.received,
                data_len: self.info.data_len,
            });
        }
        let Some(file) = self.file.take() else {
            return Err(self.abandoned());
        };
        let outcome = if self.checksum == self.info.checksum {
            self.store.publish(file, &self.path, self.info.clone())
        } else {
            drop(file);
            Err(StorageError::CorruptSnapshot {
                path: self.path.clone(),
                detail: format!(
                    "received data checksum {:#010x}, the sender announced {:#010x}",
                    self.checksum, self.info.checksum
                ),
            })
        };
        if outcome.is_err() {
            // Not resumable: the data is wrong, or the file may already carry a
            // trailer.
            let _ = fs::remove_file(&self.path);
        }
        outcome
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Kept for a resume. A failed flush only loses data the resume then
        // asks for again.
        if let Some(mut file) = self.file.take() {
            let _ = file.flush();
        }
    }
}

/// Reads a complete snapshot: by offset in chunks (for transfer to a follower) or
/// sequentially as an [`io::Read`], which verifies the checksum at the end.
pub struct SnapshotReader {
    file: File,
    path: PathBuf,
    data_offset: u64,
    info: SnapshotInfo,
    position: u64,
    checksum: u32,
}

impl SnapshotReader {
    /// Metadata, length and checksum of the snapshot.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }

    /// Up to `max_len` bytes of data from `offset`; empty at or past the end.
    pub fn read_chunk(&self, offset: u64, max_len: usize) -> Result<Bytes> {
        let len = self
            .info
            .data_len
            .saturating_sub(offset)
            .min(max_len as u64) as usize;
        let mut chunk = vec![0; len];
        self.file
            .read_exact_at(&mut chunk, self.data_offset + offset)
            .map_err(|e| StorageError::io("read", &self.path, e))?;
        Ok(chunk.into())
    }
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.info.data_len - self.position;
        if left == 0 || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(left) as usize;
        let n = self
            .file
            .read_at(&mut buf[..len], self.data_offset + self.position)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.checksum = crc32c::crc32c_append(self.checksum, &buf[..n]);
        self.position += n as u64;
        if self.position == self.info.data_len && self.checksum != self.info.checksum {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                StorageError::CorruptSnapshot {
                    path: self.path.clone(),
                    detail: "data checksum mismatch".into(),
                },
            ));
        }
        Ok(n)
    }
}

/// Reads and checks a whole snapshot file.
fn verify_file(path: &Path) -> Result<SnapshotInfo> {
    let corrupt = |detail: String| StorageError::CorruptSnapshot {
        path: path.to_path_buf(),
        detail,
    };
    let io_error = |e| StorageError::io("read", path, e);
    let file = File::open(path).map_err(io_error)?;
    let file_len = file.metadata().map_err(io_error)?.len();
    if file_len < FIXED_HEADER_LEN + 4 + TRAILER_LEN {
        return Err(corrupt(format!("file has only {file_len} bytes")));
    }
    let mut reader = io::BufReader::with_capacity(IO_CHUNK, file);

    let mut fixed = [0u8; FIXED_HEADER_LEN as usize];
    reader.read_exact(&mut fixed).map_err(io_error)?;
    if fixed[..8] != *MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let field = |at: usize, len: usize| -> u64 {
        fixed[at..at + len]
            .iter()
            .fold(0, |acc, byte| (acc << 8) | u64::from(*byte))
    };
    let version = field(8, 4);
    if version != u64::from(VERSION) {
        return Err(corrupt(format!("unknown format version {version}")));
    }
    let (index, term, config_len) = (field(12, 8), field(20, 8), field(28, 4));
    if config_len > u64::from(MAX_CONFIGURATION_LEN)
        || FIXED_HEADER_LEN + config_len + 4 + TRAILER_LEN > file_len
    {
        return Err(corrupt(format!(
            "implausible configuration length {config_len}"
        )));
    }
    let mut rest = vec![0u8; config_len as usize + 4];
    reader.read_exact(&mut rest).map_err(io_error)?;
    let (configuration, stored) = rest.split_at(config_len as usize);
    let computed = crc32c::crc32c_append(crc32c::crc32c(&fixed), configuration);
    if stored != computed.to_be_bytes() {
        return Err(corrupt("header checksum mismatch".into()));
    }

    let data_len = file_len - (FIXED_HEADER_LEN + config_len + 4) - TRAILER_LEN;
    let mut checksum = 0;
    let mut left = data_len;
    let mut buf = vec![0u8; IO_CHUNK];
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        reader.read_exact(&mut buf[..want]).map_err(io_error)?;
        checksum = crc32c::crc32c_append(checksum, &buf[..want]);
        left -= want as u64;
    }
    let mut trailer = [0u8; TRAILER_LEN as usize];
    reader.read_exact(&mut trailer).map_err(io_error)?;
    if trailer[12..] != *TRAILER_MAGIC {
        return Err(corrupt("bad trailer magic (incomplete file?)".into()));
    }
    let stored_len = u64::from_be_bytes(trailer[..8].try_into().expect("8 bytes"));
    if stored_len != data_len {
        return Err(corrupt(format!(
            "trailer says {stored_len} data bytes, the file holds {data_len}"
        )));
    }
    let stored = u32::from_be_bytes(trailer[8..12].try_into().expect("4 bytes"));
    if stored != checksum {
        return Err(corrupt(format!(
            "data checksum mismatch: stored {stored:#010x}, computed {checksum:#010x}"
        )));
    }
    Ok(SnapshotInfo {
        meta: SnapshotMeta {
            index,
            term,
            configuration: Bytes::copy_from_slice(configuration),
        },
        data_len,
        checksum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(index: u64, term: u64) -> SnapshotMeta {
        SnapshotMeta {
            index,
            term,
            configuration: Bytes::from_static(b"voters=1,2,3"),
        }
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(29) ^ seed ^ (i >> 11) as u8)
            .collect()
    }

    fn info_of(meta: SnapshotMeta, data: &[u8]) -> SnapshotInfo {
        SnapshotInfo {
            meta,
            data_len: data.len() as u64,
            checksum: crc32c::crc32c(data),
        }
    }

    fn parts(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|item| item.unwrap().file_name().into_string().unwrap())
            .filter(|name| name.ends_with(PART_SUFFIX))
            .collect();
        names.sort();
        names
    }

    fn latest_data(store: &SnapshotStore) -> Vec<u8> {
        let mut out = Vec::new();
        store
            .open_latest()
            .unwrap()
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn a_dropped_reception_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(300_000, 1);
        let info = info_of(meta(50, 2), &bytes);

        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.received(), 0);
        incoming.write_chunk(0, &bytes[..100_000]).unwrap();
        incoming
            .write_chunk(100_000, &bytes[100_000..123_457])
            .unwrap();
        drop(incoming);
        assert_eq!(parts(dir.path()).len(), 1);

        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.info(), &info);
        assert_eq!(incoming.received(), 123_457);
        incoming.write_chunk(123_457, &bytes[123_457..]).unwrap();
        assert_eq!(incoming.finish().unwrap(), info);

        assert_eq!(store.latest(), Some(info.clone()));
        assert_eq!(latest_data(&store), bytes);
        assert!(parts(dir.path()).is_empty());
        // The published file is exactly what a local writer makes.
        let local = tempfile::tempdir().unwrap();
        let other = SnapshotStore::open(local.path()).unwrap();
        let mut writer = other.begin(info.meta.clone()).unwrap();
        writer.write_chunk(&bytes).unwrap();
        writer.finish().unwrap();
        assert_eq!(
            fs::read(store.latest_path().unwrap()).unwrap(),
            fs::read(other.latest_path().unwrap()).unwrap()
        );
        // And it survives a reopen.
        drop(store);
        assert_eq!(
            SnapshotStore::open(dir.path()).unwrap().latest(),
            Some(info)
        );
    }

    #[test]
    fn another_snapshot_discards_the_old_partial() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let old = data(10_000, 1);
        let mut incoming = store.receive(&info_of(meta(10, 1), &old)).unwrap();
        incoming.write_chunk(0, &old[..5_000]).unwrap();
        drop(incoming);

        // Same index and term but other contents: not a prefix of this one.
        let new = data(10_000, 2);
        let info = info_of(meta(10, 1), &new);
        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.received(), 0);
        assert_eq!(parts(dir.path()), vec![part_name(&info)]);
        incoming.write_chunk(0, &new).unwrap();
        incoming.finish().unwrap();
        assert_eq!(latest_data(&store), new);
    }

    #[test]
    fn a_corrupt_partial_fails_finish_and_the_next_reception_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(64_000, 3);
        let info = info_of(meta(7, 1), &bytes);
        let mut incoming = store.receive(&info).unwrap();
        incoming.write_chunk(0, &bytes[..40_000]).unwrap();
        drop(incoming);

        let path = dir.path().join(part_name(&info));
        let mut held = fs::read(&path).unwrap();
        let at = held.len() - 1_000;
        held[at] ^= 0xff;
        fs::write(&path, held).unwrap();

        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.received(), 40_000);
        incoming.write_chunk(40_000, &bytes[40_000..]).unwrap();
        let err = incoming.finish().unwrap_err();
        assert!(matches!(err, StorageError::CorruptSnapshot { .. }), "{err}");
        assert!(store.latest().is_none());
        assert!(parts(dir.path()).is_empty());

        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.received(), 0);
        incoming.write_chunk(0, &bytes).unwrap();
        assert_eq!(incoming.finish().unwrap(), info);
    }

    #[test]
    fn chunks_out_of_place_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(1_000, 4);
        let info = info_of(meta(3, 1), &bytes);
        let mut incoming = store.receive(&info).unwrap();
        incoming.write_chunk(0, &bytes[..400]).unwrap();
        for (offset, len) in [(0, 10), (399, 10), (401, 10), (400, 601)] {
            let err = incoming.write_chunk(offset, &vec![0; len]).unwrap_err();
            assert!(
                matches!(
                    err,
                    StorageError::UnexpectedChunk {
                        received: 400,
                        data_len: 1_000,
                        ..
                    }
                ),
                "{offset}+{len}: {err}"
            );
        }
        assert_eq!(incoming.received(), 400);
        incoming.write_chunk(400, &bytes[400..]).unwrap();
        incoming.finish().unwrap();
        assert_eq!(latest_data(&store), bytes);
    }

    #[test]
    fn finishing_early_keeps_the_partial() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(1_000, 5);
        let info = info_of(meta(3, 1), &bytes);
        let mut incoming = store.receive(&info).unwrap();
        incoming.write_chunk(0, &bytes[..600]).unwrap();
        let err = incoming.finish().unwrap_err();
        assert!(matches!(
            err,
            StorageError::IncompleteSnapshot {
                received: 600,
                data_len: 1_000
            }
        ));
        assert_eq!(store.receive(&info).unwrap().received(), 600);
    }

    #[test]
    fn one_reception_at_a_time_and_never_a_stale_one() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(100, 6);
        let incoming = store.receive(&info_of(meta(20, 2), &bytes)).unwrap();
        let err = store.receive(&info_of(meta(21, 2), &bytes)).unwrap_err();
        assert!(
            matches!(err, StorageError::ReceptionInProgress { .. }),
            "{err}"
        );
        drop(incoming);

        let mut writer = store.begin(meta(30, 2)).unwrap();
        writer.write_chunk(&bytes).unwrap();
        writer.finish().unwrap();
        let err = store.receive(&info_of(meta(25, 2), &bytes)).unwrap_err();
        assert!(matches!(
            err,
            StorageError::StaleSnapshot {
                index: 25,
                latest: 30
            }
        ));
    }

    #[test]
    fn open_keeps_a_resumable_partial_and_deletes_stale_ones() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = data(5_000, 7);
        let newer = info_of(meta(40, 3), &bytes);
        {
            let store = SnapshotStore::open(dir.path()).unwrap();
            let mut writer = store.begin(meta(30, 2)).unwrap();
            writer.write_chunk(&bytes).unwrap();
            writer.finish().unwrap();
            let mut incoming = store.receive(&newer).unwrap();
            incoming.write_chunk(0, &bytes[..2_000]).unwrap();
        }
        // As a crash could leave them: a partial at and one below the latest
        // snapshot, and a file that only looks like a partial.
        let stale = [
            part_name(&info_of(meta(30, 2), &bytes)),
            part_name(&info_of(meta(12, 1), &bytes)),
            "incoming-garbage.part".to_string(),
        ];
        for name in &stale {
            fs::write(dir.path().join(name), b"x").unwrap();
        }

        let store = SnapshotStore::open(dir.path()).unwrap();
        assert_eq!(parts(dir.path()), vec![part_name(&newer)]);
        let mut incoming = store.receive(&newer).unwrap();
        assert_eq!(incoming.received(), 2_000);
        incoming.write_chunk(2_000, &bytes[2_000..]).unwrap();
        incoming.finish().unwrap();
        assert_eq!(store.latest().unwrap().meta.index, 40);
        assert!(parts(dir.path()).is_empty());
    }

    #[test]
    fn a_partial_shorter_than_its_header_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(dir.path()).unwrap();
        let bytes = data(100, 8);
        let info = info_of(meta(9, 1), &bytes);
        fs::write(dir.path().join(part_name(&info)), b"KYTH").unwrap();
        let mut incoming = store.receive(&info).unwrap();
        assert_eq!(incoming.received(), 0);
        incoming.write_chunk(0, &bytes).unwrap();
        incoming.finish().unwrap();
        assert_eq!(latest_data(&store), bytes);
    }
}
