//! [`Key`]: a byte string for ordered-map keys that compares fast in wasm.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A byte string ordered exactly like `[u8]` (lexicographically, a prefix
/// before its extensions), but compared in a handful of instructions.
///
/// Inside a wasm32 plugin, comparing `[u8]` calls `memcmp`, which compiles to a
/// byte-at-a-time loop, and a `BTreeMap` lookup makes a dozen or more
/// comparisons, so with `Vec<u8>` keys they were most of the cost of a kv put.
/// A `Key` keeps its first eight bytes as a big-endian integer next to the
/// bytes, so most comparisons are one integer comparison; only keys that agree
/// on those bytes compare the rest, a word at a time. Use `Key` as the key type
/// of ordered maps in a plugin's state. It serializes as a byte string, so
/// replacing a `Vec<u8>` key with it keeps the snapshot format.
#[derive(Clone, Default)]
pub struct Key {
    /// `prefix_of(&bytes)`, always.
    prefix: u64,
    bytes: Vec<u8>,
}

/// The first eight bytes of `bytes`, padded with zeros, as a big-endian
/// integer: integers compare as their padded bytes do, lexicographically.
fn prefix_of(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    let len = bytes.len().min(8);
    word[..len].copy_from_slice(&bytes[..len]);
    u64::from_be_bytes(word)
}

impl Key {
    /// The bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The bytes, by value.
    #[must_use]
    pub fn into_vec(self) -> Vec<u8> {
        self.bytes
    }
}

/// Lexicographic comparison of byte strings, a machine word at a time.
#[must_use]
pub fn compare(a: &[u8], b: &[u8]) -> Ordering {
    let common = a.len().min(b.len());
    let mut i = 0;
    while i + 8 <= common {
        // Little-endian loads are plain loads in wasm (a byte swap is a dozen
        // instructions there), and equality does not care about byte order.
        let word = |s: &[u8]| u64::from_le_bytes(s[i..i + 8].try_into().expect("8 bytes"));
        let difference = word(a) ^ word(b);
        if difference != 0 {
            // The lowest set bit of a little-endian word is in its first byte.
            let first = i + (difference.trailing_zeros() / 8) as usize;
            return a[first].cmp(&b[first]);
        }
        i += 8;
    }
    while i < common {
        if a[i] != b[i] {
            return a[i].cmp(&b[i]);
        }
        i += 1;
    }
    a.len().cmp(&b.len())
}

impl Ord for Key {
    #[inline]
    fn cmp(&self, other: &Self) -> Ordering {
        match self.prefix.cmp(&other.prefix) {
            // Equal padded first eight bytes: if both keys are that long,
            // those bytes are equal and the rest decides; otherwise the
            // shorter key is a prefix of the other (its padding zeros match
            // real zero bytes of the other).
            Ordering::Equal if self.bytes.len() >= 8 && other.bytes.len() >= 8 => {
                compare(&self.bytes[8..], &other.bytes[8..])
            }
            Ordering::Equal => self.bytes.len().cmp(&other.bytes.len()),
            unequal => unequal,
        }
    }
}

impl PartialOrd for Key {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Key {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.prefix == other.prefix && self.bytes == other.bytes
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.bytes.hash(state);
    }
}

impl Deref for Key {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes
    }
}

impl From<Vec<u8>> for Key {
    fn from(bytes: Vec<u8>) -> Self {
        Self {
            prefix: prefix_of(&bytes),
            bytes,
        }
    }
}

impl From<&[u8]> for Key {
    fn from(bytes: &[u8]) -> Self {
        Self::from(bytes.to_vec())
    }
}

impl From<Key> for Vec<u8> {
    fn from(key: Key) -> Self {
        key.bytes
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.bytes.escape_ascii().to_string())
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.bytes)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Key;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Key, E> {
                Ok(Key::from(bytes))
            }

            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Key, E> {
                Ok(Key::from(bytes))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Key, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Ok(Key::from(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    /// Every pair of strings over a small alphabet (zero included, which
    /// pads short keys' prefixes), lengths 0 to 26, with and without shared
    /// whole words: `compare` and `Key`'s order agree with `[u8]::cmp`.
    #[test]
    fn orders_like_slices() {
        let mut strings = vec![Vec::new()];
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for len in 1..=10 {
            for _ in 0..40 {
                let s: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        [0u8, 1, 0x7f, 0x80, 0xff][(seed % 5) as usize]
                    })
                    .collect();
                strings.push(s);
            }
        }
        // Long strings sharing one or two whole words, differing after them.
        let base = strings.clone();
        for prefix in [&b"01234567"[..], b"0123456789abcdef"] {
            for tail in &base {
                strings.push([prefix, tail.as_slice()].concat());
            }
        }
        for a in &strings {
            for b in &strings {
                assert_eq!(compare(a, b), a.cmp(b), "{a:?} vs {b:?}");
                let (key_a, key_b) = (Key::from(a.as_slice()), Key::from(b.as_slice()));
                assert_eq!(key_a.cmp(&key_b), a.cmp(b), "{a:?} vs {b:?}");
                assert_eq!(key_a == key_b, a == b, "{a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn encodes_like_a_byte_vector() {
        let key = Key::from(b"key".to_vec());
        let as_vec = encode(&b"key".to_vec()).unwrap();
        assert_eq!(encode(&key).unwrap(), as_vec);
        assert_eq!(decode::<Key>(&as_vec).unwrap(), key);
    }
}
