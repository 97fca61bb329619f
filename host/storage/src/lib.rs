//! Durable storage for Kythira.
