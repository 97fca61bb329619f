// Kythira patch: tells a torn tail from damage inside the journal.
//
// A journal is a sequence of batches, each written whole and synced before the
// next one is written. When the reader stops before the end of the file (an
// undecodable record, a batch whose checksum or item count does not match),
// the question is whether what follows was ever acknowledged. Only the last
// batch can be torn by a crash: if a complete, checksum-valid batch begins
// anywhere after the point where reading stopped, the stop is damage to synced
// data and recovery must fail rather than truncate the journal there.
//
// The search reads the rest of the file; runs of zeros (the preallocated,
// never written part of an active journal) are skipped without decoding, so
// the usual end of a journal costs one sequential read of its free space.

use super::entry::Tag;
use crate::file::MAGIC_BYTES;
use std::{
    fs::File,
    hash::Hasher,
    io::{Read, Seek, SeekFrom},
    path::Path,
};

/// Bytes of a start marker: tag, item count (u32), seqno (u64).
const START_LEN: usize = 1 + 4 + 8;
/// Bytes of an item header before its key and value: tag, value type,
/// compression, keyspace id (u64), key length (u16), value length (u32),
/// stored value length (u32).
const ITEM_HEADER_LEN: usize = 1 + 1 + 1 + 8 + 2 + 4 + 4;
/// Bytes of a clear marker: tag, keyspace id (u64).
const CLEAR_LEN: usize = 1 + 8;
/// Bytes of an end marker: tag, checksum (u64), magic.
const END_LEN: usize = 1 + 8 + MAGIC_BYTES.len();

fn u16_at(buf: &[u8], at: usize) -> Option<usize> {
    Some(usize::from(u16::from_le_bytes(buf.get(at..at + 2)?.try_into().ok()?)))
}

fn u32_at(buf: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?)).ok()
}

fn u64_at(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

/// The length of the complete, checksum-valid batch at the start of `buf`, if
/// there is one. Every length is checked against `buf` before use, so garbage
/// never causes an allocation.
pub fn valid_batch_len(buf: &[u8]) -> Option<usize> {
    if buf.first() != Some(&(Tag::Start as u8)) {
        return None;
    }
    let item_count = u32_at(buf, 1)?;
    // Each item takes at least a clear marker's bytes.
    if item_count == 0 || item_count > buf.len() / CLEAR_LEN {
        return None;
    }
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut pos = START_LEN;
    for _ in 0..item_count {
        let len = match *buf.get(pos)? {
            t if t == Tag::Item as u8 => {
                let key_len = u16_at(buf, pos + 11)?;
                let stored_len = u32_at(buf, pos + 17)?;
                ITEM_HEADER_LEN
                    .checked_add(key_len)?
                    .checked_add(stored_len)?
            }
            t if t == Tag::Clear as u8 => CLEAR_LEN,
            _ => return None,
        };
        hasher.update(buf.get(pos..pos.checked_add(len)?)?);
        pos += len;
    }
    if *buf.get(pos)? != Tag::End as u8 {
        return None;
    }
    let checksum = u64_at(buf, pos + 1)?;
    if buf.get(pos + 9..pos + END_LEN)? != MAGIC_BYTES || checksum != hasher.finish() {
        return None;
    }
    Some(pos + END_LEN)
}

/// The offset of the first complete, valid batch in `path` at or after
/// `from` whose sequence number is above `newer_than`, if any.
pub fn find_valid_batch(
    path: &Path,
    from: u64,
    newer_than: Option<u64>,
) -> std::io::Result<Option<u64>> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    if from >= len {
        return Ok(None);
    }
    file.seek(SeekFrom::Start(from))?;
    // Skip the zeros first: an active journal ends in its preallocated space.
    let mut chunk = vec![0u8; 1 << 20];
    let zeros = vec![0u8; chunk.len()];
    let mut first_data = None;
    let mut at = from;
    while at < len {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        if chunk[..n] != zeros[..n] {
            let skip = chunk[..n].iter().position(|b| *b != 0).unwrap_or(0);
            first_data = Some(at + skip as u64);
            break;
        }
        at += n as u64;
    }
    let Some(start) = first_data else {
        return Ok(None);
    };
    // Something other than zeros follows: read it and look for a batch at
    // every offset where a start marker could begin.
    file.seek(SeekFrom::Start(start))?;
    let mut rest = Vec::new();
    file.read_to_end(&mut rest)?;
    Ok(rest
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == Tag::Start as u8)
        .find(|(i, _)| {
            let newer = u64_at(&rest[*i..], 5).is_some_and(|seqno| newer_than.is_none_or(|n| seqno > n));
            newer && valid_batch_len(&rest[*i..]).is_some()
        })
        .map(|(i, _)| start + i as u64))
}

/// Bytes a disk writes at once: a lost write loses whole sectors.
const SECTOR: u64 = 512;

/// Whether reading that stopped at `at`, after the last intact batch ending
/// at `start`, looks like a write cut short by a crash. A journal is written
/// once, into zeros (preallocated) or past its end, so a lost write leaves
/// zeros or the end of the file: an all-zero sector inside the failed part,
/// the file ending in the sector where reading stopped, or (where an entry
/// could not be decoded, `whole_entries` false) zeros from there to the end
/// of that sector. Anything else is damage.
pub fn torn(path: &Path, start: u64, at: u64, whole_entries: bool) -> std::io::Result<bool> {
    let mut file = File::open(path)?;
    let len = file.metadata()?.len();
    let sector_end = (at / SECTOR + 1) * SECTOR;
    if !whole_entries && len <= sector_end {
        return Ok(true);
    }
    let first = start / SECTOR * SECTOR;
    let last = sector_end.min(len);
    file.seek(SeekFrom::Start(first))?;
    let mut buf = vec![0u8; usize::try_from(last - first).unwrap_or(usize::MAX)];
    file.read_exact(&mut buf)?;
    // Whole sectors inside the failed part: after the intact batches, and
    // before the stop point when whole entries were decoded.
    let limit = if whole_entries { at } else { sector_end };
    let zero_sector = buf
        .chunks(SECTOR as usize)
        .enumerate()
        .map(|(i, chunk)| (first + i as u64 * SECTOR, chunk))
        .any(|(offset, chunk)| {
            offset >= start
                && offset + SECTOR <= limit
                && chunk.len() == SECTOR as usize
                && chunk.iter().all(|b| *b == 0)
        });
    let zeros_from_stop = !whole_entries
        && buf[usize::try_from(at - first).unwrap_or(usize::MAX).min(buf.len())..]
            .iter()
            .all(|b| *b == 0);
    Ok(zero_sector || zeros_from_stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::entry::Entry;
    use lsm_tree::{CompressionType, ValueType};

    fn batch(seqno: u64, values: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        Entry::Start {
            item_count: values.len() as u32,
            seqno,
        }
        .encode_into(&mut out)
        .unwrap();
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for v in values {
            let mut item = Vec::new();
            Entry::Item {
                keyspace_id: 1,
                key: b"key".to_vec().into(),
                value: v.to_vec().into(),
                value_type: ValueType::Value,
                compression: CompressionType::None,
            }
            .encode_into(&mut item)
            .unwrap();
            hasher.update(&item);
            out.extend(item);
        }
        Entry::End(hasher.finish()).encode_into(&mut out).unwrap();
        out
    }

    #[test]
    fn a_written_batch_is_recognised_whole() {
        let b = batch(7, &[b"one", b"two"]);
        assert_eq!(valid_batch_len(&b), Some(b.len()));
        let mut longer = b.clone();
        longer.extend([0; 100]);
        assert_eq!(valid_batch_len(&longer), Some(b.len()));
    }

    #[test]
    fn damage_anywhere_in_a_batch_makes_it_invalid() {
        let b = batch(7, &[b"one", b"two"]);
        // The start marker's seqno (bytes 5..13) is outside fjall's batch
        // checksum: a limit of the format.
        for i in (0..b.len()).filter(|i| !(5..13).contains(i)) {
            let mut damaged = b.clone();
            damaged[i] ^= 0x40;
            assert_eq!(valid_batch_len(&damaged), None, "byte {i}");
        }
        assert_eq!(valid_batch_len(&b[..b.len() - 1]), None);
    }

    #[test]
    fn a_huge_length_in_garbage_is_not_followed() {
        let mut b = batch(7, &[b"one"]);
        // The stored value length of the item.
        b[START_LEN + 17..START_LEN + 21].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(valid_batch_len(&b), None);
    }

    #[test]
    fn the_search_skips_zeros_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("1.jnl");
        let mut data = vec![1u8, 0, 0, 0, 9, 9];
        data.extend([0; 3 << 20]);
        std::fs::write(&path, &data).unwrap();
        assert_eq!(find_valid_batch(&path, 0, None).unwrap(), None);
        let at = data.len() as u64;
        data.extend(batch(3, &[b"later"]));
        std::fs::write(&path, &data).unwrap();
        assert_eq!(find_valid_batch(&path, 1, None).unwrap(), Some(at));
        assert_eq!(find_valid_batch(&path, 1, Some(3)).unwrap(), None, "not newer");
    }
}
