//! Configuration of the runtime and the limits plugins run under.

use std::path::PathBuf;

use crate::RuntimeError;

/// Resource limits for every call into a plugin.
///
/// Limits are part of the replicated configuration: replicas that run the same
/// plugin under different limits may disagree about which calls fail, so every
/// replica must use the same values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Fuel for one `apply` call (about one unit per wasm instruction).
    pub apply_fuel: u64,
    /// Fuel for one `query` call.
    pub query_fuel: u64,
    /// Fuel for one `get-state` or `restore-from-snapshot` call. These touch the
    /// whole state, so they get a budget of their own: restoring 100 MB costs
    /// about 1.1 × 10⁹ units.
    pub snapshot_fuel: u64,
    /// Maximum size of a plugin's linear memory, in bytes. Snapshots and
    /// rollbacks restore the state into a fresh instance, which holds the
    /// serialized and the decoded state at once: keep states under about half
    /// of this.
    pub memory_bytes: usize,
    /// A machine checkpoints after applying every entry whose index is a
    /// multiple of this: it serializes its state and continues on a fresh
    /// instance restored from it. Larger values make checkpoints rarer and
    /// rollbacks (which replay every command since the last checkpoint)
    /// longer. The default, 16,384, keeps a checkpoint of a small state under
    /// 5 % of the cost of the applies between two of them, and a rollback
    /// within tens of milliseconds. See [`crate::Machine`].
    pub checkpoint_interval: u64,
    /// A machine also checkpoints after an entry that brings the commands
    /// applied since its last checkpoint to this many bytes, so the commands
    /// it keeps for rollback stay bounded in memory whatever their size.
    pub checkpoint_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            apply_fuel: 50_000_000,
            query_fuel: 50_000_000,
            snapshot_fuel: 20_000_000_000,
            memory_bytes: 512 << 20,
            checkpoint_interval: 16_384,
            checkpoint_bytes: 64 << 20,
        }
    }
}

impl Limits {
    /// Whether a checkpoint falls due after applying the entry at `index`,
    /// with `kept_bytes` of commands kept since the last one: its index is a
    /// multiple of the interval, or the commands reached the byte bound. The
    /// one rule, so that batches end their chunks exactly where one-by-one
    /// application checkpoints.
    pub(crate) fn checkpoint_due(&self, index: u64, kept_bytes: u64) -> bool {
        index.is_multiple_of(self.checkpoint_interval) || kept_bytes >= self.checkpoint_bytes
    }

    /// Checks that a runtime can be built with these limits.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let invalid = |why: &str| Err(RuntimeError::InvalidConfig(why.to_string()));
        if self.query_fuel == 0 || self.snapshot_fuel == 0 {
            return invalid("fuel budgets must be positive");
        }
        if self.apply_fuel < MIN_APPLY_FUEL {
            return invalid("the apply fuel budget must be at least 1,000,000");
        }
        if self.checkpoint_interval == 0 || self.checkpoint_bytes == 0 {
            return invalid("checkpoint interval and checkpoint bytes must be positive");
        }
        if self.memory_bytes < WASM_PAGE {
            return invalid("memory limit must be at least one 64 KiB wasm page");
        }
        if u64::try_from(self.memory_bytes).is_err() || self.memory_bytes > MAX_MEMORY {
            return invalid("memory limit must be at most 4 GiB (32-bit wasm memories)");
        }
        Ok(())
    }
}

/// The smallest apply budget. A machine decides an apply again on a canonical
/// instance when it used more than three quarters of the budget on an instance
/// changed by calls that are not replicated (see [`crate::Machine`]); that
/// quarter must stay well above what such heap differences can change, about
/// 10⁵ units with the SDK's allocator.
const MIN_APPLY_FUEL: u64 = 1_000_000;

/// Size of a WebAssembly page.
pub(crate) const WASM_PAGE: usize = 64 << 10;
/// Largest 32-bit linear memory.
const MAX_MEMORY: usize = 4 << 30;

/// How to build a [`crate::Runtime`].
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    /// Limits for every call.
    pub limits: Limits,
    /// Where compiled artifacts are cached, keyed by the component's sha256 and
    /// the engine's settings. `None` compiles every load.
    pub cache_dir: Option<PathBuf>,
    /// How many machines may be alive at once (the pooling allocator reserves
    /// address space for this many up front, plus a few instances for JSON
    /// translations, which hold one only for the length of a call).
    pub max_machines: u32,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            cache_dir: None,
            max_machines: 64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(limits: Limits) -> String {
        match limits.validate() {
            Err(RuntimeError::InvalidConfig(why)) => why,
            other => panic!("{limits:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        Limits::default().validate().unwrap();
    }

    #[test]
    fn wrong_limits_are_refused_with_the_reason() {
        let base = Limits::default();
        assert!(
            refused(Limits {
                apply_fuel: MIN_APPLY_FUEL - 1,
                ..base
            })
            .contains("apply fuel")
        );
        assert!(
            refused(Limits {
                query_fuel: 0,
                ..base
            })
            .contains("positive")
        );
        assert!(
            refused(Limits {
                checkpoint_bytes: 0,
                ..base
            })
            .contains("checkpoint")
        );
        assert!(
            refused(Limits {
                checkpoint_interval: 0,
                ..base
            })
            .contains("checkpoint")
        );
        assert!(
            refused(Limits {
                memory_bytes: 1024,
                ..base
            })
            .contains("page")
        );
        assert!(
            refused(Limits {
                memory_bytes: MAX_MEMORY + 1,
                ..base
            })
            .contains("4 GiB")
        );
    }
}
