//! Failing disks, simulated by failing system calls: a child process opens a
//! store and writes one entry at a time; `strace` attaches to it and makes a
//! chosen `fdatasync` or `fsync` fail with EIO or ENOSPC. What must hold:
//!
//! - nothing is acknowledged after the first failure (the store refuses every
//!   later write, although a second sync of the same file would succeed);
//! - closing the store returns, even after a background flush failed;
//! - reopening finds every acknowledged write.
//!
//! `KYTHIRA_FAULT_POINTS` (default 4) sets how many injection points each case
//! tries. Needs `strace` (`just test` installs it).

#[path = "../src/bin/storage-crash-child/model.rs"]
#[allow(
    dead_code,
    reason = "shared with the crash test; only entries are used here"
)]
mod model;

use kythira_storage::{FjallStore, LogStore};
use std::{
    io::{BufRead, BufReader, Write},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// Entries the store holds before faults are injected.
const BEFORE: u64 = 10;
/// Entries the child tries to write.
const LAST: u64 = 60;
/// A safety net only: a child that neither finishes nor fails in this time
/// is taken to hang.
const HANG: Duration = Duration::from_secs(120);

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("faults-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

/// Kills a process when dropped: nothing outlives a failed test.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the child reported.
#[derive(Debug, Default)]
struct Outcome {
    /// Acknowledged indexes, in order.
    acked: Vec<u64>,
    /// Failure messages, in order, and how many acks preceded each.
    failures: Vec<(usize, String)>,
    /// Whether the store was closed (`D`).
    closed: bool,
}

/// Lines from `reader`, each within `HANG`, on a channel.
fn lines(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Opens a store with `BEFORE` entries in a child, attaches strace with
/// `inject` (an strace `-e inject=` expression), lets the child write, and
/// collects what it reports.
fn run(dir: &Path, inject: &str) -> Outcome {
    let inject = format!("inject={inject}");
    run_traced(dir, |_| {
        ["-e", "trace=fsync,fdatasync", "-e", &inject]
            .map(String::from)
            .to_vec()
    })
}

/// [`run`] with strace's filter and injection from `filter`, given the
/// store's directory once it holds the first entries.
fn run_traced(dir: &Path, filter: impl FnOnce(&Path) -> Vec<String>) -> Outcome {
    let store = FjallStore::open(dir).unwrap();
    store
        .append(&(1..=BEFORE).map(model::mixed_entry).collect::<Vec<_>>())
        .unwrap();
    drop(store);

    let mut child = Reaped(
        Command::new(env!("CARGO_BIN_EXE_storage-crash-child"))
            .args(["faults", dir.to_str().unwrap(), &LAST.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = lines(child.0.stdout.take().unwrap());
    assert_eq!(out.recv_timeout(HANG).unwrap(), "O");

    // Every thread of the child is traced from here on: fjall's workers and
    // the store's writer exist once the store is open.
    let pid = child.0.id();
    let mut tracer = Reaped(
        Command::new("strace")
            .args(["-f", "-p", &pid.to_string(), "-o", "/dev/null"])
            .args(filter(dir))
            .stderr(Stdio::piped())
            .spawn()
            .expect("strace runs (just test installs it)"),
    );
    // "Process N attached with M threads": strace traces all of them from here.
    let said = lines(tracer.0.stderr.take().unwrap());
    loop {
        let line = said.recv_timeout(HANG).expect("strace attaches");
        if line.contains("attached") {
            break;
        }
    }

    let mut stdin = child.0.stdin.take().unwrap();
    writeln!(stdin, "go").unwrap();
    let mut outcome = Outcome::default();
    loop {
        let line = match out.recv_timeout(HANG) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("the child hangs: {outcome:?}"),
        };
        match line.split_once(' ') {
            Some(("A", index)) => outcome.acked.push(index.parse().unwrap()),
            Some(("E", error)) => outcome.failures.push((outcome.acked.len(), error.into())),
            _ if line == "D" => outcome.closed = true,
            _ => panic!("unexpected report {line:?}"),
        }
    }
    let status = child.0.wait().unwrap();
    assert!(
        status.success(),
        "the child failed: {status:?}, {outcome:?}"
    );
    let _ = tracer.0.wait();
    outcome
}

/// Every acknowledged write is in the reopened store, as written; returns
/// how many were checked.
fn check_reopened(dir: &Path, outcome: &Outcome) -> u64 {
    let store = FjallStore::open(dir).unwrap();
    let last_acked = outcome.acked.last().copied().unwrap_or(BEFORE);
    assert!(store.last_index() >= last_acked, "{outcome:?}");
    for index in 1..=last_acked {
        assert_eq!(
            store.entry(index).unwrap(),
            model::mixed_entry(index),
            "entry {index}"
        );
    }
    last_acked
}

fn points() -> u64 {
    std::env::var("KYTHIRA_FAULT_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// The n-th group commit's sync fails: that write and every later one is
/// refused, the store closes, and what was acknowledged before is there.
#[test]
fn a_failed_sync_stops_all_writes_and_loses_nothing_acknowledged() {
    let (mut injected, mut checked) = (0, 0);
    let points = points().min(LAST - BEFORE);
    for n in 1..=points {
        for error in ["EIO", "ENOSPC"] {
            let dir = temp_dir();
            // Spread over the writes the child makes.
            let when = 1 + (n - 1) * (LAST - BEFORE) / points;
            let outcome = run(dir.path(), &format!("fdatasync:error={error}:when={when}"));
            injected += 1;
            let (acked_before, first) = outcome.failures.first().cloned().unwrap_or_else(|| {
                panic!("the sync failure reached the writer ({error}, {when}): {outcome:?}")
            });
            assert_eq!(acked_before as u64, when - 1, "{outcome:?}");
            assert!(first.contains("writing the log"), "{first}");
            assert_eq!(
                outcome.acked.len(),
                acked_before,
                "acknowledged after a failure"
            );
            assert_eq!(outcome.failures.len(), 3, "{outcome:?}");
            assert!(outcome.closed, "the store closed: {outcome:?}");
            checked += check_reopened(dir.path(), &outcome);
        }
    }
    // Reached only if nothing was lost and nothing hung.
    println!("FAULTS name=failed_sync injected={injected} acknowledged_writes_checked={checked}");
}

/// An fsync fails in fjall's background worker (a table file or directory
/// sync of a flush): the worker stops and poisons the database, later writes
/// are refused, and closing returns instead of waiting for the flush
/// forever; the journal still holds every acknowledged write.
#[test]
fn a_failed_background_flush_does_not_hang_the_close() {
    let (mut injected, mut checked) = (0, 0);
    for when in 1..=points() {
        let dir = temp_dir();
        let outcome = run(dir.path(), &format!("fsync:error=EIO:when={when}"));
        injected += 1;
        // The failed fsync may come during the writes (a journal rotation, a
        // flush) or only when closing; either way nothing is acknowledged
        // after it.
        if let Some((acked_before, _)) = outcome.failures.first() {
            assert_eq!(outcome.acked.len(), *acked_before, "{outcome:?}");
        } else {
            assert_eq!(outcome.acked.len() as u64, LAST - BEFORE);
        }
        assert!(outcome.closed, "{outcome:?}");
        checked += check_reopened(dir.path(), &outcome);
    }
    // Reached only if nothing was lost and nothing hung.
    println!("FAULTS name=failed_flush injected={injected} acknowledged_writes_checked={checked}");
}

/// The journal file a store in `dir` writes to: its newest.
fn active_journal(dir: &Path) -> std::path::PathBuf {
    let mut journals: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|item| {
            let path = item.unwrap().path();
            let n = path
                .file_name()?
                .to_str()?
                .strip_suffix(".jnl")?
                .parse()
                .ok()?;
            Some((n, path))
        })
        .collect();
    journals.sort();
    journals.pop().expect("a journal").1
}

/// A write to the journal fails (a full disk, an I/O error): that write and
/// every later one is refused, the store closes, and what was acknowledged
/// before is there.
#[test]
fn a_failed_journal_write_stops_all_writes_and_loses_nothing_acknowledged() {
    let (mut injected, mut checked) = (0, 0);
    let points = points().min(LAST - BEFORE);
    for n in 1..=points {
        for error in ["ENOSPC", "EIO"] {
            let dir = temp_dir();
            let when = 1 + (n - 1) * (LAST - BEFORE) / points;
            let outcome = run_traced(dir.path(), |dir| {
                let journal = active_journal(dir).to_str().unwrap().to_owned();
                let inject = format!("inject=write:error={error}:when={when}");
                ["-P", &journal, "-e", "trace=write", "-e", &inject]
                    .map(String::from)
                    .to_vec()
            });
            injected += 1;
            let (acked_before, first) = outcome.failures.first().cloned().unwrap_or_else(|| {
                panic!("the write failure reached the writer ({error}, {when}): {outcome:?}")
            });
            assert!(first.contains("writing the log"), "{first}");
            assert_eq!(
                outcome.acked.len(),
                acked_before,
                "acknowledged after a failure"
            );
            assert!(outcome.closed, "the store closed: {outcome:?}");
            checked += check_reopened(dir.path(), &outcome);
        }
    }
    // Reached only if nothing was lost and nothing hung.
    println!("FAULTS name=failed_write injected={injected} acknowledged_writes_checked={checked}");
}

/// Directory changes a power cut may undo unless the directory is synced:
/// every directory and file the store creates, every rename into it and every
/// journal it deletes must have its parent directory synced before the next
/// acknowledgement (or, for the changes of a clean close, before the process
/// ends). Checked on a strace log of a child that creates a store, writes,
/// closes, and then reopens it and writes more. A third life checks that a
/// reopened store reads no file before dropping its cached pages.
#[test]
fn directory_changes_are_synced_before_they_are_relied_on() {
    let dir = temp_dir();
    let db = dir.path().join("db");
    let log = dir.path().join("trace");
    for last in [BEFORE, LAST] {
        let trace = traced_life(
            &db,
            last,
            &log,
            "trace=mkdir,mkdirat,openat,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync,write",
        );
        let unsynced = unsynced_directory_changes(&trace, &db);
        assert!(
            unsynced.is_empty(),
            "not synced in their directory: {unsynced:#?}"
        );
    }
    // The reopened store dropped the cached pages of every file before it
    // read any: after a failed fsync, the cache may hold what the disk lost.
    let trace = traced_life(&db, LAST, &log, "trace=fadvise64,read,pread64");
    let (mut advised, mut unadvised) = (std::collections::HashSet::new(), Vec::new());
    for line in trace.lines() {
        let Some(path) = line.split('<').nth(1).and_then(|s| s.split('>').next()) else {
            continue;
        };
        if !path.starts_with(db.to_str().unwrap()) {
            continue;
        }
        if line.contains("fadvise64(") && line.contains("POSIX_FADV_DONTNEED") {
            advised.insert(path.to_owned());
        } else if (line.contains(" read(") || line.contains(" pread64(")) && !advised.contains(path)
        {
            unadvised.push(path.to_owned());
        }
    }
    assert!(!advised.is_empty(), "nothing was advised: {trace}");
    assert!(
        unadvised.is_empty(),
        "read before its cached pages were dropped: {unadvised:?}"
    );
}

/// Runs the child in `faults` mode on `db` up to entry `last` under strace
/// with `filter`, logging to `log`; returns the log.
fn traced_life(db: &Path, last: u64, log: &Path, filter: &str) -> String {
    let status = Command::new("strace")
        .args(["-f", "-y", "-qq", "-o"])
        .arg(log)
        .args(["-e", filter])
        .arg(env!("CARGO_BIN_EXE_storage-crash-child"))
        .args(["faults", db.to_str().unwrap(), &last.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .and_then(|mut child| {
            writeln!(child.stdin.take().unwrap(), "go")?;
            child.wait()
        })
        .expect("strace runs (just test installs it)");
    assert!(status.success());
    std::fs::read_to_string(log).unwrap()
}

/// The directory changes under `root` in an strace log (`-f -y`) that are not
/// followed by an fsync of their directory before the next acknowledgement
/// (a write of "A ..." to stdout) or the end of the log.
fn unsynced_directory_changes(trace: &str, root: &Path) -> Vec<String> {
    let root = root.to_str().unwrap();
    let mut pending: Vec<(String, String)> = Vec::new();
    let mut late = Vec::new();
    let quoted = |line: &str, nth: usize| -> Option<String> {
        line.split('"').nth(2 * nth + 1).map(str::to_owned)
    };
    // A call another thread interrupted is split over two lines:
    // "PID call(... <unfinished ...>" and "PID <... call resumed>...".
    let mut unfinished: std::collections::HashMap<&str, String> = Default::default();
    for raw in trace.lines() {
        let (pid, rest) = raw.split_once(' ').unwrap_or(("", raw));
        let joined;
        let line = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            unfinished.insert(pid, head.to_owned());
            continue;
        } else if rest.trim_start().starts_with("<... ") {
            let tail = rest.split_once("resumed>").map_or("", |(_, t)| t);
            joined = format!("{pid} {}{tail}", unfinished.remove(pid).unwrap_or_default());
            joined.as_str()
        } else {
            raw
        };
        let call = line
            .split_once(' ')
            .map_or(line, |(_, rest)| rest)
            .trim_start();
        let ok = line.trim_end().ends_with("= 0") || line.contains("= 0<") || {
            // openat returns a descriptor.
            call.starts_with("openat") && !line.contains("= -1")
        };
        if !ok {
            continue;
        }
        let created =
            call.starts_with("mkdir") || (call.starts_with("openat") && call.contains("O_CREAT"));
        let changed = if created {
            quoted(call, 0)
        } else if call.starts_with("rename") {
            quoted(call, 1)
        } else if call.starts_with("unlink") {
            quoted(call, 0).filter(|p| p.ends_with(".jnl"))
        } else if call.starts_with("fsync") || call.starts_with("fdatasync") {
            // fsync(5</path/of/dir>)
            if let Some(path) = call.split('<').nth(1).and_then(|s| s.split('>').next()) {
                pending.retain(|(parent, _)| parent != path);
            }
            None
        } else if call.starts_with("write(1") && call.contains("\"A ") {
            late.extend(pending.drain(..).map(|(_, change)| change));
            None
        } else {
            None
        };
        if let Some(path) = changed.filter(|p| p.starts_with(root)) {
            let parent = Path::new(&path)
                .parent()
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            pending.push((parent, call.to_owned()));
        }
    }
    late.extend(pending.into_iter().map(|(_, change)| change));
    late
}
