//! Crash tests with real processes: a child writes and reports every acknowledged
//! write; the parent SIGKILLs it at a random report, reopens the store and checks
//! that everything acknowledged is there, byte for byte.
//!
//! Rounds per test: 50, or `KYTHIRA_CRASH_ROUNDS`. Seed: `KYTHIRA_CRASH_SEED`
//! (each round's kill point and child seed derive from it).

#[path = "../src/bin/storage-crash-child/model.rs"]
#[allow(dead_code, reason = "shared with the corruption tests")]
mod model;

use kythira_storage::{FjallStore, HardStateStore, LogStore, SnapshotStore};
use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// Rounds that crash and recover the same directory before starting afresh. Each
/// recovery replays the journal of everything before it (slow in debug builds), so
/// a bounded chain keeps the test fast while still covering crashes of recovered
/// stores.
const ROUNDS_PER_DIR: u64 = 10;

/// Safety net only; rounds synchronize on the child's output.
const REPORT_TIMEOUT: Duration = Duration::from_secs(120);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|value| {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

/// Highest acknowledged value per report kind (`A`, `H`, `S`).
#[derive(Default, Debug)]
struct Acknowledged {
    appended: u64,
    hard_state: u64,
    snapshot: u64,
}

/// Runs the child in `mode` until it has made `reports` reports, then kills it.
fn crash_child(mode: &str, dir: &Path, seed: u64, reports: u64) -> Acknowledged {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-crash-child"))
        .args([mode, dir.to_str().expect("utf-8 path"), &seed.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn crash child");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines, received) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line.expect("read child output")).is_err() {
                break;
            }
        }
    });
    let mut acknowledged = Acknowledged::default();
    for _ in 0..reports {
        let Ok(line) = received.recv_timeout(REPORT_TIMEOUT) else {
            let _ = child.kill();
            let mut stderr = String::new();
            let _ = child
                .stderr
                .take()
                .expect("piped")
                .read_to_string(&mut stderr);
            panic!("child stopped reporting (seed {seed}); stderr: {stderr}");
        };
        let (kind, value) = line.split_once(' ').expect("report line");
        let value: u64 = value.parse().expect("reported number");
        let slot = match kind {
            "A" => &mut acknowledged.appended,
            "H" => &mut acknowledged.hard_state,
            "S" => &mut acknowledged.snapshot,
            other => panic!("unknown report {other}"),
        };
        *slot = (*slot).max(value);
    }
    // Child::kill sends SIGKILL: no destructor, no flush, no clean close.
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    drop(received);
    reader.join().expect("reader thread");
    acknowledged
}

fn verify_log(dir: &Path, acknowledged: &Acknowledged, round: u64) {
    let store = FjallStore::open(dir)
        .unwrap_or_else(|e| panic!("round {round}: reopen after a crash failed: {e}"));
    let (first, last) = (store.first_index(), store.last_index());
    assert!(
        last >= acknowledged.appended,
        "round {round}: acknowledged entry {} lost, last index is {last}",
        acknowledged.appended
    );
    if first > 1 {
        assert_eq!(store.term(first - 1).unwrap(), model::term_of(first - 1));
    }
    let mut next = first;
    while next <= last {
        let batch = store.entries(next..last + 1, 64 << 10).unwrap();
        for entry in batch {
            assert_eq!(entry, model::entry(next), "round {round}: entry {next}");
            assert_eq!(store.term(next).unwrap(), entry.term);
            next += 1;
        }
    }
    let hard_state = store.hard_state();
    assert!(
        hard_state.term >= acknowledged.hard_state,
        "round {round}: acknowledged hard state {} lost, found {hard_state:?}",
        acknowledged.hard_state
    );
    if hard_state.term > 0 {
        assert_eq!(hard_state, model::hard_state(hard_state.term));
    }
}

fn verify_snapshots(dir: &Path, acknowledged: &Acknowledged, round: u64) {
    let store = SnapshotStore::open(dir)
        .unwrap_or_else(|e| panic!("round {round}: reopen after a crash failed: {e}"));
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|item| item.unwrap().file_name())
        .filter(|name| name != "lock")
        .collect();
    assert!(files.len() <= 1, "round {round}: leftover files {files:?}");
    let Some(info) = store.latest() else {
        assert_eq!(acknowledged.snapshot, 0, "round {round}: snapshot lost");
        return;
    };
    let n = info.meta.term;
    assert!(
        n >= acknowledged.snapshot,
        "round {round}: snapshot {} lost",
        acknowledged.snapshot
    );
    assert_eq!(info.meta, model::snapshot_meta(n));
    assert_eq!(info.data_len, model::snapshot_len(n));
    let mut reader = store.open_latest().unwrap().expect("latest snapshot");
    let mut data = Vec::new();
    reader
        .read_to_end(&mut data)
        .expect("read verifies the checksum");
    assert!(
        data.iter()
            .enumerate()
            .all(|(at, byte)| *byte == model::snapshot_byte(n, at as u64))
    );
    let chunk = reader.read_chunk(info.data_len / 2, 4096).unwrap();
    assert_eq!(
        &chunk[..],
        &data[data.len() / 2..(data.len() / 2 + 4096).min(data.len())]
    );
}

fn crash_rounds(mode: &str, max_reports: u64, verify: fn(&Path, &Acknowledged, u64)) {
    let rounds = env_u64("KYTHIRA_CRASH_ROUNDS", 50);
    let seed = env_u64("KYTHIRA_CRASH_SEED", 0x6b79_7468);
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut dir = None;
    let mut total = Acknowledged::default();
    for round in 0..rounds {
        if round % ROUNDS_PER_DIR == 0 {
            dir = Some(
                tempfile::Builder::new()
                    .prefix("crash-")
                    .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                    .unwrap(),
            );
            total = Acknowledged::default();
        }
        let dir = dir.as_ref().expect("created in round 0").path();
        let reports = rng.u64(1..=max_reports);
        let acknowledged = crash_child(mode, dir, rng.u64(..), reports);
        // Everything acknowledged in earlier rounds on this directory must survive too.
        total.appended = total.appended.max(acknowledged.appended);
        total.hard_state = total.hard_state.max(acknowledged.hard_state);
        total.snapshot = total.snapshot.max(acknowledged.snapshot);
        verify(dir, &total, round);
    }
    eprintln!("{mode}: {rounds} crash rounds from seed {seed}");
}

#[test]
fn log_and_hard_state_survive_sigkill() {
    crash_rounds("log", 60, verify_log);
}

#[test]
fn snapshots_survive_sigkill() {
    crash_rounds("snapshot", 6, verify_snapshots);
}
