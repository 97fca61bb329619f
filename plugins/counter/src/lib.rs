//! Counter plugin.
