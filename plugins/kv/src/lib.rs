//! Key/value plugin.
