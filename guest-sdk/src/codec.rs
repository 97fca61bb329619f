//! The wire encoding of commands, responses, queries and states.
//!
//! Everything a plugin exchanges with the host is [postcard]: a compact,
//! non-self-describing serde format with a documented, stable specification
//! (variable-length integers, enum variants as their index, sequences and maps
//! prefixed by their length, floats as their little-endian bits). Encoding is a
//! pure function of the value, so equal values give equal bytes, which is what
//! makes snapshots comparable across replicas — as long as the value itself has
//! a canonical form (use `BTreeMap`/`BTreeSet`, never `HashMap`/`HashSet`, whose
//! iteration order differs between runs).
//!
//! Hosts and clients encode commands with the plugin crate's own `Command` type
//! through these same functions, so both sides always agree on the format.
//!
//! [postcard]: https://postcard.jamesmunns.com/wire-format

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The value's `Serialize` implementation cannot be expressed in postcard
    /// (for example a sequence whose length is not known in advance).
    #[error("value cannot be encoded: {0}")]
    Unencodable(postcard::Error),
    /// The bytes are not an encoding of the expected type.
    #[error("malformed input: {0}")]
    Malformed(postcard::Error),
    /// The bytes start with a complete value but do not end with it. Accepting
    /// them would let two different byte strings mean the same command.
    #[error("{0} trailing byte(s) after a complete value")]
    TrailingBytes(usize),
}

/// Encodes `value` as postcard bytes.
///
/// # Errors
///
/// [`CodecError::Unencodable`] if the value's `Serialize` implementation
/// produces something postcard cannot represent; derived implementations on
/// structs, enums, integers, strings, `Vec`, `Option` and `BTreeMap` never do.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    postcard::to_allocvec(value).map_err(CodecError::Unencodable)
}

/// Appends the postcard encoding of `value` to `out`, so many values can
/// share one buffer. On error `out` is as it was.
///
/// # Errors
///
/// As for [`encode`].
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let len = out.len();
    postcard::serialize_with_flavor(value, Append(out)).map_err(|e| {
        out.truncate(len);
        CodecError::Unencodable(e)
    })
}

/// A postcard output that appends to a borrowed `Vec`.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Decodes exactly one `T` from `bytes`.
///
/// # Errors
///
/// [`CodecError::Malformed`] if `bytes` do not start with an encoding of `T`,
/// [`CodecError::TrailingBytes`] if anything follows it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(CodecError::Malformed)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(CodecError::TrailingBytes(rest.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    enum Command {
        Put { key: Vec<u8>, value: Vec<u8> },
        Delete { key: Vec<u8> },
    }

    #[test]
    fn round_trips_and_is_compact() {
        let command = Command::Put {
            key: b"k".to_vec(),
            value: b"vv".to_vec(),
        };
        let bytes = encode(&command).unwrap();
        // Variant index 0, then each byte string as length + bytes.
        assert_eq!(bytes, [0, 1, b'k', 2, b'v', b'v']);
        assert_eq!(decode::<Command>(&bytes).unwrap(), command);
    }

    #[test]
    fn equal_maps_encode_equally_whatever_the_insertion_order() {
        let forward: BTreeMap<u32, u32> = (0..100).map(|i| (i, i * 2)).collect();
        let backward: BTreeMap<u32, u32> = (0..100).rev().map(|i| (i, i * 2)).collect();
        assert_eq!(encode(&forward).unwrap(), encode(&backward).unwrap());
    }

    #[test]
    fn encode_into_appends_the_same_bytes_as_encode() {
        let first = Command::Delete { key: vec![1, 2] };
        let second = Command::Put {
            key: b"k".to_vec(),
            value: b"v".to_vec(),
        };
        let mut out = Vec::new();
        encode_into(&first, &mut out).unwrap();
        encode_into(&second, &mut out).unwrap();
        let mut expected = encode(&first).unwrap();
        expected.extend(encode(&second).unwrap());
        assert_eq!(out, expected);
    }

    /// A sequence of unknown length, which postcard cannot encode.
    struct Unsized;

    impl Serialize for Unsized {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeSeq;
            let mut seq = serializer.serialize_seq(None)?;
            seq.serialize_element(&1u8)?;
            seq.end()
        }
    }

    #[test]
    fn encode_into_leaves_the_buffer_as_it_was_on_error() {
        let mut out = vec![7, 7];
        assert!(matches!(
            encode_into(&(5u8, Unsized), &mut out),
            Err(CodecError::Unencodable(_))
        ));
        assert_eq!(out, [7, 7]);
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut bytes = encode(&Command::Delete { key: vec![7] }).unwrap();
        bytes.push(0);
        assert_eq!(decode::<Command>(&bytes), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn rejects_malformed_input() {
        // Variant index 9 does not exist.
        assert!(matches!(
            decode::<Command>(&[9, 0]),
            Err(CodecError::Malformed(_))
        ));
        // A length prefix that runs past the end.
        assert!(matches!(
            decode::<Command>(&[1, 5, 1]),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Command>(&[]),
            Err(CodecError::Malformed(_))
        ));
    }
}
