// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use super::{reader::JournalReader, tail};
use crate::{journal::entry::Entry, keyspace::InternalKeyspaceId};
use lsm_tree::{SeqNo, UserKey, UserValue, ValueType};
use std::{fs::OpenOptions, hash::Hasher};

#[derive(Debug)]
pub struct ReadBatchItem {
    pub keyspace_id: InternalKeyspaceId,
    pub key: UserKey,
    pub value: UserValue,
    pub value_type: ValueType,
}

#[derive(Debug)]
pub struct Batch {
    pub(crate) seqno: SeqNo,
    pub(crate) items: Vec<ReadBatchItem>,
    pub(crate) cleared_keyspaces: Vec<InternalKeyspaceId>,
}

/// Reads whole batches from a journal.
///
/// Kythira patch: where reading stops before the end of the file (an
/// undecodable entry, a batch cut short, a checksum or item count that does
/// not match), the rest of the file is searched for a complete, valid batch
/// (see `tail`). If one exists, what stopped the reader is damage to data
/// that was synced, and recovery fails with the file and offset; it used to
/// truncate the journal there, silently dropping every later batch. If none
/// exists, the stop is a torn tail: an incomplete or damaged final batch in
/// the active journal was never acknowledged and is dropped (a checksum
/// mismatch there used to fail every open). A sealed journal was synced
/// whole before the next one was created, so a damaged batch in it is always
/// corruption.
#[expect(clippy::module_name_repetitions)]
pub struct JournalBatchReader {
    reader: JournalReader,
    items: Vec<ReadBatchItem>,
    cleared_keyspaces: Vec<InternalKeyspaceId>,
    is_in_batch: bool,
    batch_counter: u32,
    batch_seqno: SeqNo,
    /// Where the last complete batch ends.
    last_valid_pos: u64,
    checksum_builder: xxhash_rust::xxh3::Xxh3,
    sealed: bool,
    done: bool,
    /// The sequence number of the last complete batch.
    last_seqno: Option<SeqNo>,
}

impl JournalBatchReader {
    pub fn new(reader: JournalReader) -> Self {
        Self {
            reader,
            items: Vec::with_capacity(10),
            cleared_keyspaces: Vec::new(),
            checksum_builder: xxhash_rust::xxh3::Xxh3::new(),
            is_in_batch: false,
            batch_seqno: 0,
            last_valid_pos: 0,
            batch_counter: 0,
            sealed: false,
            done: false,
            last_seqno: None,
        }
    }

    /// Reads a sealed journal: one that was synced whole before a newer one
    /// was created.
    pub fn sealed(mut self) -> Self {
        self.sealed = true;
        self
    }

    fn truncate_to(&self, last_valid_pos: u64) -> crate::Result<()> {
        log::trace!("Truncating journal to {last_valid_pos}");

        let file = OpenOptions::new().write(true).open(&self.reader.path)?;
        file.set_len(last_valid_pos)?;
        file.sync_all()?;

        Ok(())
    }

    /// Reading stopped after the last complete batch: at the reader's
    /// position, an entry could not be decoded (`Stop::Undecodable`), or a
    /// whole entry did not fit its batch (`Stop::Invalid`), for `reason`.
    fn stop(&mut self, how: Stop, reason: &'static str) -> crate::Result<()> {
        self.done = true;
        let path = self.reader.path.clone();
        // Where the last intact batch ends, and where reading stopped.
        let start = self.last_valid_pos;
        let at = self.reader.last_valid_pos.max(start);
        let clean = matches!(how, Stop::Undecodable) && !self.is_in_batch && at == start;
        let corrupt = |later| crate::Error::JournalCorrupt {
            path: path.clone(),
            offset: start,
            reason,
            later_batch_at: later,
        };
        // An intact, newer batch after the stop means synced data was damaged.
        // The search skips what was decoded: a value may hold bytes that
        // look like a batch.
        let from = if clean { start } else { at.max(start + 1) };
        if let Some(later) = tail::find_valid_batch(&path, from, self.last_seqno)? {
            log::error!(
                "Journal {} is damaged at offset {start}: {reason}, and a valid batch follows at {later}",
                path.display(),
            );
            return Err(corrupt(Some(later)));
        }
        let len = std::fs::metadata(&path)?.len();
        // A sealed journal was synced whole and truncated to its data when
        // it was sealed: it ends where its last batch does.
        if self.sealed && (!clean || at < len) {
            log::error!(
                "Sealed journal {} is damaged at offset {start}: {reason}",
                path.display(),
            );
            return Err(corrupt(None));
        }
        // In the active journal only a write cut short by a crash may be
        // dropped, and a lost write leaves sectors as they were: zeros, or
        // the end of the file (as etcd's WAL decides a torn record).
        let cut_short = matches!(how, Stop::Undecodable) && self.reader.hit_end;
        if !cut_short && !tail::torn(&path, start, at, matches!(how, Stop::Invalid))? {
            log::error!(
                "Journal {} is damaged at offset {start}: {reason}, and it is not a torn write",
                path.display(),
            );
            return Err(corrupt(None));
        }
        if !clean {
            log::warn!(
                "Dropping the torn final batch of journal {} at offset {start} ({reason}): it was \
                 never acknowledged",
                path.display(),
            );
        }
        if len > start {
            self.truncate_to(start)?;
        }
        Ok(())
    }
}

/// How reading stopped.
#[derive(Clone, Copy)]
enum Stop {
    /// The entry at the reader's position could not be decoded, or the file
    /// ended.
    Undecodable,
    /// A whole entry was decoded but does not fit its batch.
    Invalid,
}

impl Iterator for JournalBatchReader {
    type Item = crate::Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }

        loop {
            let Some(item) = self.reader.next() else {
                fail_iter!(self.stop(Stop::Undecodable, "undecodable or cut short"));
                return None;
            };
            let item = match item {
                Ok(item) => item,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };

            let journal_file_pos = self.reader.last_valid_pos;

            match item {
                Entry::Start { item_count, seqno } => {
                    if self.is_in_batch {
                        fail_iter!(self.stop(Stop::Invalid, "batch start inside a batch"));
                        return None;
                    }

                    self.is_in_batch = true;
                    self.batch_counter = item_count;
                    self.batch_seqno = seqno;
                    self.checksum_builder = xxhash_rust::xxh3::Xxh3::new();
                }
                Entry::End(expected_checksum) => {
                    if !self.is_in_batch {
                        fail_iter!(self.stop(Stop::Invalid, "end marker without a start marker"));
                        return None;
                    }

                    if self.batch_counter > 0 {
                        fail_iter!(self.stop(Stop::Invalid, "fewer items than the batch announced"));
                        return None;
                    }

                    let got_checksum = self.checksum_builder.finish();

                    if got_checksum != expected_checksum {
                        fail_iter!(self.stop(Stop::Invalid, "batch checksum mismatch"));
                        return None;
                    }

                    // Kythira patch: the seqno is outside the checksum; a
                    // damaged one must not reorder or hide a batch.
                    if self.last_seqno.is_some_and(|last| self.batch_seqno <= last) {
                        fail_iter!(self.stop(Stop::Invalid, "batch sequence number does not increase"));
                        return None;
                    }
                    self.last_seqno = Some(self.batch_seqno);

                    // Reset all variables
                    self.is_in_batch = false;
                    self.batch_counter = 0;

                    self.last_valid_pos = journal_file_pos;

                    let items = std::mem::take(&mut self.items);
                    let cleared_keyspaces = std::mem::take(&mut self.cleared_keyspaces);
                    return Some(Ok(Batch {
                        seqno: self.batch_seqno,
                        items,
                        cleared_keyspaces,
                    }));
                }
                Entry::Item {
                    keyspace_id,
                    key,
                    value,
                    value_type,
                    ..
                } => {
                    if !self.is_in_batch {
                        fail_iter!(self.stop(Stop::Invalid, "item without a start marker"));
                        return None;
                    }

                    if self.batch_counter == 0 {
                        fail_iter!(self.stop(Stop::Invalid, "more items than the batch announced"));
                        return None;
                    }

                    // The bytes as written: the writer hashed its encoding.
                    self.checksum_builder.update(&self.reader.last_raw);
                    self.batch_counter -= 1;

                    self.items.push(ReadBatchItem {
                        keyspace_id,
                        key,
                        value,
                        value_type,
                    });
                }
                Entry::Clear { keyspace_id } => {
                    if !self.is_in_batch {
                        fail_iter!(self.stop(Stop::Invalid, "clear marker without a start marker"));
                        return None;
                    }

                    if self.batch_counter == 0 {
                        fail_iter!(self.stop(Stop::Invalid, "more items than the batch announced"));
                        return None;
                    }

                    self.checksum_builder.update(&self.reader.last_raw);
                    self.batch_counter -= 1;

                    self.cleared_keyspaces.push(keyspace_id);
                }
            }
        }
    }
}
