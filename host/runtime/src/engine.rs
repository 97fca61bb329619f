//! The wasmtime engine, configured so that the same component and inputs give
//! the same outputs on every replica.

use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::config::WASM_PAGE;
use crate::{RuntimeConfig, RuntimeError};

/// Native stack a plugin may use. Fixed, because the depth at which a deep
/// recursion traps must be the same on every replica.
const MAX_WASM_STACK: usize = 1 << 20;

pub(crate) fn deterministic_engine(config: &RuntimeConfig) -> Result<Engine, RuntimeError> {
    let mut wasm = Config::new();
    wasm.wasm_component_model(true)
        // Fuel is the only deterministic way to stop a runaway plugin: a
        // wall-clock deadline would fire at different points on different
        // replicas.
        .consume_fuel(true)
        // NaN bit patterns are not specified by wasm and differ across
        // hardware; canonicalize them so float-using plugins stay deterministic.
        .cranelift_nan_canonicalization(true)
        // Relaxed SIMD results are implementation-defined by design.
        .wasm_relaxed_simd(false)
        .relaxed_simd_deterministic(true)
        .max_wasm_stack(MAX_WASM_STACK)
        // The world is synchronous; concurrency machinery only costs time.
        .concurrency_support(false)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(config)));
    // Threads are not compiled into this wasmtime build (no `threads` feature),
    // so shared memories and atomics waits cannot be used by a plugin.
    Engine::new(&wasm).map_err(|e| RuntimeError::Engine(format!("{e:#}")))
}

/// The pooling allocator makes instantiation a few microseconds, which keeps
/// rollback (a fresh instance after a trap) cheap.
fn pooling(config: &RuntimeConfig) -> PoolingAllocationConfig {
    let memory = config.limits.memory_bytes.div_ceil(WASM_PAGE) * WASM_PAGE;
    // Checkpoints, restores and upgrades build a fresh instance while the old
    // one is still alive, so leave room for two instances per machine, and
    // for a few JSON translations (each holds an instance for its call only).
    let slots = config
        .max_machines
        .saturating_mul(2)
        .max(2)
        .saturating_add(TRANSLATION_SLOTS);
    let mut pool = PoolingAllocationConfig::new();
    // Per-component caps make the totals below meaningful: a component that
    // needs more is refused at load instead of starving other machines.
    pool.max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .max_memories_per_component(1)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .total_component_instances(slots)
        .total_core_instances(slots.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .total_memories(slots)
        .total_tables(slots.saturating_mul(TABLES_PER_COMPONENT))
        .max_memory_size(memory);
    pool
}

/// Instances kept free for JSON translations beside the machines' (see
/// `translate.rs`). More translations at once may find the pool full and
/// fail with `CallError::Internal`, which the caller retries.
const TRANSLATION_SLOTS: u32 = 4;

/// A plugin built with the SDK has one core module plus a few adapter shims.
const CORE_INSTANCES_PER_COMPONENT: u32 = 8;
const TABLES_PER_COMPONENT: u32 = 4;
