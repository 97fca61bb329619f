//! Byte layouts of what goes into the key/value store, each with a CRC-32C.
//!
//! Keys of the log keyspace are big-endian indexes so that key order is index order.
//! An entry's value is `crc32c | term | payload`, where the checksum covers the
//! index as well, so an entry stored under the wrong key is caught too.

use crate::{EntryDefect, HardState, LogEntry};
use bytes::Bytes;

const CRC_LEN: usize = 4;
const ENTRY_HEADER_LEN: usize = CRC_LEN + 8;

/// Key of the log entry at `index`.
pub fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Index encoded in a log key, if the key has the right length.
pub fn decode_log_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Checksum of an entry: over its index, then the stored bytes after the checksum
/// (term and payload).
fn entry_crc(index: u64, term_and_payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&index.to_be_bytes()), term_and_payload)
}

/// Stored value of `entry`.
pub fn encode_entry(entry: &LogEntry) -> Vec<u8> {
    let mut value = vec![0; CRC_LEN];
    value.reserve(8 + entry.payload.len());
    value.extend_from_slice(&entry.term.to_be_bytes());
    value.extend_from_slice(&entry.payload);
    let crc = entry_crc(entry.index, &value[CRC_LEN..]);
    value[..CRC_LEN].copy_from_slice(&crc.to_be_bytes());
    value
}

/// Decodes and verifies the value stored under `index`.
pub fn decode_entry(index: u64, value: &[u8]) -> Result<LogEntry, EntryDefect> {
    let (term, payload) = verify_entry(index, value)?;
    Ok(LogEntry::new(index, term, Bytes::copy_from_slice(payload)))
}

/// Verifies the value stored under `index`; returns its term and payload.
pub fn verify_entry(index: u64, value: &[u8]) -> Result<(u64, &[u8]), EntryDefect> {
    let (Some(crc), Some(term), Some(payload)) = (
        value.get(..CRC_LEN),
        value.get(CRC_LEN..ENTRY_HEADER_LEN),
        value.get(ENTRY_HEADER_LEN..),
    ) else {
        return Err(EntryDefect::Truncated { len: value.len() });
    };
    let stored = u32::from_be_bytes(crc.try_into().expect("slice of CRC_LEN bytes"));
    let term = u64::from_be_bytes(term.try_into().expect("slice of 8 bytes"));
    let computed = entry_crc(index, &value[CRC_LEN..]);
    if stored != computed {
        return Err(EntryDefect::ChecksumMismatch { stored, computed });
    }
    Ok((term, payload))
}

/// Fixed-size little records with a leading CRC-32C over the rest.
fn seal(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(CRC_LEN + body.len());
    out.extend_from_slice(&crc32c::crc32c(body).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn unseal<const N: usize>(value: &[u8]) -> Result<[u8; N], String> {
    if value.len() != CRC_LEN + N {
        return Err(format!(
            "expected {} bytes, found {}",
            CRC_LEN + N,
            value.len()
        ));
    }
    let (crc, body) = value.split_at(CRC_LEN);
    let stored = u32::from_be_bytes(crc.try_into().expect("slice of CRC_LEN bytes"));
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    Ok(body.try_into().expect("length checked above"))
}

fn u64_at(body: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(body[at..at + 8].try_into().expect("slice of 8 bytes"))
}

/// Durable bounds of the log: everything up to `compacted_index` is gone (its last
/// term kept), entries `compacted_index + 1 ..= last_index` must all be present.
///
/// It is written in the same atomic batch as every change to the log, so it is the
/// "synced up to" watermark: after recovery, a missing or damaged entry inside these
/// bounds is corruption, while a torn unsynced tail never shows up at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogBounds {
    pub compacted_index: u64,
    pub compacted_term: u64,
    pub last_index: u64,
}

pub fn encode_bounds(bounds: &LogBounds) -> Vec<u8> {
    let mut body = [0u8; 24];
    body[..8].copy_from_slice(&bounds.compacted_index.to_be_bytes());
    body[8..16].copy_from_slice(&bounds.compacted_term.to_be_bytes());
    body[16..].copy_from_slice(&bounds.last_index.to_be_bytes());
    seal(&body)
}

pub fn decode_bounds(value: &[u8]) -> Result<LogBounds, String> {
    let body = unseal::<24>(value)?;
    let bounds = LogBounds {
        compacted_index: u64_at(&body, 0),
        compacted_term: u64_at(&body, 8),
        last_index: u64_at(&body, 16),
    };
    if bounds.last_index < bounds.compacted_index {
        return Err(format!(
            "last index {} is below the compacted index {}",
            bounds.last_index, bounds.compacted_index
        ));
    }
    Ok(bounds)
}

pub fn encode_hard_state(state: &HardState) -> Vec<u8> {
    let mut body = [0u8; 25];
    body[..8].copy_from_slice(&state.term.to_be_bytes());
    body[8] = u8::from(state.vote.is_some());
    body[9..17].copy_from_slice(&state.vote.unwrap_or(0).to_be_bytes());
    body[17..].copy_from_slice(&state.commit.to_be_bytes());
    seal(&body)
}

pub fn decode_hard_state(value: &[u8]) -> Result<HardState, String> {
    let body = unseal::<25>(value)?;
    let vote = match body[8] {
        0 => None,
        1 => Some(u64_at(&body, 9)),
        flag => return Err(format!("invalid vote flag {flag}")),
    };
    Ok(HardState {
        term: u64_at(&body, 0),
        vote,
        commit: u64_at(&body, 17),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_detects_every_flipped_bit() {
        let entry = LogEntry::new(7, 3, &b"payload"[..]);
        let value = encode_entry(&entry);
        assert_eq!(decode_entry(7, &value), Ok(entry));
        for byte in 0..value.len() {
            for bit in 0..8 {
                let mut damaged = value.clone();
                damaged[byte] ^= 1 << bit;
                assert!(decode_entry(7, &damaged).is_err(), "byte {byte} bit {bit}");
            }
        }
        assert!(matches!(
            decode_entry(8, &value),
            Err(EntryDefect::ChecksumMismatch { .. })
        ));
        assert_eq!(
            decode_entry(7, &value[..5]),
            Err(EntryDefect::Truncated { len: 5 })
        );
    }

    #[test]
    fn records_round_trip_and_reject_damage() {
        let state = HardState {
            term: 9,
            vote: Some(2),
            commit: 40,
        };
        let value = encode_hard_state(&state);
        assert_eq!(decode_hard_state(&value), Ok(state));
        let mut damaged = value.clone();
        damaged[10] ^= 0x40;
        assert!(decode_hard_state(&damaged).is_err());

        let bounds = LogBounds {
            compacted_index: 5,
            compacted_term: 2,
            last_index: 90,
        };
        let value = encode_bounds(&bounds);
        assert_eq!(decode_bounds(&value), Ok(bounds));
        assert!(decode_bounds(&value[1..]).is_err());
    }

    #[test]
    fn log_keys_sort_by_index() {
        assert!(log_key(255) < log_key(256));
        assert_eq!(decode_log_key(&log_key(u64::MAX)), Some(u64::MAX));
        assert_eq!(decode_log_key(b"short"), None);
    }
}
