//! Length-prefixed, versioned frames on a byte stream.
//!
//! A frame is a 5-byte header, then `len` bytes of payload:
//!
//! ```text
//! +----------------+---------+-------------------+
//! | len: u32 (BE)  | version | payload (len B)   |
//! +----------------+---------+-------------------+
//! ```
//!
//! `len` counts the payload only. The version is [`VERSION`]; a reader refuses
//! any other before looking at the length, because another version may frame
//! differently. Every reader has a maximum payload size and refuses a larger
//! header before allocating anything; the payload buffer grows as bytes
//! arrive, so a peer that announces a large frame and stalls holds little
//! memory. A stream that ends between frames is a clean end (`None`); one
//! that ends inside a frame is [`FrameError::Truncated`].
//!
//! The header logic ([`encode_header`], [`parse_header`]) is pure; the async
//! functions only move bytes, over any tokio stream (quinn's streams, or a
//! byte slice in tests).

use std::io;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The frame format version this code speaks. 2: vote requests carry the
/// leadership-transfer flag; `TimeoutNow`, forwarded reads and
/// configuration entries exist. 3: the client protocol has membership,
/// transfer and lease reads (its enums gained variants in the middle, which
/// an older peer would misread rather than refuse).
pub const VERSION: u8 = 3;
/// Bytes of the header.
pub const HEADER_LEN: usize = 5;
/// Default maximum payload: large enough for a big append batch, small enough
/// that a hostile length costs little.
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;
/// Largest step by which a payload buffer grows while it is read.
const READ_CHUNK: usize = 64 << 10;

/// Errors of reading or writing frames.
#[derive(Clone, Debug, thiserror::Error)]
pub enum FrameError {
    /// The payload exceeds the maximum.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Announced (or attempted) payload length.
        len: usize,
        /// The maximum in force.
        max: usize,
    },
    /// The header's version byte is not [`VERSION`].
    #[error("unsupported frame version {version} (expected {VERSION})")]
    UnsupportedVersion {
        /// The version found.
        version: u8,
    },
    /// The stream ended inside a header or payload.
    #[error("stream ended inside a frame: got {got} of {expected} bytes")]
    Truncated {
        /// Bytes the header or payload needed.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The stream failed.
    #[error("stream error: {0}")]
    Io(Arc<io::Error>),
}

impl From<io::Error> for FrameError {
    fn from(e: io::Error) -> Self {
        FrameError::Io(Arc::new(e))
    }
}

/// The header of a payload of `len` bytes.
pub fn encode_header(len: usize, max: usize) -> Result<[u8; HEADER_LEN], FrameError> {
    let wire_len = u32::try_from(len).map_err(|_| FrameError::TooLarge {
        len,
        max: max.min(u32::MAX as usize),
    })?;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(&wire_len.to_be_bytes());
    header[4] = VERSION;
    Ok(header)
}

/// The payload length a header announces, if acceptable.
pub fn parse_header(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    if header[4] != VERSION {
        return Err(FrameError::UnsupportedVersion { version: header[4] });
    }
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Appends one frame to `out`, so that a writer can batch several frames into
/// one stream write.
pub fn encode_frame(payload: &[u8], max: usize, out: &mut BytesMut) -> Result<(), FrameError> {
    let header = encode_header(payload.len(), max)?;
    out.reserve(HEADER_LEN + payload.len());
    out.put_slice(&header);
    out.put_slice(payload);
    Ok(())
}

/// Starts a frame in place at the end of `out`: reserves the header and
/// returns where it starts. Encode the payload straight after it, then call
/// [`end_frame`]; this saves copying each payload into a frame.
pub fn begin_frame(out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    start
}

/// Completes the frame [`begin_frame`] started at `start`. A payload over
/// `max` is removed again, leaving `out` as it was before `begin_frame`.
pub fn end_frame(out: &mut Vec<u8>, start: usize, max: usize) -> Result<(), FrameError> {
    let len = out.len() - start - HEADER_LEN;
    match encode_header(len, max) {
        Ok(header) => {
            out[start..start + HEADER_LEN].copy_from_slice(&header);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Writes one frame. Refuses a payload over `max`, so that the sender fails
/// instead of the receiver closing the connection.
pub async fn write_frame<W>(writer: &mut W, payload: &[u8], max: usize) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let header = encode_header(payload.len(), max)?;
    writer.write_all(&header).await?;
    writer.write_all(payload).await?;
    Ok(())
}

/// Reads one frame: `Ok(None)` at a clean end of stream.
pub async fn read_frame<R>(reader: &mut R, max: usize) -> Result<Option<Bytes>, FrameError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                expected: HEADER_LEN,
                got,
            });
        }
        got += n;
    }
    let len = parse_header(header, max)?;
    let mut payload = BytesMut::with_capacity(len.min(READ_CHUNK));
    while payload.len() < len {
        let remaining = len - payload.len();
        if payload.capacity() == payload.len() {
            payload.reserve(remaining.min(READ_CHUNK));
        }
        let n = (&mut *reader)
            .take(remaining as u64)
            .read_buf(&mut payload)
            .await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                expected: len,
                got: payload.len(),
            });
        }
    }
    Ok(Some(payload.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read_all(mut input: &[u8], max: usize) -> Result<Vec<Bytes>, FrameError> {
        let mut frames = Vec::new();
        while let Some(frame) = read_frame(&mut input, max).await? {
            frames.push(frame);
        }
        Ok(frames)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(payload, DEFAULT_MAX_FRAME, &mut out).unwrap();
        out.to_vec()
    }

    #[tokio::test]
    async fn frames_roundtrip_including_empty_ones() {
        let mut out: Vec<u8> = Vec::new();
        for payload in [&b""[..], b"a", &[7u8; 100_000]] {
            write_frame(&mut out, payload, DEFAULT_MAX_FRAME)
                .await
                .unwrap();
        }
        let frames = read_all(&out, DEFAULT_MAX_FRAME).await.unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"");
        assert_eq!(&frames[1][..], b"a");
        assert_eq!(&frames[2][..], &[7u8; 100_000][..]);
    }

    #[tokio::test]
    async fn empty_stream_is_a_clean_end() {
        assert!(read_all(&[], 10).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn truncated_header_and_payload_are_errors() {
        let whole = frame(b"hello");
        for cut in 1..whole.len() {
            let err = read_all(&whole[..cut], 10).await.unwrap_err();
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn wrong_version_is_refused() {
        let mut bytes = frame(b"hello");
        bytes[4] = VERSION + 1;
        let err = read_all(&bytes, 10).await.unwrap_err();
        assert!(
            matches!(err, FrameError::UnsupportedVersion { version } if version == VERSION + 1)
        );
        // The version is checked before the length, so a future version's
        // large header is reported as a version problem.
        let err = read_all(&[0xff, 0xff, 0xff, 0xff, 0], 10)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::UnsupportedVersion { version: 0 }));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_on_both_sides() {
        let bytes = frame(&[0u8; 11]);
        let err = read_all(&bytes, 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 11, max: 10 }));
        // A hostile 4 GiB header is refused without allocating.
        let err = read_all(&[0xff, 0xff, 0xff, 0xff, VERSION], DEFAULT_MAX_FRAME)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }));
        let mut sink: Vec<u8> = Vec::new();
        let err = write_frame(&mut sink, &[0u8; 11], 10).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { len: 11, max: 10 }));
        assert!(sink.is_empty(), "nothing is written for a refused frame");
    }

    #[tokio::test]
    async fn frames_built_in_place_read_back() {
        let mut out = b"x".to_vec();
        let start = begin_frame(&mut out);
        out.extend_from_slice(b"abc");
        end_frame(&mut out, start, 3).unwrap();
        let start = begin_frame(&mut out);
        out.extend_from_slice(b"toolong");
        assert!(matches!(
            end_frame(&mut out, start, 3),
            Err(FrameError::TooLarge { len: 7, max: 3 })
        ));
        assert_eq!(out.len(), 1 + HEADER_LEN + 3, "a refused frame is removed");
        let frames = read_all(&out[1..], 3).await.unwrap();
        assert_eq!(frames, vec![Bytes::from_static(b"abc")]);
    }

    #[test]
    fn header_is_big_endian_length_then_version() {
        assert_eq!(
            encode_header(0x0102_0304, usize::MAX).unwrap(),
            [1, 2, 3, 4, VERSION]
        );
        assert_eq!(parse_header([0, 0, 1, 0, VERSION], 256).unwrap(), 256);
        assert!(parse_header([0, 0, 1, 1, VERSION], 256).is_err());
    }
}
