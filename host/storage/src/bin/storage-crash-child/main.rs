//! Crash-test child: writes to a store in a loop and prints every write that was
//! acknowledged (and so must be durable), until the parent kills it.
//!
//! Usage: `storage-crash-child log|snapshot <dir> <seed>`, or
//! `storage-crash-child append <dir> <last>` to append up to `<last>` once and then
//! wait to be killed. Output lines: `A <last index>` after an append, `H <n>` after
//! saving hard state `n`, `S <n>` after finishing snapshot `n`. Payloads follow
//! `model.rs`.
//!
//! `storage-crash-child faults <dir> <last>` is for fault injection and power
//! loss: it opens the store, prints `O`, waits for a line on stdin (the parent
//! may attach a tracer that fails chosen system calls), then appends one entry
//! per write (`model::mixed_entry`) up to `<last>`, printing `A <index>` after
//! each and `E <error>` for each failure (two more writes are tried after the
//! first), closes the store and prints `D`: a close that hangs shows as a
//! missing `D`.

mod model;

use kythira_storage::{FjallStore, HardStateStore, LogEntry, LogStore, SnapshotStore};
use std::io::Write;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Prints a whole report line and flushes it, so the parent sees it at once.
fn report(line: std::fmt::Arguments<'_>) -> Result {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Exits at once: a failing child must not wait for its other thread.
fn fail(error: impl std::fmt::Display) -> ! {
    eprintln!("storage-crash-child: {error}");
    std::process::exit(1)
}

fn run_log(dir: &str, seed: u64) -> Result {
    let store = FjallStore::open(dir)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let first_hard_state = store.hard_state().term + 1;
    std::thread::scope(|scope| {
        // Hard-state saves run concurrently with appends and share their syncs.
        scope.spawn(|| {
            for n in first_hard_state.. {
                store
                    .save_hard_state(&model::hard_state(n))
                    .unwrap_or_else(|e| fail(e));
                report(format_args!("H {n}")).unwrap_or_else(|e| fail(e));
            }
        });
        loop {
            let last = store.last_index();
            // Mostly plain appends; sometimes rewrite the last few entries with the
            // same content and extend past them (an append replaces the whole
            // suffix from its first index, so it must reach the end to lose
            // nothing), sometimes compact an old prefix.
            let start = match rng.u8(0..10) {
                0 => last.saturating_sub(rng.u64(0..4)).max(store.first_index()),
                1 if last > 600 => {
                    store.compact_prefix(last - 500).unwrap_or_else(|e| fail(e));
                    continue;
                }
                _ => last + 1,
            };
            let end = last + rng.u64(1..=16);
            let entries: Vec<LogEntry> = (start..=end).map(model::entry).collect();
            store.append(&entries).unwrap_or_else(|e| fail(e));
            report(format_args!("A {end}")).unwrap_or_else(|e| fail(e));
        }
    })
}

fn run_snapshot(dir: &str, seed: u64) -> Result {
    let store = SnapshotStore::open(dir)?;
    let mut rng = fastrand::Rng::with_seed(seed);
    let first = store.latest().map_or(1, |info| info.meta.term + 1);
    for n in first.. {
        let mut writer = store.begin(model::snapshot_meta(n))?;
        let len = model::snapshot_len(n);
        let mut offset = 0;
        while offset < len {
            let chunk = rng.u64(1..=32 << 10).min(len - offset);
            let bytes: Vec<u8> = (offset..offset + chunk)
                .map(|at| model::snapshot_byte(n, at))
                .collect();
            writer.write_chunk(&bytes)?;
            offset += chunk;
        }
        writer.finish()?;
        report(format_args!("S {n}"))?;
    }
    Ok(())
}

/// Appends the model's entries up to `last` in one batch, reports, and then holds
/// the store open until killed, so that the parent sees a crash, not a clean close.
fn run_append(dir: &str, last: u64) -> Result {
    let store = FjallStore::open(dir)?;
    let entries: Vec<LogEntry> = (store.last_index() + 1..=last).map(model::entry).collect();
    store.append(&entries)?;
    report(format_args!("A {last}"))?;
    std::io::stdin().read_line(&mut String::new())?;
    Err("stdin closed before the parent killed the child".into())
}

/// Like `append`, with [`model::wide_entry`]s (`wide`) or one batch per entry
/// (`each`).
fn run_append_with(dir: &str, last: u64, wide: bool) -> Result {
    let store = FjallStore::open(dir)?;
    let from = store.last_index() + 1;
    if wide {
        let entries: Vec<LogEntry> = (from..=last).map(model::wide_entry).collect();
        store.append(&entries)?;
    } else {
        for index in from..=last {
            store.append(&[model::entry(index)])?;
        }
    }
    report(format_args!("A {last}"))?;
    std::io::stdin().read_line(&mut String::new())?;
    Err("stdin closed before the parent killed the child".into())
}

fn run_faults(dir: &str, last: u64) -> Result {
    let store = FjallStore::open(dir)?;
    report(format_args!("O"))?;
    std::io::stdin().read_line(&mut String::new())?;
    let mut index = store.last_index() + 1;
    let mut failures = 0;
    // After the first failure a few more writes are tried: none may succeed.
    while index <= last && failures < 3 {
        match store.append(&[model::mixed_entry(index)]) {
            Ok(()) => {
                report(format_args!("A {index}"))?;
                index += 1;
            }
            Err(e) => {
                report(format_args!("E {e}"))?;
                failures += 1;
            }
        }
    }
    drop(store);
    report(format_args!("D"))
}

fn main() -> Result {
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, dir, number] = args.as_slice() else {
        return Err(
            "usage: storage-crash-child log|snapshot|append|append-wide|append-each|faults <dir> <number>"
                .into(),
        );
    };
    let number: u64 = number.parse()?;
    match mode.as_str() {
        "log" => run_log(dir, number),
        "snapshot" => run_snapshot(dir, number),
        "append" => run_append(dir, number),
        "append-wide" => run_append_with(dir, number, true),
        "append-each" => run_append_with(dir, number, false),
        "faults" => run_faults(dir, number),
        other => Err(format!("unknown mode {other}").into()),
    }
}
