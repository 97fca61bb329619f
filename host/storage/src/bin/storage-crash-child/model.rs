//! What the crash child writes, derived from positions alone so that the parent
//! can verify every byte after a crash. Shared with `tests/crash.rs`.

use kythira_storage::{HardState, LogEntry, SnapshotMeta};

/// Term of the entry at `index`: rises every 97 entries.
pub fn term_of(index: u64) -> u64 {
    1 + index / 97
}

fn byte(seed: u64, position: u64) -> u8 {
    let mixed =
        (seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    (mixed >> 56) as u8
}

/// The entry the child writes at `index`.
pub fn entry(index: u64) -> LogEntry {
    let term = term_of(index);
    let len = (index.wrapping_mul(31) + term) % 200 + 1;
    let payload: Vec<u8> = (0..len).map(|i| byte(index, i)).collect();
    LogEntry::new(index, term, payload)
}

/// A 64 KiB entry whose payload compresses well: a line naming its index,
/// repeated. What the child writes with `append-wide`.
pub fn wide_entry(index: u64) -> LogEntry {
    let line = format!("wide entry {index:08} ");
    let payload: Vec<u8> = line.bytes().cycle().take(64 << 10).collect();
    LogEntry::new(index, term_of(index), payload)
}

/// What the `faults` child writes at `index`: mostly small entries, every
/// seventh a wide one, so that some batches span several pages and a power
/// cut can tear them in the middle.
pub fn mixed_entry(index: u64) -> LogEntry {
    if index.is_multiple_of(7) {
        wide_entry(index)
    } else {
        entry(index)
    }
}

/// The hard state the child saves in step `n` (`n` is also the term).
pub fn hard_state(n: u64) -> HardState {
    HardState {
        term: n,
        vote: Some(n % 5),
        commit: n * 3,
    }
}

/// Metadata of the child's `n`-th snapshot.
pub fn snapshot_meta(n: u64) -> SnapshotMeta {
    SnapshotMeta {
        index: n * 10,
        term: n,
        configuration: format!("members=1,2,3;snapshot={n}").into_bytes().into(),
    }
}

/// Data length of the `n`-th snapshot: up to 192 KiB.
pub fn snapshot_len(n: u64) -> u64 {
    n.wrapping_mul(7919) % (192 << 10)
}

/// Data byte at `offset` of the `n`-th snapshot.
pub fn snapshot_byte(n: u64, offset: u64) -> u8 {
    byte(n.wrapping_add(0x5eed), offset)
}
