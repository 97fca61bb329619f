//! Grows memory without bound.
