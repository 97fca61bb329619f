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

use crate::{Result, SnapshotMeta, StorageError};
use bytes::Bytes;
use std::{
    fs::{self, File},
    io::{self, BufWriter, Read, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
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
}

/// Keeps the latest complete snapshot of a node in one directory.
///
/// Cheap to clone; clones share the directory. Blocking, like the rest of the crate.
#[derive(Clone)]
pub struct SnapshotStore {
    inner: Arc<Inner>,
}

fn file_name(index: u64, term: u64) -> String {
    format!("snapshot-{index:020}-{term:020}{SUFFIX}")
}

fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let rest = name.strip_prefix("snapshot-")?.strip_suffix(SUFFIX)?;
    let (index, term) = rest.split_once('-')?;
    Some((index.parse().ok()?, term.parse().ok()?))
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
        fs::create_dir_all(&dir).map_err(|e| StorageError::io("create directory", &dir, e))?;
        let mut candidates = Vec::new();
        let listing = fs::read_dir(&dir).map_err(|e| StorageError::io("list", &dir, e))?;
        for item in listing {
            let item = item.map_err(|e| StorageError::io("list", &dir, e))?;
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with("snapshot-") && name.ends_with(TEMP_SUFFIX) {
                fs::remove_file(item.path())
                    .map_err(|e| StorageError::io("remove", item.path(), e))?;
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
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                latest: Mutex::new(latest),
                next_temp: AtomicU64::new(0),
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
        let config_len = u32::try_from(meta.configuration.len())
            .ok()
            .filter(|len| *len <= MAX_CONFIGURATION_LEN)
            .ok_or_else(|| {
                StorageError::io(
                    "write snapshot header for",
                    &self.inner.dir,
                    io::Error::new(io::ErrorKind::InvalidInput, "configuration too large"),
                )
            })?;
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
        let mut header =
            Vec::with_capacity(FIXED_HEADER_LEN as usize + meta.configuration.len() + 4);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_be_bytes());
        header.extend_from_slice(&meta.index.to_be_bytes());
        header.extend_from_slice(&meta.term.to_be_bytes());
        header.extend_from_slice(&config_len.to_be_bytes());
        header.extend_from_slice(&meta.configuration);
        header.extend_from_slice(&crc32c::crc32c(&header).to_be_bytes());
        let mut writer = SnapshotWriter {
            store: self.clone(),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
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
        let mut trailer = Vec::with_capacity(TRAILER_LEN as usize);
        trailer.extend_from_slice(&self.data_len.to_be_bytes());
        trailer.extend_from_slice(&self.checksum.to_be_bytes());
        trailer.extend_from_slice(TRAILER_MAGIC);
        self.put(&trailer)?;
        let file = self
            .file
            .take()
            .expect("present until finish")
            .into_inner()
            .map_err(|e| StorageError::io("write", &self.temp, e.into_error()))?;
        // SYNC POINT: the snapshot's contents are durable before it gets its final
        // name, so a visible snapshot is always complete.
        file.sync_all()
            .map_err(|e| StorageError::io("sync", &self.temp, e))?;
        drop(file);

        let info = SnapshotInfo {
            meta: self.meta.clone(),
            data_len: self.data_len,
            checksum: self.checksum,
        };
        let dir = self.store.inner.dir.clone();
        let path = dir.join(file_name(info.meta.index, info.meta.term));
        let mut latest = self.store.lock();
        // Checked again under the lock: another writer may have finished a newer one.
        self.store.check_not_stale(&info.meta, latest.as_ref())?;
        fs::rename(&self.temp, &path).map_err(|e| StorageError::io("rename", &self.temp, e))?;
        // SYNC POINT: the rename is durable before the snapshot is reported complete
        // (and before the caller compacts the log it replaces).
        sync_dir(&dir)?;
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
    let mut reader = io::BufReader::with_capacity(1 << 20, file);

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
    let mut buf = vec![0u8; 1 << 20];
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
