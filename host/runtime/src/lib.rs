//! The Kythira plugin runtime: runs replicated state machines packaged as
//! WebAssembly components that export the `kythira:state-machine` world.
//!
//! Three types carry the whole API:
//!
//! - [`Runtime`] owns a wasmtime engine configured for determinism and an
//!   optional on-disk cache of compiled artifacts.
//! - [`Plugin`] is a component that passed validation (a component, importing
//!   nothing, exporting the world with the right types) and is compiled and ready
//!   to instantiate. It is identified by the sha256 of its bytes.
//! - [`Machine`] is one running state machine. Every call returns an
//!   [`Outcome`]: the result plus the fuel and time it took. A call that traps,
//!   runs out of fuel or hits the memory cap leaves the state exactly as it was
//!   before the call, and the machine keeps serving.
//!
//! JSON at the edge: [`Runtime::command_from_json`],
//! [`Runtime::query_from_json`], [`Runtime::response_to_json`] and
//! [`Runtime::query_response_to_json`] ask a plugin to translate between the
//! JSON clients write and its own bytes, each on a fresh instance under the
//! query fuel budget and the memory limit, never on a machine's instance.
//!
//! Determinism is the point: every replica that feeds the same calls to the
//! same plugin bytes under the same [`Limits`] gets the same results, including
//! the same errors. See `ARCHITECTURE.md`, section "Plugin runtime".

mod bindings;
mod cache;
mod config;
mod engine;
mod error;
mod machine;
mod plugin;
mod translate;

pub use config::{Limits, RuntimeConfig};
pub use error::{CallError, LoadError, RuntimeError};
pub use machine::{ApplyContext, Machine, MachineImage, Migration, Outcome};
pub use plugin::{Plugin, PluginHash, WIT_PACKAGE};

use std::sync::Arc;

use cache::ArtifactCache;

// Machines move between threads (the node applies on a worker thread), and
// request handlers share one runtime for translations.
const _: () = {
    const fn assert_send<T: Send>() {}
    const fn assert_sync<T: Sync>() {}
    assert_send::<Machine>();
    assert_send::<Runtime>();
    assert_sync::<Runtime>();
    assert_sync::<Plugin>();
};

/// Compiles, validates and instantiates plugins.
///
/// Cheap to clone: clones share the engine and the cache.
#[derive(Clone, Debug)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

struct RuntimeInner {
    engine: wasmtime::Engine,
    linker: wasmtime::component::Linker<machine::StoreData>,
    limits: Limits,
    cache: Option<ArtifactCache>,
}

impl std::fmt::Debug for RuntimeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeInner")
            .field("limits", &self.limits)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates a runtime with the given configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        config.limits.validate()?;
        let engine = engine::deterministic_engine(&config)?;
        let cache = match &config.cache_dir {
            Some(dir) => Some(ArtifactCache::open(dir, &engine)?),
            None => None,
        };
        // The world imports nothing, so the linker stays empty: a component that
        // imports anything cannot be instantiated through it.
        let linker = wasmtime::component::Linker::new(&engine);
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                limits: config.limits,
                cache,
            }),
        })
    }

    /// The limits every machine of this runtime runs under.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Validates and compiles a component. See [`LoadError`] for what is refused.
    pub fn load(&self, bytes: &[u8]) -> Result<Plugin, LoadError> {
        plugin::load(self, bytes)
    }

    /// Starts a new machine running `plugin` from its initial (empty) state.
    pub fn start(&self, plugin: &Plugin) -> Result<Machine, CallError> {
        self.check_plugin(plugin)?;
        Machine::start(self.clone(), plugin.clone())
    }

    /// Rebuilds a machine running `plugin` from an image taken by
    /// [`Machine::image`], on this replica or another.
    pub fn resume(&self, plugin: &Plugin, image: &MachineImage) -> Result<Machine, CallError> {
        self.check_plugin(plugin)?;
        Machine::resume(self.clone(), plugin.clone(), image)
    }

    /// Refuses a plugin compiled by another runtime's engine.
    pub(crate) fn check_plugin(&self, plugin: &Plugin) -> Result<(), CallError> {
        if wasmtime::Engine::same(plugin.pre().engine(), &self.inner.engine) {
            Ok(())
        } else {
            Err(CallError::Internal(
                "the plugin was loaded by another runtime".into(),
            ))
        }
    }
}
