//! Byte strings that are compact on the wire and readable in JSON.
//!
//! Put `#[serde(with = "kythira_guest::bytes")]` on a `Vec<u8>` or
//! `Option<Vec<u8>>` field of a command, query or response:
//!
//! - in postcard (the log, snapshots, `apply` and `query`) it is a byte
//!   string: its length, then the bytes, exactly the bytes a plain `Vec<u8>`
//!   or `serde_bytes` gives, so adding the attribute to an existing field
//!   changes no encoding;
//! - in JSON (the daemon's API and CLI, through the JSON translation of the
//!   [`StateMachine`](crate::StateMachine)) it is a string when the bytes
//!   are UTF-8, and `{"hex": "…"}` (lowercase hex digits) when they are not.
//!   Reading JSON, it takes a string (its UTF-8 bytes), `{"hex": "…"}` (either
//!   case), or an array of numbers 0–255.
//!
//! The formats are told apart by serde's `is_human_readable`, which postcard
//! answers `false` and serde_json `true`.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Put {
//!     #[serde(with = "kythira_guest::bytes")]
//!     key: Vec<u8>,
//!     #[serde(with = "kythira_guest::bytes")]
//!     value: Option<Vec<u8>>,
//! }
//!
//! let put = Put { key: b"k".to_vec(), value: Some(vec![0xff, 0]) };
//! let json = serde_json::to_string(&put).unwrap();
//! assert_eq!(json, r#"{"key":"k","value":{"hex":"ff00"}}"#);
//! assert_eq!(serde_json::from_str::<Put>(&json).unwrap(), put);
//! assert_eq!(kythira_guest::codec::encode(&put).unwrap(), [1, b'k', 1, 2, 0xff, 0]);
//! ```
//!
//! [`ByteStr`] and [`ByteString`] are the same forms as types, for fields the
//! attribute cannot reach (inside tuples, map keys, custom serializers).

use core::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// The one key of the JSON object that holds bytes that are not UTF-8.
const HEX_KEY: &str = "hex";

/// Borrowed bytes in the [`bytes`](self) forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteStr<'a>(pub &'a [u8]);

/// Owned bytes in the [`bytes`](self) forms.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteString(pub Vec<u8>);

impl ByteString {
    /// The bytes.
    #[must_use]
    pub fn into_vec(self) -> Vec<u8> {
        self.0
    }
}

impl Serialize for ByteStr<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return serializer.serialize_bytes(self.0);
        }
        match core::str::from_utf8(self.0) {
            Ok(text) => serializer.serialize_str(text),
            Err(_) => {
                let mut map = serializer.serialize_map(Some(1))?;
                map.serialize_entry(HEX_KEY, &Hex(self.0))?;
                map.end()
            }
        }
    }
}

impl Serialize for ByteString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ByteStr(&self.0).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for ByteString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            deserializer.deserialize_any(ByteVisitor).map(ByteString)
        } else {
            deserializer
                .deserialize_byte_buf(ByteVisitor)
                .map(ByteString)
        }
    }
}

/// Bytes written as lowercase hex digits, without allocating a string first.
struct Hex<'a>(&'a [u8]);

impl Serialize for Hex<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

fn from_hex<E: de::Error>(digits: &str) -> Result<Vec<u8>, E> {
    fn nibble(digit: u8) -> Option<u8> {
        char::from(digit)
            .to_digit(16)
            .and_then(|n| u8::try_from(n).ok())
    }
    if !digits.len().is_multiple_of(2) {
        return Err(E::custom("hex bytes need an even number of digits"));
    }
    digits
        .as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(|| E::custom(format_args!("`{digits}` is not hex")))
}

struct ByteVisitor;

impl<'de> Visitor<'de> for ByteVisitor {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"bytes: a UTF-8 string, {"hex": "…"} or an array of numbers 0-255"#)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
        Ok(v.as_bytes().to_vec())
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Vec<u8>, E> {
        Ok(v.into_bytes())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        // The length hint comes from the input: cap the reservation.
        let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
        while let Some(byte) = seq.next_element::<u8>()? {
            bytes.push(byte);
        }
        Ok(bytes)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vec<u8>, A::Error> {
        let Some(key) = map.next_key::<String>()? else {
            return Err(de::Error::custom(r#"expected {"hex": "…"}, found {}"#));
        };
        if key != HEX_KEY {
            return Err(de::Error::unknown_field(&key, &[HEX_KEY]));
        }
        let bytes = from_hex(&map.next_value::<String>()?)?;
        if map.next_key::<String>()?.is_some() {
            return Err(de::Error::custom(
                r#"expected {"hex": "…"} with no other field"#,
            ));
        }
        Ok(bytes)
    }
}

/// The field types `#[serde(with = "kythira_guest::bytes")]` applies to:
/// `Vec<u8>` and `Option<Vec<u8>>`.
pub trait ByteField: Sized + sealed::Sealed {
    #[doc(hidden)]
    fn serialize_field<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
    #[doc(hidden)]
    fn deserialize_field<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for Vec<u8> {}
    impl Sealed for Option<Vec<u8>> {}
}

impl ByteField for Vec<u8> {
    fn serialize_field<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ByteStr(self).serialize(serializer)
    }

    fn deserialize_field<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ByteString::deserialize(deserializer).map(ByteString::into_vec)
    }
}

impl ByteField for Option<Vec<u8>> {
    fn serialize_field<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.as_deref().map(ByteStr).serialize(serializer)
    }

    fn deserialize_field<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Option::<ByteString>::deserialize(deserializer)?.map(ByteString::into_vec))
    }
}

/// Serializes a [`ByteField`] in the [`bytes`](self) forms; for
/// `#[serde(with = "kythira_guest::bytes")]`.
///
/// # Errors
///
/// Those of the serializer.
pub fn serialize<T: ByteField, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    value.serialize_field(serializer)
}

/// Deserializes a [`ByteField`] from the [`bytes`](self) forms; for
/// `#[serde(with = "kythira_guest::bytes")]`.
///
/// # Errors
///
/// Those of the deserializer, and input that is none of the forms.
pub fn deserialize<'de, T: ByteField, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    T::deserialize_field(deserializer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Plain {
        key: Vec<u8>,
        value: Option<Vec<u8>>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    struct Marked {
        #[serde(with = "crate::bytes")]
        key: Vec<u8>,
        #[serde(with = "crate::bytes")]
        value: Option<Vec<u8>>,
    }

    fn marked(key: &[u8], value: Option<&[u8]>) -> Marked {
        Marked {
            key: key.to_vec(),
            value: value.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn postcard_bytes_are_those_of_a_plain_vec() {
        for (key, value) in [
            (&b""[..], None),
            (b"k", Some(&b"v"[..])),
            (&[0xff; 300][..], Some(&[0u8; 130][..])),
        ] {
            let plain = Plain {
                key: key.to_vec(),
                value: value.map(<[u8]>::to_vec),
            };
            let with = marked(key, value);
            let bytes = encode(&plain).unwrap();
            assert_eq!(encode(&with).unwrap(), bytes);
            assert_eq!(decode::<Marked>(&bytes).unwrap(), with);
            assert_eq!(decode::<Plain>(&encode(&with).unwrap()).unwrap(), plain);
        }
    }

    #[test]
    fn json_is_a_string_for_utf8_and_hex_otherwise() {
        let cases = [
            (marked(b"a", Some(b"1")), r#"{"key":"a","value":"1"}"#),
            (
                marked("é\"".as_bytes(), None),
                r#"{"key":"é\"","value":null}"#,
            ),
            (
                marked(&[0, 0xff, 0x10], Some(b"")),
                r#"{"key":{"hex":"00ff10"},"value":""}"#,
            ),
        ];
        for (value, json) in cases {
            assert_eq!(serde_json::to_string(&value).unwrap(), json);
            assert_eq!(serde_json::from_str::<Marked>(json).unwrap(), value);
        }
    }

    #[test]
    fn json_also_reads_upper_case_hex_and_arrays_of_numbers() {
        assert_eq!(
            serde_json::from_str::<Marked>(r#"{"key":{"hex":"C0FFEE"},"value":[104,105]}"#)
                .unwrap(),
            marked(&[0xc0, 0xff, 0xee], Some(b"hi"))
        );
    }

    #[test]
    fn json_that_is_not_bytes_is_refused_with_the_reason() {
        for (json, reason) in [
            (r#"{"key":{"hex":"abc"},"value":null}"#, "even number"),
            (r#"{"key":{"hex":"zz"},"value":null}"#, "not hex"),
            (
                r#"{"key":{"base64":"AA=="},"value":null}"#,
                "unknown field `base64`",
            ),
            (
                r#"{"key":{"hex":"00","x":1},"value":null}"#,
                "no other field",
            ),
            (r#"{"key":{},"value":null}"#, "found {}"),
            (r#"{"key":[256],"value":null}"#, "256"),
            (r#"{"key":7,"value":null}"#, "a UTF-8 string"),
        ] {
            let error = serde_json::from_str::<Marked>(json)
                .unwrap_err()
                .to_string();
            assert!(error.contains(reason), "{json}: {error}");
        }
    }
}
