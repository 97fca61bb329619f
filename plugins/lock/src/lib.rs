//! Lock plugin.
