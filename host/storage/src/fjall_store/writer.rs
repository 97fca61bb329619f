//! The group-commit writer thread.

use super::{Shared, View, layout};
use crate::{
    HardState, LogEntry, MAX_WRITE_BYTES, Result, StorageError, codec, shape::LogShape,
    traits::check_hard_state,
};
use fjall::PersistMode;
use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, atomic::Ordering, mpsc},
};

/// Requests drained into one group at most; bounds the memory of one batch.
const MAX_GROUP: usize = 1024;

pub(super) enum Op {
    Append(Vec<LogEntry>),
    Truncate(u64),
    Compact(u64),
    Reset {
        index: u64,
        term: u64,
    },
    Save {
        hard_state: Option<HardState>,
        entries: Vec<LogEntry>,
    },
}

impl Op {
    /// The entries the operation writes.
    pub fn entries(&self) -> &[LogEntry] {
        match self {
            Op::Append(entries) | Op::Save { entries, .. } => entries,
            Op::Truncate(_) | Op::Compact(_) | Op::Reset { .. } => &[],
        }
    }

    /// Bytes it adds to a batch, for bounding groups.
    fn bytes(&self) -> u64 {
        self.entries().iter().map(LogEntry::size).sum()
    }
}

pub(super) struct Request {
    pub op: Op,
    /// Called on the writer thread with the outcome, once it is durable.
    pub done: Done,
}

/// What to do with a request's outcome.
pub(super) type Done = Box<dyn FnOnce(Result<()>) + Send>;

/// The log as a group's requests leave it, before anything is written.
struct Staged {
    shape: LogShape,
    hard_state: HardState,
    /// Entries appended by the group and not removed again, by index.
    written: BTreeMap<u64, LogEntry>,
}

impl Staged {
    fn apply(&mut self, op: Op) -> Result<()> {
        match op {
            Op::Append(entries) => {
                self.shape.check_append(&entries)?;
                self.append(entries);
            }
            Op::Truncate(from) => {
                self.shape.check_truncate(from)?;
                self.written.split_off(&from);
                self.shape.truncate(from);
            }
            Op::Compact(upto) => {
                self.shape.check_compact(upto)?;
                self.shape.compact(upto);
            }
            Op::Reset { index, term } => {
                self.shape.check_reset(index, term)?;
                self.written.clear();
                self.shape.reset(index, term);
            }
            Op::Save {
                hard_state,
                entries,
            } => {
                if let Some(next) = &hard_state {
                    check_hard_state(&self.hard_state, next)?;
                }
                self.shape.check_append(&entries)?;
                if let Some(next) = hard_state {
                    self.hard_state = next;
                }
                self.append(entries);
            }
        }
        Ok(())
    }

    fn append(&mut self, entries: Vec<LogEntry>) {
        let Some(first) = entries.first() else {
            return;
        };
        self.written.split_off(&first.index);
        self.shape.append(&entries);
        self.written
            .extend(entries.into_iter().map(|entry| (entry.index, entry)));
    }
}

/// Owns the durable state and is the only writer of the database.
pub(super) struct Writer {
    shared: Arc<Shared>,
    shape: LogShape,
    hard_state: HardState,
    /// Set after a failed write or sync: memory and disk may disagree from then on.
    poisoned: Option<String>,
}

impl Writer {
    /// Opens and verifies the database at `path`; the writer owns it from then on.
    pub fn open(path: &Path) -> Result<Self> {
        let (shared, shape, hard_state) = Shared::open(path)?;
        Ok(Self {
            shared: Arc::new(shared),
            shape,
            hard_state,
            poisoned: None,
        })
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn run(mut self, queue: mpsc::Receiver<Request>) {
        // A request that would have made the last group too large opens the next.
        let mut next = None;
        while let Some(first) = next.take().or_else(|| queue.recv().ok()) {
            let mut bytes = first.op.bytes();
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match queue.try_recv() {
                    Ok(request) if bytes + request.op.bytes() > MAX_WRITE_BYTES => {
                        next = Some(request);
                        break;
                    }
                    Ok(request) => {
                        bytes += request.op.bytes();
                        group.push(request);
                    }
                    Err(_) => break,
                }
            }
            self.commit_group(group);
        }
    }

    fn commit_group(&mut self, group: Vec<Request>) {
        if let Some(cause) = &self.poisoned {
            for request in group {
                (request.done)(Err(StorageError::Poisoned {
                    path: self.shared.path.clone(),
                    cause: cause.clone(),
                }));
            }
            return;
        }
        let mut staged = Staged {
            shape: self.shape.clone(),
            hard_state: self.hard_state,
            written: BTreeMap::new(),
        };
        let mut accepted = Vec::with_capacity(group.len());
        for request in group {
            // A rejected request changes nothing and is answered at once; the
            // others still go ahead.
            match staged.apply(request.op) {
                Ok(()) => accepted.push(request.done),
                Err(error) => {
                    (request.done)(Err(error));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        debug_assert!({
            staged.shape.assert_invariants();
            true
        });
        let unchanged = staged.written.is_empty()
            && staged.shape == self.shape
            && staged.hard_state == self.hard_state;
        let outcome = if unchanged {
            // Nothing to write (e.g. truncating past the end): the current state is
            // already durable.
            Ok(())
        } else {
            self.write(&staged)
        };
        match outcome {
            Ok(()) => {
                self.shape = staged.shape;
                self.hard_state = staged.hard_state;
                self.shared.publish(View {
                    shape: self.shape.clone(),
                    hard_state: self.hard_state,
                    snapshot: self.shared.db.snapshot(),
                });
                for done in accepted {
                    done(Ok(()));
                }
            }
            Err(source) => {
                self.poisoned = Some(source.to_string());
                self.shared.failed.store(true, Ordering::Release);
                for done in accepted {
                    done(Err(StorageError::WriteFailed {
                        path: self.shared.path.clone(),
                        source: Arc::clone(&source),
                    }));
                }
            }
        }
    }

    /// Writes the net effect of a group as one atomic batch and syncs it.
    fn write(&self, staged: &Staged) -> Result<(), Arc<fjall::Error>> {
        let Shared { db, log, meta, .. } = &*self.shared;
        let before = self.shape.bounds();
        let after = staged.shape.bounds();
        let mut batch = db.batch();
        // Indexes stored before but outside the new bounds are removed; indexes
        // inside the new bounds that the group wrote are (over)written. The two sets
        // are disjoint, so no key gets two operations in one batch (fjall gives all
        // items of a batch the same sequence number).
        let (old_lo, old_hi) = (before.compacted_index + 1, before.last_index);
        let (new_lo, new_hi) = (after.compacted_index + 1, after.last_index);
        for index in (old_lo..=old_hi.min(new_lo - 1)).chain(old_lo.max(new_hi + 1)..=old_hi) {
            batch.remove(log, codec::log_key(index));
        }
        for entry in staged.written.range(new_lo..=new_hi).map(|(_, e)| e) {
            batch.insert(log, codec::log_key(entry.index), codec::encode_entry(entry));
        }
        if after != before {
            // The watermark: same batch as the entries, so it never claims more or
            // less than what recovery will find.
            batch.insert(meta, layout::BOUNDS_KEY, codec::encode_bounds(&after));
        }
        if staged.hard_state != self.hard_state {
            batch.insert(
                meta,
                layout::HARD_STATE_KEY,
                codec::encode_hard_state(&staged.hard_state),
            );
        }
        batch.commit().map_err(Arc::new)?;
        // SYNC POINT: makes the batch above (entries, bounds, hard state) durable
        // before any caller of this group is told it succeeded. fdatasync suffices:
        // the journal's size change is data-relevant metadata, and fjall fsyncs the
        // directory itself when it creates journal files.
        db.persist(PersistMode::SyncData).map_err(Arc::new)?;
        self.shared.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Groups are built by hand here, so what shares one batch is deterministic.

    use super::*;
    use crate::{FjallStore, HardStateStore, LogStore, StorageError};
    use std::ops::RangeInclusive;

    fn entries(range: RangeInclusive<u64>, term: u64) -> Vec<LogEntry> {
        range
            .map(|index| LogEntry::new(index, term, index.to_be_bytes().to_vec()))
            .collect()
    }

    /// Commits `ops` as one group and returns each caller's outcome.
    fn commit(writer: &mut Writer, ops: Vec<Op>) -> Vec<Result<()>> {
        let (group, outcomes): (Vec<_>, Vec<_>) = ops
            .into_iter()
            .map(|op| {
                let (done, outcome) = mpsc::sync_channel(1);
                let done: Done = Box::new(move |r| {
                    let _ = done.send(r);
                });
                (Request { op, done }, outcome)
            })
            .unzip();
        writer.commit_group(group);
        outcomes.into_iter().map(|o| o.recv().unwrap()).collect()
    }

    fn temp_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_group_writes_its_net_effect_with_one_sync() {
        let dir = temp_dir();
        let mut writer = Writer::open(dir.path()).unwrap();
        let state = HardState {
            term: 2,
            vote: Some(1),
            commit: 6,
        };
        let outcomes = commit(
            &mut writer,
            vec![
                Op::Append(entries(1..=10, 1)),
                Op::Truncate(5),
                Op::Append(entries(5..=7, 2)),
                Op::Compact(3),
                Op::Save {
                    hard_state: Some(state),
                    entries: entries(8..=8, 2),
                },
            ],
        );
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(writer.shared().syncs.load(Ordering::Relaxed), 1);
        // Keys that only ever existed inside the group were never written.
        for index in [1, 3, 9, 10] {
            let key = codec::log_key(index);
            assert_eq!(writer.shared().log.get(key).unwrap(), None, "{index}");
        }
        drop(writer);

        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!((store.first_index(), store.last_index()), (4, 8));
        assert_eq!(store.term(3).unwrap(), 1);
        let expected = [entries(4..=4, 1), entries(5..=8, 2)].concat();
        assert_eq!(store.entries(4..9, u64::MAX).unwrap(), expected);
        assert_eq!(store.hard_state(), state);
    }

    #[test]
    fn a_rejected_request_leaves_the_rest_of_its_group_alone() {
        let dir = temp_dir();
        let mut writer = Writer::open(dir.path()).unwrap();
        let outcomes = commit(
            &mut writer,
            vec![
                Op::Append(entries(1..=3, 1)),
                Op::Append(entries(5..=6, 1)),
                Op::Append(entries(4..=4, 1)),
            ],
        );
        assert!(outcomes[0].is_ok() && outcomes[2].is_ok());
        assert!(matches!(outcomes[1], Err(StorageError::InvalidAppend(_))));
        drop(writer);
        assert_eq!(FjallStore::open(dir.path()).unwrap().last_index(), 4);
    }

    #[test]
    fn a_reset_in_a_group_discards_what_came_before_it() {
        let dir = temp_dir();
        let mut writer = Writer::open(dir.path()).unwrap();
        commit(&mut writer, vec![Op::Append(entries(1..=2, 1))])
            .into_iter()
            .for_each(|outcome| outcome.unwrap());
        let outcomes = commit(
            &mut writer,
            vec![
                Op::Append(entries(3..=5, 1)),
                Op::Reset { index: 10, term: 3 },
                Op::Append(entries(11..=12, 3)),
            ],
        );
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        for index in 1..=5 {
            let key = codec::log_key(index);
            assert_eq!(writer.shared().log.get(key).unwrap(), None, "{index}");
        }
        drop(writer);
        let store = FjallStore::open(dir.path()).unwrap();
        assert_eq!((store.first_index(), store.last_index()), (11, 12));
        assert_eq!(store.term(10).unwrap(), 3);
    }

    #[test]
    fn a_group_that_changes_nothing_does_not_sync() {
        let dir = temp_dir();
        let mut writer = Writer::open(dir.path()).unwrap();
        let outcomes = commit(&mut writer, vec![Op::Truncate(100), Op::Compact(0)]);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        assert_eq!(writer.shared().syncs.load(Ordering::Relaxed), 0);
    }
}
