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
    let mut bytes = Vec::new();
    encode_into(value, &mut bytes)?;
    Ok(bytes)
}

/// The length of `value`'s postcard encoding, computed without writing it.
///
/// # Errors
///
/// [`CodecError::Unencodable`], as for [`encode`].
pub fn encoded_size<T: Serialize + ?Sized>(value: &T) -> Result<usize, CodecError> {
    postcard::serialize_with_flavor(value, postcard::ser_flavors::Size::default())
        .map_err(CodecError::Unencodable)
}

/// Appends the postcard encoding of `value` to `out`, growing it as needed.
///
/// # Errors
///
/// [`CodecError::Unencodable`], as for [`encode`]; `out` then holds exactly
/// the bytes it held before.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let start = out.len();
    postcard::serialize_with_flavor(value, Append(out)).map_err(|error| {
        out.truncate(start);
        CodecError::Unencodable(error)
    })
}

/// A postcard output that appends to a vector.
struct Append<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    // Inlined into postcard's serializer like its own flavors are: a call per
    // byte would cost a third more instructions on a large state.
    #[inline(always)]
    fn try_push(&mut self, byte: u8) -> postcard::Result<()> {
        self.0.push(byte);
        Ok(())
    }

    #[inline(always)]
    fn try_extend(&mut self, bytes: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(bytes);
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
    fn encode_into_appends_what_encode_returns() {
        let command = Command::Put {
            key: b"key".to_vec(),
            value: vec![0xAB; 300],
        };
        let alone = encode(&command).unwrap();
        assert_eq!(encoded_size(&command).unwrap(), alone.len());
        let mut out = vec![1, 2, 3];
        encode_into(&command, &mut out).unwrap();
        assert_eq!(out[..3], [1, 2, 3]);
        assert_eq!(out[3..], alone);
    }

    /// A sequence whose length is not known in advance, which postcard cannot
    /// encode (it writes the length first).
    struct UnknownLength;

    impl Serialize for UnknownLength {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq([1u8, 2].iter().filter(|_| true))
        }
    }

    #[test]
    fn failed_encode_into_leaves_the_output_as_it_was() {
        let mut out = vec![1, 2, 3];
        // The `7` is written before the sequence fails.
        let result = encode_into(&(7u8, UnknownLength), &mut out);
        assert!(
            matches!(result, Err(CodecError::Unencodable(_))),
            "{result:?}"
        );
        assert_eq!(out, [1, 2, 3]);
        assert!(matches!(
            encoded_size(&(7u8, UnknownLength)),
            Err(CodecError::Unencodable(_))
        ));
    }

    #[test]
    fn equal_maps_encode_equally_whatever_the_insertion_order() {
        let forward: BTreeMap<u32, u32> = (0..100).map(|i| (i, i * 2)).collect();
        let backward: BTreeMap<u32, u32> = (0..100).rev().map(|i| (i, i * 2)).collect();
        assert_eq!(encode(&forward).unwrap(), encode(&backward).unwrap());
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
