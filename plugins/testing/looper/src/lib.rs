//! Loops forever in apply.
