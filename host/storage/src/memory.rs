//! A log and hard-state store in memory: for tests and simulations. Not durable.

use crate::{
    HardState, HardStateStore, LogEntry, LogStore, RaftStorage, Result,
    shape::LogShape,
    traits::{check_hard_state, within_budget},
    types::check_sizes,
};
use std::{collections::VecDeque, ops::Range, sync::Mutex};

#[derive(Default)]
struct State {
    shape: LogShape,
    /// Entries `shape.first_index() ..= shape.last_index()`, in order.
    entries: VecDeque<LogEntry>,
    hard_state: HardState,
}

impl State {
    fn slot(&self, index: u64) -> usize {
        usize::try_from(index - self.shape.first_index()).expect("log fits in memory")
    }

    fn append(&mut self, entries: &[LogEntry]) {
        if let Some(first) = entries.first() {
            let keep = self.slot(first.index);
            self.entries.truncate(keep);
            self.entries.extend(entries.iter().cloned());
            self.shape.append(entries);
        }
    }
}

/// In-memory [`RaftStorage`] with the same validation and semantics as the
/// durable store, minus durability.
#[derive(Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as it was before the
        // failed call: every mutation validates first and then cannot fail.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl LogStore for MemoryStore {
    fn first_index(&self) -> u64 {
        self.lock().shape.first_index()
    }

    fn last_index(&self) -> u64 {
        self.lock().shape.last_index()
    }

    fn term(&self, index: u64) -> Result<u64> {
        self.lock().shape.term(index)
    }

    fn entry(&self, index: u64) -> Result<LogEntry> {
        let state = self.lock();
        state.shape.check_range(index, index.saturating_add(1))?;
        Ok(state.entries[state.slot(index)].clone())
    }

    fn entries(&self, range: Range<u64>, max_bytes: u64) -> Result<Vec<LogEntry>> {
        let state = self.lock();
        state.shape.check_range(range.start, range.end)?;
        if range.is_empty() {
            return Ok(Vec::new());
        }
        let slots = state.slot(range.start)..state.slot(range.end);
        within_budget(state.entries.range(slots).cloned().map(Ok), max_bytes)
    }

    fn append(&self, entries: &[LogEntry]) -> Result<()> {
        check_sizes(entries)?;
        let mut state = self.lock();
        state.shape.check_append(entries)?;
        state.append(entries);
        Ok(())
    }

    fn truncate_suffix(&self, from: u64) -> Result<()> {
        let mut state = self.lock();
        state.shape.check_truncate(from)?;
        if from <= state.shape.last_index() {
            let keep = state.slot(from);
            state.entries.truncate(keep);
        }
        state.shape.truncate(from);
        Ok(())
    }

    fn compact_prefix(&self, upto: u64) -> Result<()> {
        let mut state = self.lock();
        state.shape.check_compact(upto)?;
        if upto >= state.shape.first_index() {
            let drop = state.slot(upto + 1);
            state.entries.drain(..drop);
        }
        state.shape.compact(upto);
        Ok(())
    }

    fn reset(&self, index: u64, term: u64) -> Result<()> {
        let mut state = self.lock();
        state.shape.check_reset(index, term)?;
        state.entries.clear();
        state.shape.reset(index, term);
        Ok(())
    }
}

impl HardStateStore for MemoryStore {
    fn hard_state(&self) -> HardState {
        self.lock().hard_state
    }

    fn save_hard_state(&self, state: &HardState) -> Result<()> {
        let mut current = self.lock();
        check_hard_state(&current.hard_state, state)?;
        current.hard_state = *state;
        Ok(())
    }
}

impl RaftStorage for MemoryStore {
    fn save(&self, hard_state: Option<&HardState>, entries: &[LogEntry]) -> Result<()> {
        check_sizes(entries)?;
        let mut state = self.lock();
        if let Some(next) = hard_state {
            check_hard_state(&state.hard_state, next)?;
        }
        state.shape.check_append(entries)?;
        if let Some(next) = hard_state {
            state.hard_state = *next;
        }
        state.append(entries);
        Ok(())
    }
}
