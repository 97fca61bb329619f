// Copyright (c) 2024-present, fjall-rs
// This source code is licensed under both the Apache 2.0 and MIT License
// (found in the LICENSE-* files in the repository)

use super::entry::Entry;
use std::{
    fs::{File, OpenOptions},
    io::{BufReader, Read, Seek},
    path::{Path, PathBuf},
};

/// Reads and emits through the entries in a journal file, but doesn't
/// check the validity of batches
///
/// Kythira patch: the reader keeps the bytes of the last entry it decoded, so
/// a batch's checksum is computed over exactly what was written (not over a
/// re-encoding, which for compressed values depends on the compressor giving
/// the same bytes again), and it no longer truncates the file where decoding
/// stops: the batch reader decides whether that is a torn tail or damage.
#[expect(clippy::module_name_repetitions)]
pub struct JournalReader {
    pub(crate) path: PathBuf,
    pub(crate) reader: BufReader<File>,
    pub(crate) last_valid_pos: u64,
    /// The encoded bytes of the entry last returned.
    pub(crate) last_raw: Vec<u8>,
    /// Whether the stream ended because the file did, in the middle of an
    /// entry or at its end.
    pub(crate) hit_end: bool,
}

/// Copies what it reads into a buffer.
struct Tee<'a> {
    inner: &'a mut BufReader<File>,
    copy: &'a mut Vec<u8>,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
}

impl JournalReader {
    pub fn new<P: AsRef<Path>>(path: P) -> crate::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;

        Ok(Self {
            path: path.as_ref().into(),
            reader: BufReader::new(file),
            last_valid_pos: 0,
            last_raw: Vec::new(),
            hit_end: false,
        })
    }
}

impl Iterator for JournalReader {
    type Item = crate::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.last_raw.clear();
        let mut tee = Tee {
            inner: &mut self.reader,
            copy: &mut self.last_raw,
        };
        match Entry::decode_from(&mut tee) {
            Ok(item) => {
                self.last_valid_pos = fail_iter!(self.reader.stream_position());
                Some(Ok(item))
            }
            Err(crate::Error::Io(e))
                if !matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::Other
                ) =>
            {
                Some(Err(crate::Error::Io(e)))
            }
            // Cut short by the end of the file.
            Err(crate::Error::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.hit_end = true;
                None
            }
            // Undecodable: the stream of entries ends here.
            Err(_) => None,
        }
    }
}
