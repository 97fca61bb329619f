//! Damaged stores must refuse to open with an error naming the file and index;
//! a torn, unsynced tail must be dropped quietly.
//!
//! Log damage is injected through a raw fjall handle on the store's own keyspaces
//! (see `layout`): flipping bytes inside fjall's table files would mostly trip
//! fjall's own block checksums before ours are consulted, which tests fjall rather
//! than this crate. One test flips a byte in fjall's journal to show that such
//! damage is loud too. Snapshot damage is injected into the files directly.

#[path = "../src/bin/storage-crash-child/model.rs"]
#[allow(
    dead_code,
    reason = "shared with the crash test; only entries are used here"
)]
mod model;

use kythira_storage::{
    EntryDefect, FjallStore, HardState, HardStateStore, LogEntry, LogStore, SnapshotMeta,
    SnapshotStore, StorageError, layout,
};
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("corruption-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn payload(index: u64) -> Vec<u8> {
    format!("kythira-entry-{index:06}-payload").into_bytes()
}

/// A closed store with entries 1..=`count`, terms 1 then 2 from index 40.
fn store_with_entries(dir: &Path, count: u64) {
    let store = FjallStore::open(dir).unwrap();
    let entries: Vec<LogEntry> = (1..=count)
        .map(|index| LogEntry::new(index, if index < 40 { 1 } else { 2 }, payload(index)))
        .collect();
    store.append(&entries).unwrap();
    store
        .save_hard_state(&HardState {
            term: 2,
            vote: Some(1),
            commit: count,
        })
        .unwrap();
}

/// Runs `damage` on the raw keyspaces (log, meta) of a closed store, durably.
fn with_raw_keyspaces(dir: &Path, damage: impl FnOnce(&fjall::Keyspace, &fjall::Keyspace)) {
    let db = fjall::Database::builder(dir).open().unwrap();
    let log = db
        .keyspace(layout::LOG_KEYSPACE, fjall::KeyspaceCreateOptions::default)
        .unwrap();
    let meta = db
        .keyspace(layout::META_KEYSPACE, fjall::KeyspaceCreateOptions::default)
        .unwrap();
    damage(&log, &meta);
    db.persist(fjall::PersistMode::SyncAll).unwrap();
}

fn open_error(dir: &Path) -> StorageError {
    match FjallStore::open(dir) {
        Ok(_) => panic!("a damaged store opened"),
        Err(error) => {
            assert!(
                error.to_string().contains(&dir.display().to_string()),
                "{error}"
            );
            error
        }
    }
}

#[test]
fn a_flipped_byte_in_a_synced_entry_stops_the_open() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    with_raw_keyspaces(dir.path(), |log, _| {
        let mut value = log.get(layout::log_key(50)).unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        log.insert(layout::log_key(50), value).unwrap();
    });
    let error = open_error(dir.path());
    assert!(error.is_corruption());
    assert!(
        matches!(
            &error,
            StorageError::CorruptEntry { index: 50, path, defect: EntryDefect::ChecksumMismatch { .. } }
                if path == dir.path()
        ),
        "{error}"
    );
    assert!(error.to_string().contains("log entry 50"), "{error}");
}

#[test]
fn a_missing_middle_entry_stops_the_open() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    with_raw_keyspaces(dir.path(), |log, _| {
        log.remove(layout::log_key(37)).unwrap()
    });
    let error = open_error(dir.path());
    assert!(
        matches!(
            error,
            StorageError::MissingEntry {
                index: 37,
                first: 1,
                last: 100,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_missing_last_entry_is_not_mistaken_for_a_torn_tail() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    with_raw_keyspaces(dir.path(), |log, _| {
        log.remove(layout::log_key(100)).unwrap()
    });
    let error = open_error(dir.path());
    assert!(
        matches!(error, StorageError::MissingEntry { index: 100, .. }),
        "{error}"
    );
}

#[test]
fn a_well_formed_entry_with_a_lower_term_stops_the_open() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    with_raw_keyspaces(dir.path(), |log, _| {
        let entry = LogEntry::new(60, 1, payload(60));
        log.insert(layout::log_key(60), layout::encode_entry(&entry))
            .unwrap();
    });
    let error = open_error(dir.path());
    assert!(
        matches!(
            error,
            StorageError::CorruptEntry {
                index: 60,
                defect: EntryDefect::TermRegression {
                    term: 1,
                    previous: 2
                },
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn an_entry_beyond_the_durable_bounds_stops_the_open() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    with_raw_keyspaces(dir.path(), |log, _| {
        let entry = LogEntry::new(103, 2, payload(103));
        log.insert(layout::log_key(103), layout::encode_entry(&entry))
            .unwrap();
    });
    let error = open_error(dir.path());
    assert!(
        matches!(
            error,
            StorageError::StrayEntry {
                index: 103,
                last: 100,
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn damaged_metadata_stops_the_open() {
    for (key, record) in [
        (layout::HARD_STATE_KEY, "hard state"),
        (layout::BOUNDS_KEY, "log bounds"),
    ] {
        let dir = temp_dir();
        store_with_entries(dir.path(), 10);
        with_raw_keyspaces(dir.path(), |_, meta| {
            let mut value = meta.get(key).unwrap().unwrap().to_vec();
            value[6] ^= 0x10;
            meta.insert(key, value).unwrap();
        });
        let error = open_error(dir.path());
        assert!(
            matches!(error, StorageError::CorruptRecord { record: r, .. } if r == record),
            "{error}"
        );

        with_raw_keyspaces(dir.path(), |_, meta| meta.remove(key).unwrap());
        let error = open_error(dir.path());
        assert!(
            matches!(error, StorageError::CorruptRecord { .. }),
            "{error}"
        );
    }
}

fn journal(dir: &Path) -> PathBuf {
    let mut journals: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|item| item.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "jnl"))
        .collect();
    journals.sort();
    journals.pop().expect("a journal file")
}

/// Runs the crash child in `mode` up to entry `last`, and kills it once it
/// reports: the store is left as a crash leaves it, journal and all.
fn append_and_die(dir: &Path, mode: &str, last: u64) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-crash-child"))
        .args([mode, dir.to_str().unwrap(), &last.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(line.trim(), format!("A {last}"));
}

/// A closed store with the model's entries 1..=`last`, its journal trimmed
/// to them (fjall preallocates a journal and trims it when it recovers).
fn closed_store(dir: &Path, last: u64) {
    let store = FjallStore::open(dir).unwrap();
    store
        .append(&(1..=last).map(model::entry).collect::<Vec<_>>())
        .unwrap();
    drop(store);
    drop(FjallStore::open(dir).unwrap());
}

/// Where `needle` is in `bytes`.
fn find(bytes: &[u8], needle: &[u8]) -> Option<usize> {
    bytes.windows(needle.len()).position(|w| w == needle)
}

/// A store in `dir` with entries 1..=50 and then, left by a crash before it
/// closed, one batch of three 64 KiB entries: its journal, the journal's
/// bytes, and where entry 52's payload begins in them.
fn wide_final_batch(dir: &Path) -> (PathBuf, Vec<u8>, usize) {
    closed_store(dir, 50);
    append_and_die(dir, "append-wide", 53);
    let journal = journal(dir);
    let bytes = fs::read(&journal).unwrap();
    // The journal holds values as written: no compression whose output
    // would have to be reproduced to check them.
    let second = model::wide_entry(52).payload;
    let at = find(&bytes, &second[..64]).expect("entry 52 is stored uncompressed");
    (journal, bytes, at)
}

/// Power fails while the last batch is being synced: a later page of it
/// reaches the disk and an earlier one does not. That batch was never
/// acknowledged; it is a torn tail and is dropped. (fjall used to fail every
/// open on its checksum.)
#[test]
fn a_final_batch_with_a_lost_page_is_a_torn_tail() {
    let dir = temp_dir();
    let (journal, mut bytes, at) = wide_final_batch(dir.path());
    let second = model::wide_entry(52).payload;
    let page = (at / 4096 + 2) * 4096;
    assert!(
        page + 4096 < at + second.len(),
        "the page lies inside entry 52"
    );
    bytes[page..page + 4096].fill(0);
    fs::write(&journal, bytes).unwrap();

    let store = FjallStore::open(dir.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (1, 50));
    assert_eq!(store.entry(50).unwrap(), model::entry(50));
    store.append(&[model::wide_entry(51)]).unwrap();
    drop(store);
    let store = FjallStore::open(dir.path()).unwrap();
    assert_eq!(store.entry(51).unwrap(), model::wide_entry(51));
}

/// A flipped bit in the last batch, with nothing lost around it, is not what
/// a crash leaves (a lost write leaves zeros or the end of the file): the
/// batch may have been acknowledged, so the open stops. (It used to be
/// dropped as a torn tail, as if never written.)
#[test]
fn a_flipped_bit_in_the_final_batch_is_not_taken_for_a_torn_write() {
    let dir = temp_dir();
    let (journal, mut bytes, at) = wide_final_batch(dir.path());
    bytes[at + 10_000] ^= 0x10;
    fs::write(&journal, bytes).unwrap();

    let error = open_error(dir.path()).to_string();
    assert!(error.contains(&journal.display().to_string()), "{error}");
    assert!(error.contains("not what a write cut short"), "{error}");
}

/// Damage in the middle of a journal, with acknowledged batches after it,
/// stops the open with the journal and offset named. (fjall used to take
/// it for the end of the journal and drop every later batch.)
#[test]
fn damage_inside_the_journal_is_not_taken_for_its_end() {
    let dir = temp_dir();
    closed_store(dir.path(), 10);
    append_and_die(dir.path(), "append-each", 200);
    let journal = journal(dir.path());
    let mut bytes = fs::read(&journal).unwrap();
    let at = find(&bytes, &model::entry(100).payload).expect("entry 100 is in the journal");
    let page = at / 4096 * 4096;
    bytes[page..page + 4096].fill(0);
    fs::write(&journal, bytes).unwrap();

    let error = open_error(dir.path()).to_string();
    assert!(error.contains(&journal.display().to_string()), "{error}");
    assert!(error.contains("damaged at offset"), "{error}");
    assert!(error.contains("an intact batch follows"), "{error}");
}

#[test]
fn a_torn_unsynced_tail_is_dropped_and_the_rest_opens() {
    let dir = temp_dir();
    closed_store(dir.path(), 50);
    let journal = journal(dir.path());
    let synced_len = fs::metadata(&journal).unwrap().len();

    // A process appends 51..=60 in one batch and dies without closing the store.
    append_and_die(dir.path(), "append", 60);

    let full_len = fs::metadata(&journal).unwrap().len();
    assert!(full_len > synced_len, "{full_len} > {synced_len}");
    // As if the machine died while that batch was being written.
    let file = fs::OpenOptions::new().write(true).open(&journal).unwrap();
    file.set_len(synced_len + (full_len - synced_len) / 2)
        .unwrap();
    drop(file);

    let store = FjallStore::open(dir.path()).unwrap();
    assert_eq!((store.first_index(), store.last_index()), (1, 50));
    assert_eq!(store.entry(50).unwrap(), model::entry(50));
    // And the store keeps working from there.
    store.append(&[model::entry(51)]).unwrap();
    drop(store);
    assert_eq!(FjallStore::open(dir.path()).unwrap().last_index(), 51);
}

#[test]
fn a_flipped_byte_in_the_journal_is_loud() {
    let dir = temp_dir();
    store_with_entries(dir.path(), 100);
    let journal = journal(dir.path());
    let mut bytes = fs::read(&journal).unwrap();
    let needle = payload(30);
    let at = bytes
        .windows(needle.len())
        .position(|window| window == needle)
        .expect("entry 30 is in the journal");
    bytes[at + 3] ^= 0x04;
    fs::write(&journal, bytes).unwrap();
    let error = open_error(dir.path());
    assert!(matches!(error, StorageError::Database { .. }), "{error}");
}

fn snapshot_store_with_one(dir: &Path) -> PathBuf {
    let store = SnapshotStore::open(dir).unwrap();
    let meta = SnapshotMeta {
        index: 500,
        term: 4,
        configuration: b"members=1,2,3"[..].into(),
    };
    let mut writer = store.begin(meta).unwrap();
    for chunk in 0..10u8 {
        writer.write_chunk(&[chunk; 1000]).unwrap();
    }
    writer.finish().unwrap();
    store.latest_path().unwrap()
}

fn snapshot_open_error(dir: &Path, file: &Path) -> String {
    match SnapshotStore::open(dir) {
        Ok(_) => panic!("a damaged snapshot opened"),
        Err(error) => {
            assert!(
                matches!(&error, StorageError::CorruptSnapshot { path, .. } if path == file),
                "{error}"
            );
            error.to_string()
        }
    }
}

#[test]
fn a_flipped_byte_in_snapshot_data_stops_the_open() {
    let dir = temp_dir();
    let file = snapshot_store_with_one(dir.path());
    let mut bytes = fs::read(&file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x80;
    fs::write(&file, bytes).unwrap();
    let message = snapshot_open_error(dir.path(), &file);
    assert!(message.contains("data checksum mismatch"), "{message}");
}

#[test]
fn a_damaged_snapshot_header_stops_the_open() {
    let dir = temp_dir();
    let file = snapshot_store_with_one(dir.path());
    let mut bytes = fs::read(&file).unwrap();
    bytes[14] ^= 0x01; // inside the index field
    fs::write(&file, bytes).unwrap();
    let message = snapshot_open_error(dir.path(), &file);
    assert!(message.contains("header checksum mismatch"), "{message}");
}

#[test]
fn a_truncated_snapshot_stops_the_open() {
    let dir = temp_dir();
    let file = snapshot_store_with_one(dir.path());
    let len = fs::metadata(&file).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(len - 7)
        .unwrap();
    snapshot_open_error(dir.path(), &file);
}

#[test]
fn snapshot_damage_found_while_streaming_is_an_error() {
    let dir = temp_dir();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let meta = SnapshotMeta {
        index: 9,
        term: 1,
        configuration: Default::default(),
    };
    let mut writer = store.begin(meta).unwrap();
    writer.write_chunk(&[7; 4096]).unwrap();
    writer.finish().unwrap();
    let file = store.latest_path().unwrap();
    let mut reader = store.open_latest().unwrap().unwrap();
    // Bit rot after the open-time verification.
    let mut bytes = fs::read(&file).unwrap();
    bytes[100] ^= 0x02;
    fs::write(&file, bytes).unwrap();
    let mut reader_after = store.open_latest().unwrap().unwrap();
    let mut sink = Vec::new();
    let error = std::io::Read::read_to_end(&mut reader_after, &mut sink).unwrap_err();
    assert!(error.to_string().contains("checksum"), "{error}");
    // fs::write replaced the contents of the same inode, so the earlier reader sees it too.
    assert!(std::io::Read::read_to_end(&mut reader, &mut Vec::new()).is_err());
}

#[test]
fn large_logs_are_verified_in_slices_with_terms_and_damage_found_across_them() {
    // Large enough to be split between cores at open (where there is more than
    // one): slices 1..=20_000 and 20_001..=40_000 on two cores.
    let dir = temp_dir();
    let term_of = |index: u64| match index {
        ..10_000 => 1,
        10_000..20_001 => 2,
        20_001..30_000 => 5,
        _ => 6,
    };
    let entry = |index: u64, term: u64| LogEntry::new(index, term, &b"x"[..]);
    {
        let store = FjallStore::open(dir.path()).unwrap();
        for start in (1..=40_000).step_by(10_000) {
            let batch: Vec<LogEntry> = (start..start + 10_000)
                .map(|i| entry(i, term_of(i)))
                .collect();
            store.append(&batch).unwrap();
        }
    }
    {
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!(store.last_index(), 40_000);
        for index in [1, 9_999, 10_000, 20_000, 20_001, 29_999, 30_000, 40_000] {
            assert_eq!(
                store.term(index).unwrap(),
                term_of(index),
                "term of {index}"
            );
        }
    }
    // A term regression exactly at the start of the second slice.
    with_raw_keyspaces(dir.path(), |log, _| {
        let value = layout::encode_entry(&entry(20_001, 1));
        log.insert(layout::log_key(20_001), value).unwrap();
    });
    let error = open_error(dir.path());
    assert!(
        matches!(
            error,
            StorageError::CorruptEntry {
                index: 20_001,
                defect: EntryDefect::TermRegression {
                    term: 1,
                    previous: 2
                },
                ..
            }
        ),
        "{error}"
    );
    // Repaired, and instead a damaged entry inside the second slice.
    with_raw_keyspaces(dir.path(), |log, _| {
        let value = layout::encode_entry(&entry(20_001, 5));
        log.insert(layout::log_key(20_001), value).unwrap();
        let mut value = log.get(layout::log_key(35_000)).unwrap().unwrap().to_vec();
        value[0] ^= 0xff;
        log.insert(layout::log_key(35_000), value).unwrap();
    });
    let error = open_error(dir.path());
    assert!(
        matches!(error, StorageError::CorruptEntry { index: 35_000, .. }),
        "{error}"
    );
}
