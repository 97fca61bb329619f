//! Restore always fails.
