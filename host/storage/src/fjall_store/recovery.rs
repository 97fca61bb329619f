//! Validation of a store at open: format, bounds, hard state and every entry.

use super::layout;
use crate::{
    EntryDefect, HardState, Result, StorageError,
    codec::{self, LogBounds},
    shape::LogShape,
};
use fjall::{Database, Keyspace, PersistMode};
use std::{path::Path, sync::Arc};

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
    let db_error = |source| StorageError::Database {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
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
    let db_error = |source| StorageError::Database {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
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
/// and that nothing lies beyond the last index.
fn scan_log(path: &Path, log: &Keyspace, bounds: &LogBounds) -> Result<LogShape> {
    let db_error = |source| StorageError::Database {
        path: path.to_path_buf(),
        source: Arc::new(source),
    };
    let mut shape = LogShape::empty_after(bounds.compacted_index, bounds.compacted_term);
    let first = bounds.compacted_index + 1;
    let missing = |index| StorageError::MissingEntry {
        path: path.to_path_buf(),
        index,
        first,
        last: bounds.last_index,
    };
    let corrupt = |index, defect| StorageError::CorruptEntry {
        path: path.to_path_buf(),
        index,
        defect,
    };
    if bounds.last_index >= first {
        let keys = codec::log_key(first)..=codec::log_key(bounds.last_index);
        for item in log.range(keys) {
            let (key, value) = item.into_inner().map_err(db_error)?;
            let expected = shape.last_index() + 1;
            if codec::decode_log_key(&key) != Some(expected) {
                return Err(missing(expected));
            }
            let (term, _) = codec::verify_entry(expected, &value)
                .map_err(|defect| corrupt(expected, defect))?;
            let previous = shape.last_term();
            if term < previous {
                return Err(corrupt(
                    expected,
                    EntryDefect::TermRegression { term, previous },
                ));
            }
            shape.push(expected, term);
        }
        if shape.last_index() != bounds.last_index {
            return Err(missing(shape.last_index() + 1));
        }
    }
    if let Some(beyond) = bounds.last_index.checked_add(1)
        && let Some(item) = log.range(codec::log_key(beyond)..).next()
    {
        let key = item.key().map_err(db_error)?;
        return Err(StorageError::StrayEntry {
            path: path.to_path_buf(),
            index: codec::decode_log_key(&key).unwrap_or(beyond),
            last: bounds.last_index,
        });
    }
    Ok(shape)
}
