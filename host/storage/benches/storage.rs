//! Storage benchmarks: `cargo bench -p kythira-storage --bench storage`.
//!
//! Prints `BENCH name=<id> value=<n> unit=<u>` lines, each the median of several
//! runs, with the physical fsync rate of the same disk as the baseline. Works in a
//! directory under the target directory (same disk as the repository, not tmpfs).

use kythira_storage::{FjallStore, HardState, HardStateStore, LogEntry, LogStore, layout};
use std::{
    fs::{self, File},
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const RUNS: usize = 5;
const PAYLOAD: [u8; 100] = [0x5a; 100];

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn report(name: &str, value: f64, unit: &str) {
    println!("BENCH name={name} value={value:.1} unit={unit}");
}

fn fresh_dir(root: &Path, name: &str) -> Result<PathBuf> {
    let dir = root.join(name);
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn entries(first: u64, count: u64) -> Vec<LogEntry> {
    (first..first + count)
        .map(|index| LogEntry::new(index, 1, &PAYLOAD[..]))
        .collect()
}

const FLOOR_SYNCS: u32 = 500;
const BLOCK: [u8; 4096] = [0xa5; 4096];

/// Syncs per second of a plain file: append 4 KiB, fdatasync.
fn fsync_floor(root: &Path) -> Result<f64> {
    let dir = fresh_dir(root, "fsync")?;
    let mut file = File::create(dir.join("floor"))?;
    let start = Instant::now();
    for _ in 0..FLOOR_SYNCS {
        file.write_all(&BLOCK)?;
        file.sync_data()?;
    }
    Ok(f64::from(FLOOR_SYNCS) / start.elapsed().as_secs_f64())
}

/// Syncs per second rewriting 4 KiB blocks of a file already written and synced,
/// as fjall does in its preallocated journal: no block allocation per sync.
fn fsync_floor_overwrite(root: &Path) -> Result<f64> {
    use std::os::unix::fs::FileExt;
    let dir = fresh_dir(root, "fsync-overwrite")?;
    let file = File::create(dir.join("floor"))?;
    for block in 0..u64::from(FLOOR_SYNCS) {
        file.write_all_at(&BLOCK, block * 4096)?;
    }
    file.sync_all()?;
    let start = Instant::now();
    for block in 0..u64::from(FLOOR_SYNCS) {
        file.write_all_at(&BLOCK, block * 4096)?;
        file.sync_data()?;
    }
    Ok(f64::from(FLOOR_SYNCS) / start.elapsed().as_secs_f64())
}

/// Entries per second appending `batch` 100-byte entries per call (one sync each).
fn append(root: &Path, batch: u64, total: u64) -> Result<f64> {
    let dir = fresh_dir(root, "append")?;
    let store = FjallStore::open(&dir)?;
    let batches: Vec<_> = (0..total / batch)
        .map(|n| entries(1 + n * batch, batch))
        .collect();
    let start = Instant::now();
    for entries in &batches {
        store.append(entries)?;
    }
    let elapsed = start.elapsed();
    assert_eq!(store.last_index(), total / batch * batch);
    Ok((total / batch * batch) as f64 / elapsed.as_secs_f64())
}

/// Hard-state saves per second from `threads` concurrent callers (group commit),
/// and the number of saves per sync.
fn concurrent_saves(root: &Path, threads: u64, per_thread: u64) -> Result<(f64, f64)> {
    let dir = fresh_dir(root, "concurrent")?;
    let store = FjallStore::open(&dir)?;
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let store = &store;
            scope.spawn(move || {
                for n in 0..per_thread {
                    let state = HardState {
                        term: 1,
                        vote: None,
                        commit: thread * per_thread + n,
                    };
                    store.save_hard_state(&state).expect("save hard state");
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let saves = (threads * per_thread) as f64;
    Ok((
        saves / elapsed.as_secs_f64(),
        saves / store.sync_count() as f64,
    ))
}

/// Milliseconds to open (and fully verify) a log of `count` entries.
/// Also returns the times of fjall alone opening the same database.
fn reopen(root: &Path, count: u64) -> Result<(Vec<f64>, Vec<f64>)> {
    let dir = fresh_dir(root, "reopen")?;
    {
        let store = FjallStore::open(&dir)?;
        let chunk = 8192;
        let mut next = 1;
        while next <= count {
            let n = chunk.min(count - next + 1);
            store.append(&entries(next, n))?;
            next += n;
        }
    }
    let mut store_times = Vec::new();
    let mut engine_times = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let store = FjallStore::open(&dir)?;
        store_times.push(start.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(store.last_index(), count);
        drop(store);
        // Baseline: the engine alone opening the same database, no verification.
        let start = Instant::now();
        let db = fjall::Database::builder(&dir).open()?;
        let _log = db.keyspace(layout::LOG_KEYSPACE, fjall::KeyspaceCreateOptions::default)?;
        let _meta = db.keyspace(layout::META_KEYSPACE, fjall::KeyspaceCreateOptions::default)?;
        engine_times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    Ok((store_times, engine_times))
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("storage-bench");
    fs::create_dir_all(&root)?;
    let started = Instant::now();

    let mut floor = Vec::new();
    let mut floor_overwrite = Vec::new();
    let mut each = Vec::new();
    let mut group64 = Vec::new();
    let mut group512 = Vec::new();
    let mut concurrent = Vec::new();
    let mut per_sync = Vec::new();
    // Interleaved so that a noisy neighbour affects every measurement alike.
    for _ in 0..RUNS {
        floor.push(fsync_floor(&root)?);
        floor_overwrite.push(fsync_floor_overwrite(&root)?);
        each.push(append(&root, 1, 500)?);
        group64.push(append(&root, 64, 64 * 200)?);
        group512.push(append(&root, 512, 512 * 60)?);
        let (rate, ratio) = concurrent_saves(&root, 8, 250)?;
        concurrent.push(rate);
        per_sync.push(ratio);
    }
    let floor = median(floor);
    let each = median(each);
    report("storage.fsync_floor", floor, "syncs/s");
    report("storage.append.sync_each", each, "entries/s");
    report("storage.append.sync_each_vs_floor", each / floor, "ratio");
    let floor_overwrite = median(floor_overwrite);
    report("storage.fsync_floor_overwrite", floor_overwrite, "syncs/s");
    report(
        "storage.append.sync_each_vs_floor_overwrite",
        each / floor_overwrite,
        "ratio",
    );
    report("storage.append.group64", median(group64), "entries/s");
    report("storage.append.group512", median(group512), "entries/s");
    report(
        "storage.hard_state.concurrent8",
        median(concurrent),
        "saves/s",
    );
    report(
        "storage.hard_state.concurrent8_per_sync",
        median(per_sync),
        "saves/sync",
    );
    let (reopens, engine) = reopen(&root, 1_000_000)?;
    // The first open after the bulk load also replays fjall's journal of whatever
    // was not yet flushed, like an open after a crash under write load.
    report("storage.reopen.1m_first", reopens[0], "ms");
    report("storage.reopen.1m", median(reopens), "ms");
    report("storage.reopen.1m_fjall_alone", median(engine), "ms");

    fs::remove_dir_all(&root)?;
    eprintln!("storage bench took {:.1?}", started.elapsed());
    Ok(())
}
