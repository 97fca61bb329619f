//! Shared helpers for tests that run the built plugin components.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use kythira_runtime::{Limits, Machine, Plugin, Runtime, RuntimeConfig};

/// Where `just plugins` puts the components (`KYTHIRA_PLUGIN_DIR` overrides).
pub fn plugin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KYTHIRA_PLUGIN_DIR") {
        return PathBuf::from(dir);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins")
}

/// The bytes of a built component. Fails loudly when the components are not
/// built: the tests must not pass by skipping.
pub fn component(name: &str) -> Vec<u8> {
    let path = plugin_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); build the plugins first with `just plugins`",
            path.display()
        )
    })
}

/// A shared artifact cache, so that each test process does not recompile the
/// same components (slow in debug builds).
pub fn cache_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| plugin_dir().join("test-artifact-cache"))
        .clone()
}

/// Limits small enough that runaway plugins fail fast in debug builds.
pub fn test_limits() -> Limits {
    Limits {
        apply_fuel: 5_000_000,
        query_fuel: 5_000_000,
        snapshot_fuel: 2_000_000_000,
        memory_bytes: 64 << 20,
        checkpoint_interval: 1000,
        checkpoint_bytes: 1 << 20,
    }
}

pub fn runtime_with(limits: Limits) -> Runtime {
    Runtime::new(RuntimeConfig {
        limits,
        cache_dir: Some(cache_dir()),
        max_machines: 8,
    })
    .expect("runtime")
}

pub fn runtime() -> Runtime {
    runtime_with(test_limits())
}

pub fn load(runtime: &Runtime, name: &str) -> Plugin {
    runtime
        .load(&component(name))
        .unwrap_or_else(|e| panic!("loading {name}: {e}"))
}

pub fn start(runtime: &Runtime, name: &str) -> Machine {
    let plugin = load(runtime, name);
    runtime.start(&plugin).expect("start")
}
