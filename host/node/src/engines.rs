//! The plugin runtimes of a node, one per set of limits, shared by the
//! applier (which runs machines on them) and by the work done before an
//! entry applies: a leader validating a deploy before proposing it, and
//! every replica compiling a deploy's component as soon as the entry reaches
//! its log, so that applying it finds the compiled artifact in the cache.

use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};

use bytes::Bytes;
use kythira_runtime::{
    Limits, LoadError, Plugin, PluginHash, Runtime, RuntimeConfig, RuntimeError,
};

/// Largest machine count one runtime's instance pool is sized for.
pub const MACHINES_PER_RUNTIME: u32 = 16;

/// Most runtimes kept for work ahead of the log beside those the machines
/// use: a deploy under limits no machine runs creates one, and the applier
/// drops it once no machine needs it.
const SPARE_RUNTIMES: usize = 4;

/// Components waiting to be compiled ahead; more are skipped (compiling
/// ahead only saves time at apply).
const AHEAD_QUEUE: usize = 8;

/// The runtimes by limits. Cheap to clone: clones share them.
#[derive(Clone)]
pub struct Engines {
    inner: Arc<Inner>,
}

struct Inner {
    runtimes: Mutex<Vec<(Limits, Runtime)>>,
    /// Components being compiled, by hash and limits: a second compile of
    /// the same waits for the first and takes its artifact from the cache
    /// (an entry applied while the compile thread still compiles it).
    compiling: Mutex<Vec<(PluginHash, Limits)>>,
    compiled: Condvar,
    cache_dir: Option<PathBuf>,
    ahead: Mutex<Option<SyncSender<(Limits, Bytes)>>>,
}

impl Engines {
    /// No runtime yet; compiled components are cached under `cache_dir`.
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Self {
            inner: Arc::new(Inner {
                runtimes: Mutex::new(Vec::new()),
                compiling: Mutex::new(Vec::new()),
                compiled: Condvar::new(),
                cache_dir,
                ahead: Mutex::new(None),
            }),
        }
    }

    /// Where compiled components are cached.
    pub fn cache_dir(&self) -> Option<PathBuf> {
        self.inner.cache_dir.clone()
    }

    /// The runtime for `limits`, built if there is none.
    pub fn runtime(&self, limits: Limits) -> Result<Runtime, RuntimeError> {
        let mut runtimes = self.inner.runtimes.lock().expect("lock");
        if let Some((_, r)) = runtimes.iter().find(|(l, _)| *l == limits) {
            return Ok(r.clone());
        }
        let runtime = self.build(limits)?;
        runtimes.push((limits, runtime.clone()));
        Ok(runtime)
    }

    /// Drops the runtimes of limits no machine runs under.
    pub fn retain(&self, in_use: &[Limits]) {
        self.inner
            .runtimes
            .lock()
            .expect("lock")
            .retain(|(l, _)| in_use.contains(l));
    }

    /// Validates and compiles `component` for `limits`, as applying its
    /// deploy will; the compiled artifact stays in the cache. Work ahead of
    /// the log never grows the registry past the machines' runtimes and a
    /// few spares: past that it compiles in a runtime of its own.
    pub fn compile(
        &self,
        limits: Limits,
        component: &[u8],
    ) -> Result<(Runtime, Plugin), CompileError> {
        let existing = {
            let runtimes = self.inner.runtimes.lock().expect("lock");
            match runtimes.iter().find(|(l, _)| *l == limits) {
                Some((_, r)) => Some(r.clone()),
                None if runtimes.len() < crate::machines::MAX_LIMIT_SETS + SPARE_RUNTIMES => None,
                None => Some(self.build(limits).map_err(CompileError::Runtime)?),
            }
        };
        let runtime = match existing {
            Some(r) => r,
            None => self.runtime(limits).map_err(CompileError::Runtime)?,
        };
        let _turn = Compiling::start(&self.inner, (PluginHash::of(component), limits));
        let plugin = runtime.load(component).map_err(CompileError::Load)?;
        Ok((runtime, plugin))
    }

    /// Compiles `component` for `limits` on the compile thread, if it is
    /// not busy with as many already.
    pub fn compile_ahead(&self, limits: Limits, component: Bytes) {
        let mut ahead = self.inner.ahead.lock().expect("lock");
        if ahead.is_none() {
            *ahead = self.start_compiler();
        }
        let Some(tx) = ahead.as_ref() else {
            return;
        };
        match tx.try_send((limits, component)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                tracing::debug!("compile queue full; the deploy compiles when it applies");
            }
            Err(TrySendError::Disconnected(_)) => *ahead = None,
        }
    }

    fn start_compiler(&self) -> Option<SyncSender<(Limits, Bytes)>> {
        let (tx, rx) = mpsc::sync_channel::<(Limits, Bytes)>(AHEAD_QUEUE);
        // The thread holds the registry weakly, so it ends with the node.
        let engines = Arc::downgrade(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("kythira-compile".into())
            .spawn(move || {
                for (limits, component) in rx {
                    let Some(inner) = engines.upgrade() else {
                        return;
                    };
                    let engines = Engines { inner };
                    if let Err(e) = engines.compile(limits, &component) {
                        // The entry's apply reports it, the same on every replica.
                        tracing::debug!("compiling ahead: {e}");
                    }
                }
            });
        match spawned {
            Ok(_) => Some(tx),
            Err(e) => {
                tracing::warn!("no compile thread ({e}); deploys compile when they apply");
                None
            }
        }
    }

    fn build(&self, limits: Limits) -> Result<Runtime, RuntimeError> {
        Runtime::new(RuntimeConfig {
            limits,
            cache_dir: self.inner.cache_dir.clone(),
            max_machines: MACHINES_PER_RUNTIME,
        })
    }
}

/// One compile of a component under a set of limits; another of the same
/// waits for it to end. Ends when dropped, a panic included, so a waiter
/// is never left waiting for a compile that is gone.
struct Compiling<'a> {
    inner: &'a Inner,
    key: (PluginHash, Limits),
}

impl<'a> Compiling<'a> {
    fn start(inner: &'a Inner, key: (PluginHash, Limits)) -> Self {
        let mut compiling = inner.compiling.lock().unwrap_or_else(|p| p.into_inner());
        while compiling.contains(&key) {
            compiling = inner
                .compiled
                .wait(compiling)
                .unwrap_or_else(|p| p.into_inner());
        }
        compiling.push(key);
        Self { inner, key }
    }
}

impl Drop for Compiling<'_> {
    fn drop(&mut self) {
        self.inner
            .compiling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k| *k != self.key);
        self.inner.compiled.notify_all();
    }
}

/// Why a component could not be compiled ahead of its entry.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The component itself is refused: the same on every replica.
    #[error(transparent)]
    Load(LoadError),
    /// No runtime for its limits: invalid limits, or this node's own failure.
    #[error(transparent)]
    Runtime(RuntimeError),
}
