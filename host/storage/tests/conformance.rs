//! One behavioural suite for every `RaftStorage` implementation, plus property tests
//! against a plain model. The fjall store additionally reopens from disk.

use kythira_storage::{
    FjallStore, HardState, HardStateStore, LogEntry, LogStore, MemoryStore, RaftStorage,
    StorageError,
};
use proptest::prelude::*;
use std::ops::Range;

/// A store under test, with a way to simulate a restart.
trait Harness {
    type Store: RaftStorage;
    fn new() -> Self;
    fn store(&self) -> &Self::Store;
    /// Restarts the store; a durable store must come back unchanged.
    fn reopen(&mut self);
}

struct Memory(MemoryStore);

impl Harness for Memory {
    type Store = MemoryStore;
    fn new() -> Self {
        Self(MemoryStore::new())
    }
    fn store(&self) -> &MemoryStore {
        &self.0
    }
    fn reopen(&mut self) {}
}

struct Fjall {
    store: Option<FjallStore>,
    dir: tempfile::TempDir,
}

impl Harness for Fjall {
    type Store = FjallStore;
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("conformance-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap();
        let store = Some(FjallStore::open(dir.path()).unwrap());
        Self { store, dir }
    }
    fn store(&self) -> &FjallStore {
        self.store.as_ref().unwrap()
    }
    fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(FjallStore::open(self.dir.path()).unwrap());
    }
}

fn entry(index: u64, term: u64) -> LogEntry {
    let len = (index % 7) as usize * 10;
    LogEntry::new(index, term, vec![(index % 251) as u8; len])
}

fn entries(range: Range<u64>, term: u64) -> Vec<LogEntry> {
    range.map(|index| entry(index, term)).collect()
}

fn all<S: LogStore>(store: &S) -> Vec<LogEntry> {
    let range = store.first_index()..store.last_index() + 1;
    if range.is_empty() {
        return Vec::new();
    }
    store.entries(range, u64::MAX).unwrap()
}

fn starts_empty<H: Harness>() {
    let h = H::new();
    let s = h.store();
    assert_eq!((s.first_index(), s.last_index()), (1, 0));
    assert_eq!(s.term(0).unwrap(), 0);
    assert!(matches!(
        s.term(1),
        Err(StorageError::Unavailable {
            index: 1,
            last_index: 0
        })
    ));
    assert!(matches!(s.entry(1), Err(StorageError::Unavailable { .. })));
    assert_eq!(s.entries(1..1, 100).unwrap(), vec![]);
    assert_eq!(s.hard_state(), HardState::default());
}

fn appends_and_reads_back<H: Harness>() {
    let mut h = H::new();
    h.store().append(&entries(1..4, 1)).unwrap();
    h.store().append(&entries(4..9, 2)).unwrap();
    h.reopen();
    let s = h.store();
    assert_eq!((s.first_index(), s.last_index()), (1, 8));
    assert_eq!(s.entry(5).unwrap(), entry(5, 2));
    assert_eq!(s.term(3).unwrap(), 1);
    assert_eq!(s.term(4).unwrap(), 2);
    assert_eq!(all(s), [entries(1..4, 1), entries(4..9, 2)].concat());
    assert!(matches!(
        s.entries(2..10, 100),
        Err(StorageError::Unavailable { index: 9, .. })
    ));
    assert!(matches!(
        s.entries(0..2, 100),
        Err(StorageError::Compacted { index: 0, .. })
    ));
}

fn byte_budget_returns_a_prefix_but_at_least_one<H: Harness>() {
    let h = H::new();
    let s = h.store();
    s.append(&entries(1..11, 1)).unwrap();
    let sizes: Vec<u64> = (1..11).map(|i| entry(i, 1).size()).collect();
    assert_eq!(s.entries(1..11, 0).unwrap(), entries(1..2, 1));
    let budget = sizes[..3].iter().sum::<u64>();
    assert_eq!(s.entries(1..11, budget).unwrap(), entries(1..4, 1));
    assert_eq!(
        s.entries(1..11, budget + sizes[3] - 1).unwrap(),
        entries(1..4, 1)
    );
    assert_eq!(s.entries(4..6, u64::MAX).unwrap(), entries(4..6, 1));
}

fn append_replaces_a_conflicting_suffix<H: Harness>() {
    let mut h = H::new();
    h.store().append(&entries(1..6, 1)).unwrap();
    h.store().append(&entries(3..5, 2)).unwrap();
    h.reopen();
    let s = h.store();
    assert_eq!(s.last_index(), 4);
    assert_eq!(all(s), [entries(1..3, 1), entries(3..5, 2)].concat());
}

fn rewriting_entries_with_the_same_terms_stores_the_new_payloads<H: Harness>() {
    let mut h = H::new();
    h.store().append(&entries(1..5, 1)).unwrap();
    let rewritten = vec![
        LogEntry::new(3, 1, &b"new three"[..]),
        LogEntry::new(4, 1, &b"new four"[..]),
    ];
    h.store().append(&rewritten).unwrap();
    h.reopen();
    assert_eq!(all(h.store()), [entries(1..3, 1), rewritten].concat());
}

fn absurd_indexes_are_errors_not_panics<H: Harness>() {
    let h = H::new();
    let s = h.store();
    s.append(&entries(1..3, 1)).unwrap();
    assert!(matches!(
        s.entry(u64::MAX),
        Err(StorageError::Unavailable { .. })
    ));
    assert!(matches!(
        s.term(u64::MAX),
        Err(StorageError::Unavailable { .. })
    ));
    assert!(s.entries(2..u64::MAX, 10).is_err());
    let (lo, hi) = (2, 1);
    assert_eq!(
        s.entries(lo..hi, 10).unwrap(),
        vec![],
        "a reversed range is empty"
    );
}

fn rejects_invalid_appends_without_changing_anything<H: Harness>() {
    let h = H::new();
    let s = h.store();
    s.append(&entries(1..4, 3)).unwrap();
    let before = all(s);
    for bad in [
        entries(5..6, 3),               // gap
        entries(4..5, 2),               // lower term
        vec![entry(4, 3), entry(6, 3)], // not contiguous
        vec![entry(4, 4), entry(5, 3)], // term decreases inside
        entries(0..1, 3),               // index 0
    ] {
        assert!(
            matches!(s.append(&bad), Err(StorageError::InvalidAppend(_))),
            "{bad:?}"
        );
    }
    assert_eq!(all(s), before);
    s.append(&[]).unwrap();
    assert_eq!(all(s), before);
}

fn truncates_and_compacts<H: Harness>() {
    let mut h = H::new();
    let s = h.store();
    s.append(&[entries(1..5, 1), entries(5..11, 2)].concat())
        .unwrap();
    s.truncate_suffix(9).unwrap();
    s.truncate_suffix(20).unwrap();
    s.compact_prefix(6).unwrap();
    s.compact_prefix(3).unwrap();
    h.reopen();
    let s = h.store();
    assert_eq!((s.first_index(), s.last_index()), (7, 8));
    assert_eq!(s.term(6).unwrap(), 2);
    assert!(matches!(
        s.term(5),
        Err(StorageError::Compacted {
            index: 5,
            first_index: 7
        })
    ));
    assert!(matches!(s.entry(6), Err(StorageError::Compacted { .. })));
    assert!(matches!(
        s.truncate_suffix(6),
        Err(StorageError::Compacted { .. })
    ));
    assert!(matches!(
        s.compact_prefix(9),
        Err(StorageError::Unavailable { .. })
    ));
    assert!(matches!(
        s.append(&entries(6..7, 2)),
        Err(StorageError::InvalidAppend(_))
    ));
    assert_eq!(all(s), entries(7..9, 2));

    s.compact_prefix(8).unwrap();
    assert_eq!((s.first_index(), s.last_index()), (9, 8));
    assert_eq!(s.term(8).unwrap(), 2);
    s.append(&entries(9..10, 4)).unwrap();
    assert_eq!(all(s), entries(9..10, 4));
}

fn reset_discards_the_log_after_a_snapshot<H: Harness>() {
    let mut h = H::new();
    h.store().append(&entries(1..6, 1)).unwrap();
    h.store().reset(20, 3).unwrap();
    h.reopen();
    let s = h.store();
    assert_eq!((s.first_index(), s.last_index()), (21, 20));
    assert_eq!(s.term(20).unwrap(), 3);
    assert!(matches!(
        s.reset(19, 3),
        Err(StorageError::Compacted { .. })
    ));
    s.append(&entries(21..23, 3)).unwrap();
    assert_eq!(all(s), entries(21..23, 3));
}

fn hard_state_keeps_election_safety<H: Harness>() {
    let mut h = H::new();
    let voted = HardState {
        term: 5,
        vote: Some(2),
        commit: 0,
    };
    h.store().save_hard_state(&voted).unwrap();
    h.reopen();
    let s = h.store();
    assert_eq!(s.hard_state(), voted);
    let other_vote = HardState {
        vote: Some(3),
        ..voted
    };
    assert!(matches!(
        s.save_hard_state(&other_vote),
        Err(StorageError::InvalidHardState(_))
    ));
    let older = HardState {
        term: 4,
        vote: None,
        commit: 0,
    };
    assert!(matches!(
        s.save_hard_state(&older),
        Err(StorageError::InvalidHardState(_))
    ));
    let committed = HardState { commit: 7, ..voted };
    s.save_hard_state(&committed).unwrap();
    let next_term = HardState {
        term: 6,
        vote: None,
        commit: 7,
    };
    s.save_hard_state(&next_term).unwrap();
    assert_eq!(s.hard_state(), next_term);
}

fn save_is_all_or_nothing<H: Harness>() {
    let mut h = H::new();
    let state = HardState {
        term: 2,
        vote: Some(1),
        commit: 1,
    };
    h.store().save(Some(&state), &entries(1..3, 2)).unwrap();
    let next = HardState {
        term: 3,
        vote: Some(1),
        commit: 2,
    };
    // Invalid entries: the hard state must not be saved either.
    assert!(h.store().save(Some(&next), &entries(5..6, 3)).is_err());
    h.reopen();
    let s = h.store();
    assert_eq!(s.hard_state(), state);
    assert_eq!(all(s), entries(1..3, 2));
    s.save(None, &entries(3..4, 2)).unwrap();
    assert_eq!(s.last_index(), 3);
}

/// Oversized entries are refused with the limit named, before they reach the
/// database (fjall panics in its writer thread on a value of 4 GiB), and the
/// store goes on working. (A write of many entries is never refused for its
/// total: a Raft write must be stored whole.)
fn oversized_entries_are_refused_and_the_store_goes_on<H: Harness>() {
    use kythira_storage::{MAX_ENTRY_BYTES, StorageError};
    let h = H::new();
    let s = h.store();
    s.append(&entries(1..3, 1)).unwrap();
    // The shape that panicked fjall's writer: 4 GiB (zeroed pages that are
    // never touched, so this costs no memory), and one byte over the limit.
    for len in [4usize << 30, MAX_ENTRY_BYTES as usize + 1] {
        let big = bytes::Bytes::from(vec![0u8; len]);
        let err = s.append(&[LogEntry::new(3, 1, big)]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::TooLarge {
                    index: 3,
                    limit: MAX_ENTRY_BYTES,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("over the storage limit"), "{err}");
    }
    let part = bytes::Bytes::from(vec![7u8; MAX_ENTRY_BYTES as usize]);
    s.append(&[LogEntry::new(3, 1, part)]).unwrap();
    assert_eq!(s.last_index(), 3);
}

macro_rules! conformance {
    ($module:ident, $harness:ty) => {
        mod $module {
            use super::*;
            #[test]
            fn starts_empty() {
                super::starts_empty::<$harness>();
            }
            #[test]
            fn appends_and_reads_back() {
                super::appends_and_reads_back::<$harness>();
            }
            #[test]
            fn byte_budget_returns_a_prefix_but_at_least_one() {
                super::byte_budget_returns_a_prefix_but_at_least_one::<$harness>();
            }
            #[test]
            fn append_replaces_a_conflicting_suffix() {
                super::append_replaces_a_conflicting_suffix::<$harness>();
            }
            #[test]
            fn rewriting_entries_with_the_same_terms_stores_the_new_payloads() {
                super::rewriting_entries_with_the_same_terms_stores_the_new_payloads::<$harness>();
            }
            #[test]
            fn absurd_indexes_are_errors_not_panics() {
                super::absurd_indexes_are_errors_not_panics::<$harness>();
            }
            #[test]
            fn rejects_invalid_appends_without_changing_anything() {
                super::rejects_invalid_appends_without_changing_anything::<$harness>();
            }
            #[test]
            fn truncates_and_compacts() {
                super::truncates_and_compacts::<$harness>();
            }
            #[test]
            fn reset_discards_the_log_after_a_snapshot() {
                super::reset_discards_the_log_after_a_snapshot::<$harness>();
            }
            #[test]
            fn hard_state_keeps_election_safety() {
                super::hard_state_keeps_election_safety::<$harness>();
            }
            #[test]
            fn save_is_all_or_nothing() {
                super::save_is_all_or_nothing::<$harness>();
            }
            #[test]
            fn oversized_entries_are_refused_and_the_store_goes_on() {
                super::oversized_entries_are_refused_and_the_store_goes_on::<$harness>();
            }
        }
    };
}

conformance!(memory, Memory);
conformance!(fjall, Fjall);

/// The simplest possible log: what every store must behave like.
#[derive(Default, Clone, Debug)]
struct Model {
    compacted: (u64, u64),
    entries: Vec<LogEntry>,
}

impl Model {
    fn first(&self) -> u64 {
        self.compacted.0 + 1
    }
    fn last(&self) -> u64 {
        self.compacted.0 + self.entries.len() as u64
    }
    fn term(&self, index: u64) -> Option<u64> {
        if index == self.compacted.0 {
            Some(self.compacted.1)
        } else if index >= self.first() && index <= self.last() {
            Some(self.entries[(index - self.first()) as usize].term)
        } else {
            None
        }
    }
    fn append(&mut self, new: &[LogEntry]) -> bool {
        let Some(head) = new.first() else { return true };
        if head.index < self.first() || head.index > self.last() + 1 {
            return false;
        }
        let mut previous = self.term(head.index - 1).unwrap();
        for (offset, entry) in new.iter().enumerate() {
            if entry.index != head.index + offset as u64 || entry.term < previous {
                return false;
            }
            previous = entry.term;
        }
        self.entries.truncate((head.index - self.first()) as usize);
        self.entries.extend_from_slice(new);
        true
    }
    fn truncate(&mut self, from: u64) -> bool {
        if from < self.first() {
            return false;
        }
        self.entries
            .truncate(from.saturating_sub(self.first()) as usize);
        true
    }
    fn compact(&mut self, upto: u64) -> bool {
        if upto > self.last() {
            return false;
        }
        if upto > self.compacted.0 {
            let term = self.term(upto).unwrap();
            self.entries.drain(..(upto - self.compacted.0) as usize);
            self.compacted = (upto, term);
        }
        true
    }
    fn reset(&mut self, index: u64, term: u64) -> bool {
        if index < self.compacted.0 || term < self.compacted.1 {
            return false;
        }
        *self = Self {
            compacted: (index, term),
            entries: Vec::new(),
        };
        true
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// Append `count` entries of term `last term + bump` starting `back` before the end.
    Append {
        back: u64,
        count: u64,
        bump: u64,
    },
    Truncate {
        back: u64,
    },
    Compact {
        forward: u64,
    },
    Reset {
        ahead: u64,
        bump: u64,
    },
    Read {
        start: u64,
        len: u64,
        budget: u64,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..4u64, 0..6u64, 0..2u64).prop_map(|(back, count, bump)| Op::Append { back, count, bump }),
        2 => (0..5u64).prop_map(|back| Op::Truncate { back }),
        2 => (0..6u64).prop_map(|forward| Op::Compact { forward }),
        1 => (0..4u64, 0..2u64).prop_map(|(ahead, bump)| Op::Reset { ahead, bump }),
        3 => (0..12u64, 0..6u64, 0..300u64).prop_map(|(start, len, budget)| Op::Read { start, len, budget }),
        1 => Just(Op::Reopen),
    ]
}

/// Applies `ops` to the store and the model and compares them after every step.
fn check_against_model<H: Harness>(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut h = H::new();
    let mut model = Model::default();
    for op in ops {
        let s = h.store();
        let last_term = model.term(model.last()).unwrap();
        match *op {
            Op::Append { back, count, bump } => {
                let start = (model.last() + 1).saturating_sub(back);
                let new: Vec<LogEntry> = (start..start + count)
                    .map(|i| entry(i, last_term + bump))
                    .collect();
                prop_assert_eq!(s.append(&new).is_ok(), model.append(&new), "{:?}", op);
            }
            Op::Truncate { back } => {
                let from = (model.last() + 1).saturating_sub(back);
                prop_assert_eq!(
                    s.truncate_suffix(from).is_ok(),
                    model.truncate(from),
                    "{:?}",
                    op
                );
            }
            Op::Compact { forward } => {
                let upto = model.compacted.0 + forward;
                prop_assert_eq!(
                    s.compact_prefix(upto).is_ok(),
                    model.compact(upto),
                    "{:?}",
                    op
                );
            }
            Op::Reset { ahead, bump } => {
                let (index, term) = (model.last() + ahead, last_term + bump);
                prop_assert_eq!(
                    s.reset(index, term).is_ok(),
                    model.reset(index, term),
                    "{:?}",
                    op
                );
            }
            Op::Read { start, len, budget } => {
                let lo = model.compacted.0.saturating_sub(2) + start;
                let range = lo..lo + len;
                let valid = lo >= model.first() && lo + len <= model.last() + 1;
                match s.entries(range.clone(), budget) {
                    Ok(got) => {
                        prop_assert!(valid, "read {range:?} should fail");
                        let want: Vec<LogEntry> = model
                            .entries
                            .iter()
                            .filter(|e| range.contains(&e.index))
                            .cloned()
                            .collect();
                        prop_assert!(!got.is_empty() || want.is_empty());
                        prop_assert_eq!(&got[..], &want[..got.len()]);
                        let size: u64 = got.iter().map(LogEntry::size).sum();
                        prop_assert!(got.len() <= 1 || size <= budget);
                        if got.len() < want.len() {
                            prop_assert!(size + want[got.len()].size() > budget);
                        }
                    }
                    Err(_) => prop_assert!(!valid, "read {:?} failed", range),
                }
            }
            Op::Reopen => h.reopen(),
        }
        let s = h.store();
        prop_assert_eq!(
            (s.first_index(), s.last_index()),
            (model.first(), model.last())
        );
        for index in model.compacted.0..=model.last() {
            prop_assert_eq!(s.term(index).ok(), model.term(index));
        }
        prop_assert!(s.term(model.last() + 1).is_err());
        if model.compacted.0 > 0 {
            prop_assert!(s.term(model.compacted.0 - 1).is_err());
        }
        prop_assert_eq!(all(s), model.entries.clone());
    }
    Ok(())
}

proptest! {
    #[test]
    fn memory_store_matches_the_model(ops in prop::collection::vec(op(), 1..60)) {
        check_against_model::<Memory>(&ops)?;
    }
}

proptest! {
    // Each case opens a database and syncs every write: fewer, shorter cases.
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn fjall_store_matches_the_model(ops in prop::collection::vec(op(), 1..30)) {
        check_against_model::<Fjall>(&ops)?;
    }
}

#[test]
fn concurrent_writers_share_syncs() {
    let h = Fjall::new();
    let store = h.store();
    let (threads, saves) = (8u64, 40u64);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            scope.spawn(move || {
                for n in 0..saves {
                    let state = HardState {
                        term: 1,
                        vote: None,
                        commit: thread * saves + n + 1,
                    };
                    store.save_hard_state(&state).unwrap();
                }
            });
        }
    });
    let syncs = store.sync_count();
    assert!(syncs >= 1 && syncs <= threads * saves);
    // Every save waited for a sync, and a loaded machine still queues some of the
    // eight writers behind one another's sync.
    assert!(
        syncs < threads * saves,
        "{syncs} syncs for {} saves",
        threads * saves
    );
    assert_eq!(store.hard_state().term, 1);
}

/// Queues through `queue` and returns a receiver of the outcome `done` reports.
fn queued(
    queue: impl FnOnce(Box<dyn FnOnce(Result<(), StorageError>) + Send>) -> Result<(), StorageError>,
) -> std::sync::mpsc::Receiver<Result<(), StorageError>> {
    let (done, outcome) = std::sync::mpsc::sync_channel(1);
    queue(Box::new(move |result| {
        let _ = done.send(result);
    }))
    .unwrap();
    outcome
}

#[test]
fn compact_then_reports_a_durable_compaction() {
    let mut h = Fjall::new();
    h.store().append(&entries(1..11, 1)).unwrap();
    let store = h.store();
    let compacted = queued(|done| store.compact_then(4, done));
    let refused = queued(|done| store.compact_then(50, done));
    compacted.recv().unwrap().unwrap();
    assert!(matches!(
        refused.recv().unwrap(),
        Err(StorageError::Unavailable { index: 50, .. })
    ));
    assert_eq!(store.first_index(), 5);
    h.reopen();
    assert_eq!((h.store().first_index(), h.store().last_index()), (5, 10));
    assert_eq!(h.store().term(4).unwrap(), 1);
}

#[test]
fn reset_then_is_ordered_before_a_save_queued_after_it() {
    let mut h = Fjall::new();
    h.store().append(&entries(1..6, 1)).unwrap();
    let store = h.store();
    let state = HardState {
        term: 3,
        vote: Some(2),
        commit: 20,
    };
    let reset = queued(|done| store.reset_then(20, 3, done));
    // Entries 21.. only fit the log as the reset leaves it.
    let saved = queued(|done| store.save_then(Some(state), entries(21..23, 3), done));
    reset.recv().unwrap().unwrap();
    saved.recv().unwrap().unwrap();
    h.reopen();
    let store = h.store();
    assert_eq!((store.first_index(), store.last_index()), (21, 22));
    assert_eq!(store.term(20).unwrap(), 3);
    assert_eq!(store.entries(21..23, u64::MAX).unwrap(), entries(21..23, 3));
    assert_eq!(store.hard_state(), state);
}
