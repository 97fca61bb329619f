//! Validation of a store at open: format, bounds, hard state and every entry.

use super::layout;
use crate::{
    EntryDefect, HardState, Result, StorageError,
    codec::{self, LogBounds},
    shape::LogShape,
};
use fjall::{Database, Keyspace, PersistMode};
use std::path::Path;

pub(super) struct Recovered {
    pub shape: LogShape,
    pub hard_state: HardState,
}

pub(super) fn recover(
    path: &Path,
    db: &Database,
    log: &Keyspace,
    meta: &Keyspace,
) -> Result<Recovered> {
    let db_error = |source| StorageError::database(path, source);
    let corrupt = |record, detail: String| StorageError::CorruptRecord {
        path: path.to_path_buf(),
        record,
        detail,
    };
    let read = |key: &[u8]| meta.get(key).map_err(db_error);

    match read(layout::FORMAT_KEY)? {
        Some(format) if *format == *layout::FORMAT_VALUE => {}
        Some(format) => {
            return Err(corrupt(
                "format",
                format!("unknown format {:?}", String::from_utf8_lossy(&format)),
            ));
        }
        None => return initialize(path, db, log, meta),
    }

    let bounds = read(layout::BOUNDS_KEY)?
        .ok_or_else(|| "record is missing".to_string())
        .and_then(|value| codec::decode_bounds(&value))
        .map_err(|detail| corrupt("log bounds", detail))?;
    let hard_state = read(layout::HARD_STATE_KEY)?
        .ok_or_else(|| "record is missing".to_string())
        .and_then(|value| codec::decode_hard_state(&value))
        .map_err(|detail| corrupt("hard state", detail))?;
    let shape = scan_log(path, log, &bounds)?;
    Ok(Recovered { shape, hard_state })
}

/// A directory without the format marker must be a brand-new database.
fn initialize(path: &Path, db: &Database, log: &Keyspace, meta: &Keyspace) -> Result<Recovered> {
    let db_error = |source| StorageError::database(path, source);
    if !meta.is_empty().map_err(db_error)? || !log.is_empty().map_err(db_error)? {
        return Err(StorageError::CorruptRecord {
            path: path.to_path_buf(),
            record: "format",
            detail: "record is missing from a non-empty store".into(),
        });
    }
    let shape = LogShape::default();
    let hard_state = HardState::default();
    let mut batch = db.batch();
    batch.insert(
        meta,
        layout::BOUNDS_KEY,
        codec::encode_bounds(&shape.bounds()),
    );
    batch.insert(
        meta,
        layout::HARD_STATE_KEY,
        codec::encode_hard_state(&hard_state),
    );
    // The marker goes in the same batch: a store is either fully initialized or
    // still empty.
    batch.insert(meta, layout::FORMAT_KEY, layout::FORMAT_VALUE);
    batch.commit().map_err(db_error)?;
    // SYNC POINT: the initial records are durable before the store is used.
    db.persist(PersistMode::SyncAll).map_err(db_error)?;
    Ok(Recovered { shape, hard_state })
}

/// Reads every entry within `bounds`, checking presence, checksum and term order,
/// and that nothing lies beyond the last index. Large logs are verified in
/// parallel slices, one per available core.
fn scan_log(path: &Path, log: &Keyspace, bounds: &LogBounds) -> Result<LogShape> {
    let first = bounds.compacted_index + 1;
    let mut shape = LogShape::empty_after(bounds.compacted_index, bounds.compacted_term);
    if bounds.last_index >= first {
        let count = bounds.last_index - first + 1;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let slices = if count < MIN_ENTRIES_PER_SLICE * 2 {
            1
        } else {
            threads.min(count / MIN_ENTRIES_PER_SLICE)
        };
        let step = count.div_ceil(slices);
        let ranges: Vec<(u64, u64)> = (0..slices)
            .map(|slice| {
                let lo = first + slice * step;
                (lo, (lo + step - 1).min(bounds.last_index))
            })
            .collect();
        let scanned: Vec<Result<Vec<(u64, u64)>>> = std::thread::scope(|scope| {
            let workers: Vec<_> = ranges
                .iter()
                .map(|&(lo, hi)| scope.spawn(move || scan_slice(path, log, bounds, lo, hi)))
                .collect();
            workers
                .into_iter()
                .map(|worker| worker.join().expect("log verification thread panicked"))
                .collect()
        });
        // Slices in index order: the first damaged slice is the one reported.
        for (slice, (lo, hi)) in scanned.into_iter().zip(ranges) {
            for (index, term) in slice? {
                if index > lo {
                    shape.extend_to(index - 1);
                }
                let previous = shape.last_term();
                if term < previous {
                    return Err(StorageError::CorruptEntry {
                        path: path.to_path_buf(),
                        index,
                        defect: EntryDefect::TermRegression { term, previous },
                    });
                }
                shape.push(index, term);
            }
            // A slice reports where its terms change; it is dense in between.
            shape.extend_to(hi);
        }
    }
    check_nothing_beyond(path, log, bounds)?;
    Ok(shape)
}

/// Below this many entries per core, threads cost more than they save.
const MIN_ENTRIES_PER_SLICE: u64 = 16_384;

/// Verifies entries `lo..=hi`; returns each index where the term changes (and
/// `lo`) with its term.
fn scan_slice(
    path: &Path,
    log: &Keyspace,
    bounds: &LogBounds,
    lo: u64,
    hi: u64,
) -> Result<Vec<(u64, u64)>> {
    let mut changes: Vec<(u64, u64)> = Vec::new();
    let mut expected = lo;
    for item in log.range(codec::log_key(lo)..=codec::log_key(hi)) {
        let (key, value) = item
            .into_inner()
            .map_err(|source| StorageError::database(path, source))?;
        if codec::decode_log_key(&key) != Some(expected) {
            return Err(missing(path, bounds, expected));
        }
        let (term, _) =
            codec::verify_entry(expected, &value).map_err(|defect| StorageError::CorruptEntry {
                path: path.to_path_buf(),
                index: expected,
                defect,
            })?;
        match changes.last() {
            Some(&(_, previous)) if term == previous => {}
            Some(&(_, previous)) if term < previous => {
                return Err(StorageError::CorruptEntry {
                    path: path.to_path_buf(),
                    index: expected,
                    defect: EntryDefect::TermRegression { term, previous },
                });
            }
            _ => changes.push((expected, term)),
        }
        expected += 1;
    }
    if expected != hi + 1 {
        return Err(missing(path, bounds, expected));
    }
    Ok(changes)
}

fn missing(path: &Path, bounds: &LogBounds, index: u64) -> StorageError {
    StorageError::MissingEntry {
        path: path.to_path_buf(),
        index,
        first: bounds.compacted_index + 1,
        last: bounds.last_index,
    }
}

/// An entry past the last index means the bounds record is stale, so entries that
/// were acknowledged could be miscounted.
fn check_nothing_beyond(path: &Path, log: &Keyspace, bounds: &LogBounds) -> Result<()> {
    if let Some(beyond) = bounds.last_index.checked_add(1)
        && let Some(item) = log.range(codec::log_key(beyond)..).next()
    {
        let key = item
            .key()
            .map_err(|source| StorageError::database(path, source))?;
        return Err(StorageError::StrayEntry {
            path: path.to_path_buf(),
            index: codec::decode_log_key(&key).unwrap_or(beyond),
            last: bounds.last_index,
        });
    }
    Ok(())
}
