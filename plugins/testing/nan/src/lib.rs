//! Produces NaNs.
