//! Imports WASI; must be refused.
