//! The Kythira guest SDK.
