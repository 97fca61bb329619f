//! The Kythira plugin runtime.
