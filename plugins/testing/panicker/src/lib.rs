//! Panics in apply.
