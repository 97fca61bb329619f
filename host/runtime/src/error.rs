//! Errors of the runtime. Call errors are deterministic: the same call on the
//! same state gives the same error on every replica, so they can be replicated
//! as results.

use std::path::PathBuf;

use thiserror::Error;

/// The runtime could not be created.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The configuration is inconsistent.
    #[error("invalid runtime configuration: {0}")]
    InvalidConfig(String),
    /// wasmtime refused the engine configuration.
    #[error("cannot build the wasm engine: {0}")]
    Engine(String),
    /// The artifact cache directory cannot be used.
    #[error("cannot use artifact cache directory {path}: {source}")]
    Cache {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// A component was refused at load time.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LoadError {
    /// The bytes are not WebAssembly at all.
    #[error("not a WebAssembly binary (missing the \\0asm magic number)")]
    NotWasm,
    /// A core module was given where a component is needed.
    #[error(
        "this is a core WebAssembly module, not a component; \
         turn it into one with `kythira-plugin componentize`"
    )]
    CoreModule,
    /// The component failed validation or compilation.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// The component imports something. Plugins may import nothing: no WASI, no
    /// host functions, so that they cannot observe anything but their inputs.
    #[error(
        "component imports `{name}`; plugins may import nothing \
         (build for wasm32-unknown-unknown, not a WASI target)"
    )]
    ForbiddenImport {
        /// The first import found.
        name: String,
    },
    /// The component was built against another version of the WIT package.
    #[error(
        "component was built against {found}; this host runs {expected} \
         (rebuild the plugin with the kythira-guest SDK of this release)"
    )]
    WitVersion {
        /// The package the component names (or what its exports show).
        found: String,
        /// The package this host runs.
        expected: String,
    },
    /// A function of the `kythira:state-machine` world is not exported.
    #[error("component does not export `{name}` of the kythira:state-machine world")]
    MissingExport {
        /// The missing export.
        name: String,
    },
    /// The exports exist but do not have the world's types.
    #[error("component exports do not match the kythira:state-machine world: {0}")]
    WrongExports(String),
}

/// A call into a plugin failed.
///
/// Every variant but [`CallError::Internal`] is a deterministic function of the
/// plugin bytes, the limits, the state and the input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The plugin returned an error. For `apply` this is an ordinary replicated
    /// result and the plugin's state is as the plugin left it; a refused
    /// restore leaves the machine as it was. For a JSON translation it is
    /// the plugin's reason the input does not translate (JSON that is not
    /// one of its commands, say), for the client to read.
    #[error("plugin error: {0}")]
    Plugin(String),
    /// The call used its whole fuel budget; its effects were rolled back.
    #[error("plugin ran out of fuel (budget {budget})")]
    FuelExhausted {
        /// The budget that was exhausted.
        budget: u64,
    },
    /// The call tried to grow memory past the limit; its effects were rolled back.
    #[error("plugin exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The limit in bytes.
        limit: usize,
    },
    /// The plugin trapped (a panic, an `unreachable`, a stack overflow...) or
    /// handed back a value the canonical ABI rejects; its effects were rolled
    /// back.
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The machine could not be brought back to its last good state (its
    /// `restore-from-snapshot` or `get-state` fails) and refuses further calls.
    #[error("state machine unavailable: {0}")]
    Unavailable(String),
    /// The host itself failed (for example it could not allocate an instance).
    /// Not deterministic; the caller should treat it as a local fault and
    /// retry: the machine rebuilds its instance on the next call.
    #[error("runtime failure: {0}")]
    Internal(String),
}

impl CallError {
    /// Whether the call's effects were rolled back, leaving the state as it was
    /// before the call.
    pub fn rolled_back(&self) -> bool {
        matches!(
            self,
            CallError::FuelExhausted { .. } | CallError::MemoryLimit { .. } | CallError::Trap(_)
        )
    }
}
