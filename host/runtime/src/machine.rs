//! A running state machine, and how a failed call is rolled back.
//!
//! After a trap wasmtime poisons the whole `Store`, and a trap can strike in the
//! middle of a mutation, so a failed call cannot be undone in place. Instead a
//! machine keeps a *checkpoint*: the bytes of a `get-state` taken at some point,
//! plus every `apply` since then. A failed call is rolled back by building a
//! fresh instance, restoring the checkpoint and re-applying those commands.
//! Apply is deterministic, so the rebuilt state is exactly the state before the
//! failed call.
//!
//! A checkpoint is taken when the fuel spent in `apply` since the last one
//! exceeds `checkpoint_ratio` times the fuel the last one cost. So checkpointing
//! adds at most `1 / checkpoint_ratio` to the cost of applying, and a rollback
//! costs at most one restore plus `checkpoint_ratio` checkpoints' worth of
//! re-applying. A successful `restore-from-snapshot` is a checkpoint for free:
//! its bytes are at hand and proven restorable. The bytes of an arbitrary
//! `get-state` are not adopted, because nothing proves yet that the plugin can
//! restore them; until the first periodic checkpoint, rollback replays from
//! the initial state and needs no restore at all.
//!
//! A plugin whose `restore-from-snapshot` fails on its own checkpoint cannot be
//! rolled back; the machine then becomes unavailable, at the same call on every
//! replica that followed the same history.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{ResourceLimiter, Store, Trap};

use crate::bindings::{self, StateMachine};
use crate::{CallError, Plugin, PluginHash, Runtime};

/// Where a command sits in the replicated log. The only context a plugin gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyContext {
    /// Log index of the entry.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// Leader-assigned time of the entry, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
}

impl From<ApplyContext> for bindings::ApplyContext {
    fn from(ctx: ApplyContext) -> Self {
        Self {
            index: ctx.index,
            term: ctx.term,
            timestamp_ms: ctx.timestamp_ms,
        }
    }
}

/// The result of a call, with what it cost.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome<T> {
    /// What the call returned.
    pub result: Result<T, CallError>,
    /// Fuel the call consumed (deterministic; rollback work not included).
    pub fuel_used: u64,
    /// Wall-clock time of the call, rollback included. For metrics only: it is
    /// never part of a replicated result.
    pub duration: Duration,
}

/// Data each store carries: the memory limit and whether it was hit.
#[derive(Debug)]
pub(crate) struct StoreData {
    memory_limit: usize,
    memory_limit_hit: bool,
}

/// Marks a trap raised because the memory limit was reached.
#[derive(Debug, thiserror::Error)]
#[error("memory limit reached")]
struct MemoryLimitReached;

/// Most elements a plugin's table may grow to. Tables hold function references;
/// Rust plugins never grow them, so this only stops abuse.
const MAX_TABLE_ELEMENTS: usize = 100_000;

impl ResourceLimiter for StoreData {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_limit {
            // Trap rather than let `memory.grow` return -1: a guest allocator
            // failing looks like any other panic, and the limit should be named.
            self.memory_limit_hit = true;
            return Err(MemoryLimitReached.into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// An instance and the store it lives in.
struct Live {
    store: Store<StoreData>,
    bindings: StateMachine,
}

impl Live {
    fn new(runtime: &Runtime, plugin: &Plugin) -> Result<Self, CallError> {
        let limits = runtime.limits();
        let mut store = Store::new(
            &runtime.inner.engine,
            StoreData {
                memory_limit: limits.memory_bytes,
                memory_limit_hit: false,
            },
        );
        store.limiter(|data| data);
        set_fuel(&mut store, limits.snapshot_fuel)?;
        match plugin.pre().instantiate(&mut store) {
            Ok(bindings) => Ok(Self { store, bindings }),
            Err(e) => Err(classify(&store, e, limits.snapshot_fuel)),
        }
    }

    /// Runs one call with `budget` fuel and turns failures into [`CallError`]s.
    /// After an `Err` other than [`CallError::Plugin`] this store must not be
    /// used again.
    fn call<T>(
        &mut self,
        budget: u64,
        f: impl FnOnce(&mut Store<StoreData>, &StateMachine) -> wasmtime::Result<Result<T, String>>,
    ) -> (Result<T, CallError>, u64) {
        if let Err(e) = set_fuel(&mut self.store, budget) {
            return (Err(e), 0);
        }
        self.store.data_mut().memory_limit_hit = false;
        let result = f(&mut self.store, &self.bindings);
        let left = self.store.get_fuel().unwrap_or(0);
        let fuel_used = budget.saturating_sub(left);
        let result = match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Plugin(message)),
            Err(e) => Err(classify(&self.store, e, budget)),
        };
        (result, fuel_used)
    }

    fn apply(
        &mut self,
        budget: u64,
        ctx: ApplyContext,
        command: &[u8],
    ) -> (Result<Vec<u8>, CallError>, u64) {
        self.call(budget, |store, sm| {
            sm.call_apply(store, ctx.into(), command)
        })
    }

    fn restore(&mut self, budget: u64, state: &[u8]) -> (Result<(), CallError>, u64) {
        self.call(budget, |store, sm| {
            sm.call_restore_from_snapshot(store, state)
        })
    }
}

fn set_fuel(store: &mut Store<StoreData>, fuel: u64) -> Result<(), CallError> {
    store
        .set_fuel(fuel)
        .map_err(|e| CallError::Internal(format!("cannot set fuel: {e}")))
}

/// Names a failed call. Only the trap code is kept, never a backtrace or an
/// address, so the error is the same on every replica.
fn classify(store: &Store<StoreData>, error: wasmtime::Error, budget: u64) -> CallError {
    if store.data().memory_limit_hit || error.is::<MemoryLimitReached>() {
        return CallError::MemoryLimit {
            limit: store.data().memory_limit,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::FuelExhausted { budget },
        Some(trap) => CallError::Trap(trap.to_string()),
        None => CallError::Internal(format!("{error:#}")),
    }
}

/// What a rollback rebuilds from.
#[derive(Default)]
struct Checkpoint {
    /// State from `get-state`, or `None` for the plugin's initial state.
    state: Option<Arc<[u8]>>,
    /// Every apply since `state`, in order.
    replay: Vec<(ApplyContext, Box<[u8]>)>,
    /// Fuel spent by the applies in `replay`.
    replay_fuel: u64,
    /// Bytes of commands in `replay`.
    replay_bytes: usize,
    /// Fuel the `get-state` that produced `state` cost.
    cost: u64,
}

/// Checkpoints cost at least this much fuel when deciding when to take the next
/// one, so that tiny states are not checkpointed after every command.
const MIN_CHECKPOINT_COST: u64 = 250_000;
/// Commands kept for replay before a checkpoint is forced, whatever the fuel.
const MAX_REPLAY_BYTES: usize = 64 << 20;

/// One state machine: a plugin instance and its state.
///
/// Every call returns an [`Outcome`]. A call that fails with a trap, fuel
/// exhaustion or the memory limit ([`CallError::rolled_back`]) leaves the state
/// exactly as it was before the call; so does a failed restore.
pub struct Machine {
    runtime: Runtime,
    plugin: Plugin,
    /// `None` once the machine is unavailable.
    live: Option<Live>,
    unavailable: Option<String>,
    checkpoint: Checkpoint,
    /// The last applied context, to assert that the log is applied in order.
    last_applied: Option<ApplyContext>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("plugin", &self.plugin.hash())
            .field("unavailable", &self.unavailable)
            .field("replay_len", &self.checkpoint.replay.len())
            .finish()
    }
}

impl Machine {
    pub(crate) fn start(runtime: Runtime, plugin: Plugin) -> Result<Self, CallError> {
        let live = Live::new(&runtime, &plugin)?;
        Ok(Self {
            runtime,
            plugin,
            live: Some(live),
            unavailable: None,
            checkpoint: Checkpoint::default(),
            last_applied: None,
        })
    }

    /// The plugin this machine runs.
    pub fn plugin_hash(&self) -> PluginHash {
        self.plugin.hash()
    }

    /// Why the machine refuses calls, if it does.
    pub fn unavailable(&self) -> Option<&str> {
        self.unavailable.as_deref()
    }

    /// Applies a committed command. Plugin errors are results like any other;
    /// traps, fuel exhaustion and the memory limit roll the state back.
    pub fn apply(&mut self, ctx: ApplyContext, command: &[u8]) -> Outcome<Vec<u8>> {
        debug_assert!(
            self.last_applied
                .is_none_or(|last| ctx.index > last.index && ctx.timestamp_ms >= last.timestamp_ms),
            "entries must be applied in log order with non-decreasing timestamps: {:?} after {:?}",
            ctx,
            self.last_applied
        );
        let budget = self.runtime.limits().apply_fuel;
        let outcome = self.run(budget, |live| live.apply(budget, ctx, command));
        if outcome.result.is_ok() || matches!(outcome.result, Err(CallError::Plugin(_))) {
            self.last_applied = Some(ctx);
            let checkpoint = &mut self.checkpoint;
            checkpoint.replay.push((ctx, command.into()));
            checkpoint.replay_fuel += outcome.fuel_used;
            checkpoint.replay_bytes += command.len();
            self.maybe_checkpoint();
        }
        outcome
    }

    /// Answers a read-only query.
    pub fn query(&mut self, request: &[u8]) -> Outcome<Vec<u8>> {
        let budget = self.runtime.limits().query_fuel;
        self.run(budget, |live| {
            live.call(budget, |store, sm| sm.call_query(store, request))
        })
    }

    /// Serializes the whole state.
    pub fn get_state(&mut self) -> Outcome<Vec<u8>> {
        let budget = self.runtime.limits().snapshot_fuel;
        self.run(budget, |live| {
            live.call(budget, |store, sm| sm.call_get_state(store).map(Ok))
        })
    }

    /// Replaces the whole state. On any failure the state is what it was.
    pub fn restore(&mut self, state: &[u8]) -> Outcome<()> {
        let budget = self.runtime.limits().snapshot_fuel;
        let mut outcome = self.run(budget, |live| live.restore(budget, state));
        match &outcome.result {
            Ok(()) => {
                self.set_checkpoint(state.into(), outcome.fuel_used);
                self.last_applied = None;
            }
            // The plugin may have changed its state before refusing.
            Err(CallError::Plugin(_)) => {
                let started = Instant::now();
                self.rollback();
                outcome.duration += started.elapsed();
            }
            Err(_) => {}
        }
        outcome
    }

    /// Switches to `plugin`, carrying the state over through the old plugin's
    /// `get-state` and the new one's `restore-from-snapshot`. On failure this
    /// machine keeps running the old plugin with its state untouched.
    pub fn upgrade(&mut self, plugin: &Plugin) -> Result<(), CallError> {
        let state = self.get_state().result?;
        let mut next = Machine::start(self.runtime.clone(), plugin.clone())?;
        next.restore(&state).result?;
        next.last_applied = self.last_applied;
        *self = next;
        Ok(())
    }

    /// Runs a call; when it faults, rolls the state back before returning.
    fn run<T>(
        &mut self,
        budget: u64,
        f: impl FnOnce(&mut Live) -> (Result<T, CallError>, u64),
    ) -> Outcome<T> {
        let started = Instant::now();
        let Some(live) = self.live.as_mut() else {
            let reason = self.unavailable.clone().unwrap_or_default();
            return Outcome {
                result: Err(CallError::Unavailable(reason)),
                fuel_used: 0,
                duration: started.elapsed(),
            };
        };
        let (result, fuel_used) = f(live);
        debug_assert!(fuel_used <= budget);
        if matches!(&result, Err(e) if e.rolled_back() || matches!(e, CallError::Internal(_))) {
            self.rollback();
        }
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }

    fn set_checkpoint(&mut self, state: Arc<[u8]>, cost: u64) {
        self.checkpoint = Checkpoint {
            state: Some(state),
            cost,
            ..Checkpoint::default()
        };
    }

    fn maybe_checkpoint(&mut self) {
        let ratio = u64::from(self.runtime.inner.checkpoint_ratio);
        let checkpoint = &self.checkpoint;
        let due = checkpoint.replay_fuel
            >= ratio.saturating_mul(checkpoint.cost.max(MIN_CHECKPOINT_COST))
            || checkpoint.replay_bytes >= MAX_REPLAY_BYTES;
        if !due {
            return;
        }
        let outcome = self.get_state();
        match outcome.result {
            Ok(state) => self.set_checkpoint(state.into(), outcome.fuel_used),
            // Without a checkpoint the replay log would grow without bound; a
            // plugin that cannot serialize its state cannot be snapshotted
            // either. Stop it where every replica stops it.
            Err(e) => self.make_unavailable(format!("checkpoint failed: {e}")),
        }
    }

    /// Rebuilds the instance from the checkpoint. The state afterwards is the
    /// state after the last successful apply.
    fn rollback(&mut self) {
        // Free the poisoned instance's slot before taking a new one.
        self.live = None;
        match self.rebuild() {
            Ok(live) => self.live = Some(live),
            Err(e) => self.make_unavailable(format!("rollback failed: {e}")),
        }
    }

    fn rebuild(&self) -> Result<Live, CallError> {
        let limits = self.runtime.limits();
        let mut live = Live::new(&self.runtime, &self.plugin)?;
        if let Some(state) = &self.checkpoint.state {
            live.restore(limits.snapshot_fuel, state).0?;
        }
        for (ctx, command) in &self.checkpoint.replay {
            match live.apply(limits.apply_fuel, *ctx, command).0 {
                Ok(_) | Err(CallError::Plugin(_)) => {}
                // It succeeded before; failing now means the plugin is not
                // deterministic.
                Err(e) => {
                    return Err(CallError::Unavailable(format!(
                        "re-applying index {} failed ({e}) although it succeeded before",
                        ctx.index
                    )));
                }
            }
        }
        Ok(live)
    }

    fn make_unavailable(&mut self, reason: String) {
        tracing::error!(plugin = %self.plugin.hash(), %reason, "state machine unavailable");
        self.live = None;
        self.unavailable = Some(reason);
    }
}
