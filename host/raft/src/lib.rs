//! The Kythira consensus core.
