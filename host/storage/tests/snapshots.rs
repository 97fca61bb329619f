//! Snapshot store behaviour: streaming writes, atomic publication, chunked reads,
//! cleanup at open.

use kythira_storage::{SnapshotMeta, SnapshotStore, StorageError};
use std::{fs, io::Read, path::Path};

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("snapshots-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn meta(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        index,
        term,
        configuration: format!("voters=1,2,3@{index}").into_bytes().into(),
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn write(store: &SnapshotStore, meta: SnapshotMeta, data: &[u8], chunk: usize) {
    let mut writer = store.begin(meta).unwrap();
    for piece in data.chunks(chunk) {
        writer.write_chunk(piece).unwrap();
    }
    assert_eq!(writer.data_len(), data.len() as u64);
    writer.finish().unwrap();
}

/// The files of a snapshot directory, but for the store's lock file.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|item| item.unwrap().file_name().into_string().unwrap())
        .filter(|name| name != "lock")
        .collect();
    names.sort();
    names
}

#[test]
fn streams_in_and_reads_back_in_chunks_after_reopen() {
    let dir = temp_dir();
    let bytes = data(3 << 20, 9);
    {
        let store = SnapshotStore::open(dir.path()).unwrap();
        assert!(store.latest().is_none());
        assert!(store.open_latest().unwrap().is_none());
        write(&store, meta(100, 3), &bytes, 70_001);
    }
    let store = SnapshotStore::open(dir.path()).unwrap();
    let info = store.latest().unwrap();
    assert_eq!(info.meta, meta(100, 3));
    assert_eq!(info.data_len, bytes.len() as u64);
    assert_eq!(info.checksum, crc32c::crc32c(&bytes));

    let reader = store.open_latest().unwrap().unwrap();
    let mut reassembled = Vec::new();
    let mut offset = 0;
    loop {
        let chunk = reader.read_chunk(offset, 1 << 16).unwrap();
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        reassembled.extend_from_slice(&chunk);
    }
    assert_eq!(reassembled, bytes);
    assert!(
        reader
            .read_chunk(info.data_len + 10, 100)
            .unwrap()
            .is_empty()
    );

    let mut streamed = Vec::new();
    store
        .open_latest()
        .unwrap()
        .unwrap()
        .read_to_end(&mut streamed)
        .unwrap();
    assert_eq!(streamed, bytes);
}

#[test]
fn a_new_snapshot_replaces_the_old_and_only_when_finished() {
    let dir = temp_dir();
    let store = SnapshotStore::open(dir.path()).unwrap();
    write(&store, meta(10, 1), &data(1000, 1), 100);
    let reader_of_old = store.open_latest().unwrap().unwrap();

    let mut writer = store.begin(meta(20, 2)).unwrap();
    writer.write_chunk(&data(500, 2)).unwrap();
    // Not finished: still the old one, the new one only as a temporary file.
    assert_eq!(store.latest().unwrap().meta.index, 10);
    assert_eq!(files(dir.path()).len(), 2);
    writer.finish().unwrap();

    assert_eq!(store.latest().unwrap().meta, meta(20, 2));
    assert_eq!(
        files(dir.path()),
        ["snapshot-00000000000000000020-00000000000000000002.snap"]
    );
    // A reader opened before keeps reading the replaced snapshot.
    assert_eq!(reader_of_old.read_chunk(0, 2000).unwrap(), data(1000, 1));
}

#[test]
fn an_abandoned_writer_leaves_nothing_behind() {
    let dir = temp_dir();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let mut writer = store.begin(meta(5, 1)).unwrap();
    writer.write_chunk(b"partial").unwrap();
    drop(writer);
    assert!(files(dir.path()).is_empty());
    assert!(store.latest().is_none());
}

#[test]
fn open_removes_temporary_and_superseded_files() {
    let dir = temp_dir();
    {
        let store = SnapshotStore::open(dir.path()).unwrap();
        write(&store, meta(30, 2), &data(100, 3), 7);
    }
    // As a crash would leave them: a temporary file and an older snapshot whose
    // removal was not yet durable.
    let current = files(dir.path()).pop().unwrap();
    fs::copy(
        dir.path().join(&current),
        dir.path()
            .join("snapshot-00000000000000000010-00000000000000000001.snap"),
    )
    .unwrap();
    fs::write(
        dir.path().join(format!("{current}.3.tmp")),
        b"half a snapshot",
    )
    .unwrap();
    fs::write(dir.path().join("unrelated.txt"), b"kept").unwrap();

    let store = SnapshotStore::open(dir.path()).unwrap();
    assert_eq!(store.latest().unwrap().meta, meta(30, 2));
    assert_eq!(files(dir.path()), [current, "unrelated.txt".to_string()]);
}

#[test]
fn older_snapshots_are_refused() {
    let dir = temp_dir();
    let store = SnapshotStore::open(dir.path()).unwrap();
    let slow = store.begin(meta(40, 2)).unwrap();
    write(&store, meta(50, 2), &data(10, 4), 10);
    assert!(matches!(
        store.begin(meta(45, 2)),
        Err(StorageError::StaleSnapshot {
            index: 45,
            latest: 50
        })
    ));
    // A writer that started before the newer snapshot finished is refused at finish.
    assert!(matches!(
        slow.finish(),
        Err(StorageError::StaleSnapshot { index: 40, .. })
    ));
    assert_eq!(files(dir.path()).len(), 1);
    assert_eq!(store.latest().unwrap().meta.index, 50);
}

#[test]
fn a_file_whose_name_disagrees_with_its_header_is_corrupt() {
    let dir = temp_dir();
    let store = SnapshotStore::open(dir.path()).unwrap();
    write(&store, meta(7, 1), &data(10, 5), 10);
    let path = store.latest_path().unwrap();
    drop(store);
    let renamed = dir
        .path()
        .join("snapshot-00000000000000000008-00000000000000000001.snap");
    fs::rename(&path, &renamed).unwrap();
    assert!(matches!(
        SnapshotStore::open(dir.path()),
        Err(StorageError::CorruptSnapshot { path, .. }) if path == renamed
    ));
}

/// One store per directory at a time: a second one would delete the first's
/// temporary and superseded files as strays.
#[test]
fn a_directory_holds_one_store_at_a_time() {
    let dir = temp_dir();
    let first = SnapshotStore::open(dir.path()).unwrap();
    let clone = first.clone();
    let error = SnapshotStore::open(dir.path()).unwrap_err();
    assert!(matches!(error, StorageError::Locked { .. }), "{error}");
    drop(first);
    // A clone still holds it.
    assert!(SnapshotStore::open(dir.path()).is_err());
    drop(clone);
    let reopened = SnapshotStore::open(dir.path()).unwrap();
    write(&reopened, meta(5, 1), &data(100, 1), 10);
}
