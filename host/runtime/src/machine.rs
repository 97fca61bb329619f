//! A running state machine: atomic apply, and outcomes that are the same on
//! every replica.
//!
//! **Rollback.** After a trap wasmtime poisons the whole `Store`, and a trap can
//! strike in the middle of a mutation, so a failed call cannot be undone in
//! place. A machine keeps a *checkpoint* (state bytes at a log index) and the
//! commands applied since; a failed apply is rolled back by restoring the
//! checkpoint into a fresh instance and re-applying those commands. Apply is
//! deterministic, so that is exactly the state before the failed call.
//!
//! **Canonical instances.** Whether an apply runs out of fuel or memory
//! depends not only on the replicated state but on the guest's heap (its
//! allocator's free lists, its memory size), and local calls that are not
//! replicated (`query`, `get-state`) change the heap. So the instance an apply
//! runs on must be the same on every replica. An instance is *canonical* when
//! it was built as "fresh instance, restore the checkpoint, re-apply the
//! commands since"; checkpoints are taken at log indexes that are multiples of
//! [`crate::Limits::checkpoint_interval`], and after any entry that brings the
//! commands kept since the last checkpoint to
//! [`crate::Limits::checkpoint_bytes`], and after each one the machine
//! continues on a fresh instance restored from it. Both rules depend only on
//! the log, so every replica that starts from the same checkpoint (the initial
//! state, or a Raft snapshot, which is a checkpoint) checkpoints at the same
//! indexes. Every replica therefore
//! holds the same heap after every apply, as long as it made no local call.
//! After a local call the instance is marked *perturbed*; an apply on a
//! perturbed instance whose outcome is near a limit (a failure, or more than
//! three quarters of the fuel budget or memory limit used) is decided again on
//! a rebuilt canonical instance. The assumption this rests on, stated: a local
//! call changes the fuel or memory an apply needs by less than a quarter of the
//! limits (it changes allocator bookkeeping, not the plugin's work).
//!
//! **Batches.** [`Machine::apply_batch`] hands many entries to the guest in one
//! call, because the call itself costs more than a small command. Replicas
//! batch differently, so a batch must give exactly the outcomes of applying
//! its entries one by one. It runs with the fuel budget of a single entry: if
//! the whole batch fits in three quarters of that, and memory stays below three
//! quarters of the cap, no entry alone could have come near a limit, and the
//! batch is kept. Otherwise it is rolled back and its entries are applied one
//! by one. A batch perturbs the heap like a local call (one-by-one application
//! from the checkpoint is the canonical history).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
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
    /// Fuel the call consumed, rollback work not included. The same on every
    /// replica for a call made alone; for an entry applied within a batch it
    /// is the batch's fuel shared evenly, which depends on the batching: a
    /// metric, never part of a replicated result.
    pub fuel_used: u64,
    /// Wall-clock time of the call, rollback included. For metrics only: it is
    /// never part of a replicated result.
    pub duration: Duration,
}

/// What carrying a state over to new code cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Migration {
    /// Size of the state handed from the old code to the new.
    pub state_bytes: usize,
    /// Fuel of the old code's `get-state` and the new code's restore.
    pub fuel_used: u64,
    /// Wall-clock time of both (for reports only; never replicated).
    pub duration: Duration,
}

/// Data each store carries: the memory limit and whether it was hit.
#[derive(Debug)]
pub(crate) struct StoreData {
    memory_limit: usize,
    memory_limit_hit: bool,
    /// Largest linear memory size granted so far.
    memory_size: usize,
    /// Growing memory failed for a reason of this host's (a refused `mmap`
    /// or `mprotect`) rather than the limit: the call's failure is then not
    /// the plugin's, and must not be replicated as one.
    host_failure: Option<String>,
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
        self.memory_size = self.memory_size.max(desired);
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

    /// wasmtime's default ignores the failure and lets `memory.grow` return
    /// -1, which the guest's allocator turns into a trap that would read as
    /// the plugin's own: stop the call and remember why.
    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.host_failure = Some(format!("{error:#}"));
        Err(error)
    }
}

/// An instance and the store it lives in.
pub(crate) struct Live {
    store: Store<StoreData>,
    bindings: StateMachine,
}

impl Live {
    pub(crate) fn new(runtime: &Runtime, plugin: &Plugin) -> Result<Self, CallError> {
        let limits = runtime.limits();
        let mut store = Store::new(
            &runtime.inner.engine,
            StoreData {
                memory_limit: limits.memory_bytes,
                memory_limit_hit: false,
                memory_size: 0,
                host_failure: None,
            },
        );
        store.limiter(|data| data);
        set_fuel(&mut store, limits.snapshot_fuel)?;
        match plugin.pre().instantiate(&mut store) {
            Ok(bindings) => Ok(Self { store, bindings }),
            // A start function that traps or runs out of fuel, or an initial
            // memory over the cap, fails alike on every replica: the
            // plugin's fault, not this host's (`classify` tells a memory
            // this host could not map apart).
            Err(e)
                if store.data().host_failure.is_some()
                    || store.data().memory_limit_hit
                    || e.is::<MemoryLimitReached>()
                    || e.downcast_ref::<Trap>().is_some() =>
            {
                Err(classify(&store, e, limits.snapshot_fuel))
            }
            // No free instance slot, a failed mmap: this host's own failure.
            Err(e) => Err(CallError::Internal(format!("cannot instantiate: {e:#}"))),
        }
    }

    /// Runs one call with `budget` fuel and turns failures into [`CallError`]s.
    /// After an `Err` other than [`CallError::Plugin`] this store must not be
    /// used again.
    pub(crate) fn call<T>(
        &mut self,
        budget: u64,
        f: impl FnOnce(&mut Store<StoreData>, &StateMachine) -> wasmtime::Result<Result<T, String>>,
    ) -> (Result<T, CallError>, u64) {
        if let Err(e) = set_fuel(&mut self.store, budget) {
            return (Err(e), 0);
        }
        self.store.data_mut().memory_limit_hit = false;
        self.store.data_mut().host_failure = None;
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
    ) -> (Result<Bytes, CallError>, u64) {
        let (result, fuel) = self.call(budget, |store, sm| {
            sm.call_apply(store, ctx.into(), command)
        });
        (result.map(Bytes::from), fuel)
    }

    fn apply_batch(
        &mut self,
        budget: u64,
        contexts: &[u64],
        command_lens: &[u32],
        commands: &[u8],
    ) -> (Result<bindings::BatchResult, CallError>, u64) {
        self.call(budget, |store, sm| {
            sm.call_apply_batch(store, contexts, command_lens, commands)
                .map(Ok)
        })
    }

    fn get_state(&mut self, budget: u64) -> (Result<Vec<u8>, CallError>, u64) {
        self.call(budget, |store, sm| sm.call_get_state(store).map(Ok))
    }

    fn memory_near_limit(&self) -> bool {
        let data = self.store.data();
        near_limit(data.memory_size as u64, data.memory_limit as u64)
    }

    fn restore(&mut self, budget: u64, state: &[u8]) -> (Result<(), CallError>, u64) {
        self.call(budget, |store, sm| {
            sm.call_restore_from_snapshot(store, state)
        })
    }
}

/// Whether `used` is within a quarter of `limit`: close enough that a local
/// call's effect on the guest heap might decide the outcome (see the module
/// documentation).
fn near_limit(used: u64, limit: u64) -> bool {
    used > limit / 4 * 3
}

fn set_fuel(store: &mut Store<StoreData>, fuel: u64) -> Result<(), CallError> {
    store
        .set_fuel(fuel)
        .map_err(|e| CallError::Internal(format!("cannot set fuel: {e}")))
}

/// Names a failed call. Only the trap code or the top-level message is kept,
/// never a backtrace or an address, so the error is the same on every replica.
fn classify(store: &Store<StoreData>, error: wasmtime::Error, budget: u64) -> CallError {
    if let Some(why) = &store.data().host_failure {
        return CallError::Internal(format!("memory could not grow on this host: {why}"));
    }
    if store.data().memory_limit_hit || error.is::<MemoryLimitReached>() {
        return CallError::MemoryLimit {
            limit: store.data().memory_limit,
        };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => CallError::FuelExhausted { budget },
        Some(trap) => CallError::Trap(trap.to_string()),
        // The guest was entered and handed back something the canonical ABI
        // rejects (a list out of bounds, invalid UTF-8, a bad discriminant):
        // as deterministic as a trap.
        None => CallError::Trap(format!("invalid value from plugin: {error}")),
    }
}

/// What the guest answers for one entry.
type PluginResult = Result<Bytes, String>;

/// Most entries handed to the guest in one call.
const MAX_BATCH: usize = 1024;

/// What a rollback rebuilds from.
#[derive(Default)]
struct Checkpoint {
    /// Log index the state belongs to (0: the initial state).
    index: u64,
    /// State bytes, or `None` for the plugin's initial state.
    state: Option<Arc<[u8]>>,
    /// Every apply since `state`, in order.
    replay: Replay,
}

/// What a replica needs to rebuild a machine exactly as it stands after the
/// last applied entry: its latest checkpoint and the commands applied since.
///
/// A Raft snapshot carries one per machine. Restoring the checkpoint into a
/// fresh instance and re-applying the commands is how every replica builds its
/// canonical instance (see the module documentation), so a replica resumed from
/// an image holds the same heap as the replicas it came from, and checkpoints
/// at the same indexes afterwards. The checkpoint state alone would not do: its
/// instance would differ from theirs until the next checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineImage {
    /// Log index of the checkpoint (0: the plugin's initial state).
    pub checkpoint_index: u64,
    /// State bytes at the checkpoint; `None` for the initial state.
    pub checkpoint_state: Option<Arc<[u8]>>,
    /// Every command applied since the checkpoint, in order.
    pub replay: Vec<(ApplyContext, Bytes)>,
    /// Bytes of `replay`'s commands that count towards the next checkpoint
    /// (all of them, unless a host failure postponed one).
    pub counted_bytes: u64,
    /// Why the machine refuses calls, when a deterministic failure made it
    /// unavailable: every replica must refuse alike.
    pub unavailable: Option<String>,
}

/// The commands applied since a checkpoint, kept back to back in one buffer:
/// one copy per command and no allocation per command, and a batch's
/// commands are already laid out as the guest's `apply-batch` takes them.
#[derive(Default)]
struct Replay {
    /// Each command's context and where its bytes end in `bytes`.
    entries: Vec<(ApplyContext, usize)>,
    bytes: Vec<u8>,
    /// Where in `bytes` the byte rule for checkpoints counts from: 0, or the
    /// end of the last entry at which a checkpoint fell due but could not be
    /// taken (a host failure), so the rule keeps the indexes every other
    /// replica uses.
    counted_from: usize,
}

impl Replay {
    fn len(&self) -> usize {
        self.entries.len()
    }

    /// Bytes of the commands the checkpoint byte rule counts.
    fn counted_bytes(&self) -> u64 {
        (self.bytes.len() - self.counted_from) as u64
    }

    fn push(&mut self, ctx: ApplyContext, command: &[u8]) {
        self.bytes.extend_from_slice(command);
        self.entries.push((ctx, self.bytes.len()));
    }

    /// Forgets every command from the `len`-th on.
    fn truncate(&mut self, len: usize) {
        self.entries.truncate(len);
        let end = self.entries.last().map_or(0, |&(_, end)| end);
        self.bytes.truncate(end);
        self.counted_from = self.counted_from.min(end);
    }

    /// The commands from the `from`-th on, back to back.
    fn bytes_from(&self, from: usize) -> &[u8] {
        let start = from
            .checked_sub(1)
            .map_or(0, |previous| self.entries[previous].1);
        &self.bytes[start..]
    }

    fn iter(&self) -> impl Iterator<Item = (ApplyContext, &[u8])> {
        let mut start = 0;
        self.entries.iter().map(move |&(ctx, end)| {
            let command = &self.bytes[start..end];
            start = end;
            (ctx, command)
        })
    }
}

/// What a machine runs its calls on.
enum Instance {
    Live(Live),
    /// A host failure (not a plugin failure) left no instance; the next call
    /// rebuilds it from the checkpoint.
    Lost,
    /// A deterministic failure made rollback impossible. Final, until a
    /// restore replaces the state.
    Unavailable(String),
}

impl Instance {
    fn live(&self) -> Option<&Live> {
        match self {
            Instance::Live(live) => Some(live),
            _ => None,
        }
    }
}

/// Runs a call on `instance` if it is live.
fn on_live<T>(
    instance: &mut Instance,
    f: impl FnOnce(&mut Live) -> (Result<T, CallError>, u64),
) -> (Result<T, CallError>, u64) {
    match instance {
        Instance::Live(live) => f(live),
        Instance::Unavailable(reason) => (Err(CallError::Unavailable(reason.clone())), 0),
        Instance::Lost => (
            Err(CallError::Internal("no instance could be built".into())),
            0,
        ),
    }
}

/// The per-entry results of a batch, or `None` if the guest's answer does
/// not have the layout the WIT describes: one output length per entry,
/// lengths that add up to the output, error positions ascending and within
/// the batch, error texts in UTF-8.
fn split_batch(batch: bindings::BatchResult, entries: usize) -> Option<Vec<PluginResult>> {
    let ascending = batch.errors.windows(2).all(|w| w[0] < w[1]);
    let in_batch = batch
        .errors
        .last()
        .is_none_or(|&last| usize::try_from(last).is_ok_and(|last| last < entries));
    if batch.output_lens.len() != entries || !ascending || !in_batch {
        return None;
    }
    let mut errors = batch.errors.iter().peekable();
    // Responses are slices of the one output buffer: no copy per entry.
    let output = Bytes::from(batch.output);
    let mut start = 0usize;
    let mut results = Vec::with_capacity(entries);
    for (position, &len) in (0u32..).zip(&batch.output_lens) {
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        let bytes = output.get(start..end)?;
        results.push(if errors.next_if_eq(&&position).is_some() {
            Err(String::from_utf8(bytes.to_vec()).ok()?)
        } else {
            Ok(output.slice(start..end))
        });
        start = end;
    }
    (start == output.len()).then_some(results)
}

/// One state machine: a plugin instance and its state.
///
/// Every call returns an [`Outcome`]. A call that fails with a trap, fuel
/// exhaustion or the memory limit ([`CallError::rolled_back`]) leaves the state
/// exactly as it was before the call; so does a failed restore. See the module
/// documentation for why outcomes agree across replicas.
pub struct Machine {
    runtime: Runtime,
    plugin: Plugin,
    instance: Instance,
    checkpoint: Checkpoint,
    /// A local call ran on `live` since it was built canonically.
    perturbed: bool,
    /// The last applied context, to assert that the log is applied in order.
    last_applied: Option<ApplyContext>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("plugin", &self.plugin.hash())
            .field("unavailable", &self.unavailable())
            .field("checkpoint_index", &self.checkpoint.index)
            .field("replay_len", &self.checkpoint.replay.len())
            .field("perturbed", &self.perturbed)
            .finish()
    }
}

impl Machine {
    pub(crate) fn start(runtime: Runtime, plugin: Plugin) -> Result<Self, CallError> {
        let live = Live::new(&runtime, &plugin)?;
        Ok(Self {
            runtime,
            plugin,
            instance: Instance::Live(live),
            checkpoint: Checkpoint::default(),
            perturbed: false,
            last_applied: None,
        })
    }

    /// A machine of `plugin` whose state is `state`, checkpointed at log
    /// `index`: one fresh instance, restored.
    fn restored(runtime: &Runtime, plugin: &Plugin, state: &[u8], index: u64) -> Outcome<Self> {
        let started = Instant::now();
        let budget = runtime.limits().snapshot_fuel;
        let (result, fuel_used) = match runtime
            .check_plugin(plugin)
            .and_then(|()| Live::new(runtime, plugin))
        {
            Ok(mut fresh) => {
                let (result, fuel) = fresh.restore(budget, state);
                let machine = result.map(|()| Self {
                    runtime: runtime.clone(),
                    plugin: plugin.clone(),
                    instance: Instance::Live(fresh),
                    checkpoint: Checkpoint {
                        index,
                        state: Some(state.into()),
                        replay: Replay::default(),
                    },
                    perturbed: false,
                    last_applied: None,
                });
                (machine, fuel)
            }
            Err(e) => (Err(e), 0),
        };
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }

    /// The plugin this machine runs.
    pub fn plugin_hash(&self) -> PluginHash {
        self.plugin.hash()
    }

    /// Why the machine refuses calls, if it does.
    pub fn unavailable(&self) -> Option<&str> {
        match &self.instance {
            Instance::Unavailable(reason) => Some(reason),
            _ => None,
        }
    }

    /// The latest checkpoint: its log index and state bytes (`None` while the
    /// machine has not checkpointed since it started from the initial state).
    /// These are the bytes a Raft snapshot at that index should carry: a
    /// replica restoring them gets the same canonical instance as the others.
    pub fn checkpoint(&self) -> (u64, Option<Arc<[u8]>>) {
        (self.checkpoint.index, self.checkpoint.state.clone())
    }

    /// The image a Raft snapshot carries for this machine: a copy of the
    /// checkpoint reference and of the commands since, no plugin call.
    pub fn image(&self) -> MachineImage {
        let replay = &self.checkpoint.replay;
        // One copy of the commands, sliced per command.
        let all = Bytes::copy_from_slice(&replay.bytes);
        let mut start = 0;
        MachineImage {
            checkpoint_index: self.checkpoint.index,
            checkpoint_state: self.checkpoint.state.clone(),
            replay: replay
                .entries
                .iter()
                .map(|&(ctx, end)| {
                    let command = all.slice(start..end);
                    start = end;
                    (ctx, command)
                })
                .collect(),
            counted_bytes: replay.counted_bytes(),
            unavailable: self.unavailable().map(str::to_owned),
        }
    }

    /// Rebuilds the machine an [`image`](Self::image) describes, running
    /// `plugin`: the checkpoint restored into a fresh instance and the
    /// commands re-applied. Fails if the plugin cannot restore or replay
    /// what another replica applied (a host failure, or a plugin that is not
    /// deterministic).
    pub(crate) fn resume(
        runtime: Runtime,
        plugin: Plugin,
        image: &MachineImage,
    ) -> Result<Self, CallError> {
        let mut replay = Replay::default();
        let mut total = 0u64;
        for (ctx, command) in &image.replay {
            if replay
                .entries
                .last()
                .is_some_and(|&(last, _)| ctx.index <= last.index)
            {
                return Err(CallError::Internal(format!(
                    "the image's commands are out of order at index {}",
                    ctx.index
                )));
            }
            replay.push(*ctx, command);
            total += command.len() as u64;
        }
        let counted = usize::try_from(image.counted_bytes)
            .ok()
            .filter(|&counted| counted as u64 <= total)
            .ok_or_else(|| {
                CallError::Internal(format!(
                    "the image counts {} bytes towards a checkpoint but holds {total}",
                    image.counted_bytes
                ))
            })?;
        replay.counted_from = replay.bytes.len() - counted;
        let last_applied = replay.entries.last().map(|&(ctx, _)| ctx);
        let mut machine = Self {
            runtime,
            plugin,
            instance: Instance::Lost,
            checkpoint: Checkpoint {
                index: image.checkpoint_index,
                state: image.checkpoint_state.clone(),
                replay,
            },
            perturbed: false,
            last_applied,
        };
        machine.instance = match &image.unavailable {
            Some(reason) => Instance::Unavailable(reason.clone()),
            None => match machine.rebuild() {
                Ok(live) => Instance::Live(live),
                // A host failure (no free instance slot): the machine is
                // whole, and builds its instance at the next call.
                Err(CallError::Internal(e)) => {
                    tracing::warn!(plugin = %machine.plugin.hash(), error = %e, "resumed without an instance; will rebuild");
                    Instance::Lost
                }
                Err(e) => return Err(e),
            },
        };
        Ok(machine)
    }

    /// Applies a committed command. Plugin errors are results like any other;
    /// traps, fuel exhaustion and the memory limit roll the state back.
    pub fn apply(&mut self, ctx: ApplyContext, command: &[u8]) -> Outcome<Bytes> {
        debug_assert!(
            self.last_applied
                .is_none_or(|last| ctx.index > last.index && ctx.timestamp_ms >= last.timestamp_ms),
            "entries must be applied in log order with non-decreasing timestamps: {:?} after {:?}",
            ctx,
            self.last_applied
        );
        let started = Instant::now();
        let limits = *self.runtime.limits();
        let budget = limits.apply_fuel;
        let mut attempt = self.call_live(|live| live.apply(budget, ctx, command));
        let undecided = |(result, fuel): &(Result<Bytes, CallError>, u64), live: Option<&Live>| {
            result.as_ref().is_err_and(CallError::rolled_back)
                || near_limit(*fuel, budget)
                || live.is_some_and(Live::memory_near_limit)
        };
        if self.perturbed && undecided(&attempt, self.instance.live()) {
            // Decide on the instance every replica has.
            self.rollback();
            attempt = self.call_live(|live| live.apply(budget, ctx, command));
        }
        let (result, fuel_used) = attempt;
        match &result {
            Ok(_) | Err(CallError::Plugin(_)) => {
                self.last_applied = Some(ctx);
                self.checkpoint.replay.push(ctx, command);
                if self.checkpoint_due(ctx.index) {
                    self.take_checkpoint(ctx.index);
                }
            }
            Err(e) if e.rolled_back() => self.rollback(),
            Err(_) => {}
        }
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }

    /// Applies consecutive committed entries with exactly the outcomes
    /// [`Machine::apply`] would give one by one, in fewer calls into the guest
    /// (see the module documentation). Fuel and duration of entries applied
    /// within a batch are the batch's, shared evenly. The responses of a batch
    /// are slices of one buffer, which lives as long as any of them: copy a
    /// response that is kept for long.
    pub fn apply_batch(&mut self, entries: &[(ApplyContext, &[u8])]) -> Vec<Outcome<Bytes>> {
        debug_assert!(
            entries
                .iter()
                .map(|(ctx, _)| ctx)
                .try_fold(self.last_applied, |last, ctx| {
                    last.is_none_or(|last| {
                        ctx.index > last.index && ctx.timestamp_ms >= last.timestamp_ms
                    })
                    .then_some(Some(*ctx))
                })
                .is_some(),
            "entries must be applied in log order with non-decreasing timestamps"
        );
        let limits = *self.runtime.limits();
        let mut outcomes = Vec::with_capacity(entries.len());
        let mut rest = entries;
        while !rest.is_empty() {
            // A chunk ends where a checkpoint is due if all of it applies, or
            // at the size cap. (If an entry fails, entries are applied one by
            // one, and each decides on the replay log as it really is.)
            let mut kept = self.checkpoint.replay.counted_bytes();
            let end = rest
                .iter()
                .position(|(ctx, command)| {
                    kept += command.len() as u64;
                    limits.checkpoint_due(ctx.index, kept)
                })
                .map_or(rest.len(), |i| i + 1)
                .min(MAX_BATCH);
            let (chunk, tail) = rest.split_at(end);
            self.apply_chunk(chunk, &mut outcomes);
            rest = tail;
        }
        outcomes
    }

    fn apply_chunk(&mut self, chunk: &[(ApplyContext, &[u8])], outcomes: &mut Vec<Outcome<Bytes>>) {
        debug_assert!(chunk.windows(2).all(|w| w[0].0.index < w[1].0.index));
        let started = Instant::now();
        let budget = self.runtime.limits().apply_fuel;
        let contexts: Vec<u64> = chunk
            .iter()
            .flat_map(|(ctx, _)| [ctx.index, ctx.term, ctx.timestamp_ms])
            .collect();
        let command_lens: Option<Vec<u32>> = chunk
            .iter()
            .map(|(_, command)| u32::try_from(command.len()).ok())
            .collect();
        let results = command_lens.and_then(|command_lens| {
            // Rebuilding replays the log, so it must happen before the chunk
            // joins it.
            self.rebuild_if_lost();
            // The chunk's commands go into the replay log first, and the
            // guest reads them from there: one copy on the host side.
            let first = self.checkpoint.replay.len();
            for (ctx, command) in chunk {
                self.checkpoint.replay.push(*ctx, command);
            }
            let commands = self.checkpoint.replay.bytes_from(first);
            let (result, fuel) = on_live(&mut self.instance, |live| {
                let (result, fuel) = live.apply_batch(budget, &contexts, &command_lens, commands);
                let near_memory = live.memory_near_limit();
                (result.map(|r| (r, near_memory)), fuel)
            });
            let results = match result {
                Ok((batch, near_memory)) if !near_limit(fuel, budget) && !near_memory => {
                    split_batch(batch, chunk.len())
                }
                _ => None,
            };
            if results.is_none() {
                self.checkpoint.replay.truncate(first);
            }
            results.map(|results| (results, fuel))
        });
        let Some((results, fuel)) = results else {
            // Near a limit, failed, a command too long to describe, or a
            // plugin that answered out of layout: decide entry by entry.
            self.rollback();
            for (ctx, command) in chunk {
                outcomes.push(self.apply(*ctx, command));
            }
            return;
        };
        self.perturbed = true;
        self.last_applied = chunk.last().map(|(ctx, _)| *ctx);
        let n = chunk.len() as u64;
        let duration = started.elapsed() / u32::try_from(n).unwrap_or(u32::MAX);
        outcomes.extend(results.into_iter().map(|result| Outcome {
            result: result.map_err(CallError::Plugin),
            fuel_used: fuel / n,
            duration,
        }));
        if let Some((last, _)) = chunk.last()
            && self.checkpoint_due(last.index)
        {
            self.take_checkpoint(last.index);
        }
    }

    /// Answers a read-only query. Not replicated, so it perturbs the instance.
    pub fn query(&mut self, request: &[u8]) -> Outcome<Bytes> {
        let budget = self.runtime.limits().query_fuel;
        self.local_call(|live| {
            let (result, fuel) = live.call(budget, |store, sm| sm.call_query(store, request));
            (result.map(Bytes::from), fuel)
        })
    }

    /// Serializes the whole state, from the current instance. Not replicated,
    /// so it perturbs the instance; for Raft snapshots use [`Machine::checkpoint`].
    pub fn get_state(&mut self) -> Outcome<Vec<u8>> {
        let budget = self.runtime.limits().snapshot_fuel;
        self.local_call(|live| live.get_state(budget))
    }

    /// Replaces the whole state with `state`, which belongs at log `index` (a
    /// Raft snapshot's index). The state is restored into a fresh instance, so
    /// on any failure the machine is exactly as it was.
    pub fn restore(&mut self, state: &[u8], index: u64) -> Outcome<()> {
        let started = Instant::now();
        let budget = self.runtime.limits().snapshot_fuel;
        let (result, fuel_used) = match Live::new(&self.runtime, &self.plugin) {
            Ok(mut fresh) => {
                let (result, fuel) = fresh.restore(budget, state);
                if result.is_ok() {
                    self.instance = Instance::Live(fresh);
                    self.perturbed = false;
                    self.checkpoint = Checkpoint {
                        index,
                        state: Some(state.into()),
                        replay: Replay::default(),
                    };
                    self.last_applied = None;
                }
                (result, fuel)
            }
            Err(e) => (Err(e), 0),
        };
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }

    /// Switches to `plugin` at log `index`, carrying the state over through the
    /// old plugin's `get-state` and the new one's `restore-from-snapshot`. On
    /// failure this machine keeps running the old plugin, its state untouched.
    pub fn upgrade(&mut self, plugin: &Plugin, index: u64) -> Result<Migration, CallError> {
        let runtime = self.runtime.clone();
        self.migrate(&runtime, plugin, index)
    }

    /// Like [`upgrade`](Self::upgrade), into a machine of `runtime` (another
    /// set of limits; `plugin` must be loaded by it). The new instance starts
    /// from a checkpoint at `index`, so every replica that migrates at the
    /// same index runs the same canonical instance afterwards.
    pub fn migrate(
        &mut self,
        runtime: &Runtime,
        plugin: &Plugin,
        index: u64,
    ) -> Result<Migration, CallError> {
        let started = Instant::now();
        if self.perturbed {
            // The serialization must succeed or fail alike on every replica.
            self.rollback();
        }
        let budget = self.runtime.limits().snapshot_fuel;
        let (state, get_fuel) = self.call_live(|live| live.get_state(budget));
        let state = match state {
            Ok(state) => state,
            Err(e) => {
                if e.rolled_back() {
                    self.rollback();
                }
                return Err(e);
            }
        };
        // The old instance's heap now holds what `get-state` left in it,
        // which a rebuild from the checkpoint would not: if the new code
        // fails, every replica keeps this instance, no longer canonical.
        self.perturbed = true;
        let restored = Machine::restored(runtime, plugin, &state, index);
        let restore_fuel = restored.fuel_used;
        let mut next = restored.result?;
        next.last_applied = self.last_applied;
        *self = next;
        Ok(Migration {
            state_bytes: state.len(),
            fuel_used: get_fuel + restore_fuel,
            duration: started.elapsed(),
        })
    }

    /// Runs a call on the live instance, rebuilding it first if a host failure
    /// left none.
    fn call_live<T>(
        &mut self,
        f: impl FnOnce(&mut Live) -> (Result<T, CallError>, u64),
    ) -> (Result<T, CallError>, u64) {
        self.rebuild_if_lost();
        on_live(&mut self.instance, f)
    }

    fn rebuild_if_lost(&mut self) {
        if matches!(self.instance, Instance::Lost) {
            self.rollback();
        }
    }

    /// A call that is not replicated: it leaves the instance perturbed, and a
    /// failure rolls back as for apply.
    fn local_call<T>(
        &mut self,
        f: impl FnOnce(&mut Live) -> (Result<T, CallError>, u64),
    ) -> Outcome<T> {
        let started = Instant::now();
        let (result, fuel_used) = self.call_live(f);
        self.perturbed = true;
        if result.as_ref().is_err_and(CallError::rolled_back) {
            self.rollback();
        }
        Outcome {
            result,
            fuel_used,
            duration: started.elapsed(),
        }
    }

    /// Whether the entry at `index`, just applied, ends with a checkpoint.
    fn checkpoint_due(&self, index: u64) -> bool {
        self.runtime
            .limits()
            .checkpoint_due(index, self.checkpoint.replay.counted_bytes())
    }

    /// Serializes the state at `index` and continues on a fresh instance
    /// restored from it, so that every replica's instance is the same.
    fn take_checkpoint(&mut self, index: u64) {
        let budget = self.runtime.limits().snapshot_fuel;
        let get_state = |live: &mut Live| {
            let (state, fuel) = live.get_state(budget);
            let near = near_limit(fuel, budget) || live.memory_near_limit();
            (state.map(|s| (s, near)), fuel)
        };
        let (mut state, _) = self.call_live(get_state);
        if self.perturbed && state.as_ref().ok().is_none_or(|(_, near)| *near) {
            // Whether serializing succeeds must not depend on local calls.
            self.rollback();
            state = self.call_live(get_state).0;
        }
        let state = state.map(|(state, _)| state);
        let state: Arc<[u8]> = match state {
            Ok(state) => state.into(),
            // Without checkpoints the replay log grows without bound, and a
            // plugin that cannot serialize its state cannot be snapshotted.
            // The instance is canonical, so every replica stops here.
            Err(e) if e.rolled_back() || matches!(e, CallError::Plugin(_)) => {
                return self.make_unavailable(format!("checkpoint at index {index}: {e}"));
            }
            // A host failure: keep the old checkpoint and try at the next
            // index where one falls due, counting bytes from here as the
            // replicas that took this one do. Until then this instance is
            // not the canonical one.
            Err(_) => {
                self.checkpoint.replay.counted_from = self.checkpoint.replay.bytes.len();
                self.perturbed = true;
                return;
            }
        };
        let checkpoint = Checkpoint {
            index,
            state: Some(Arc::clone(&state)),
            replay: Replay::default(),
        };
        match Live::new(&self.runtime, &self.plugin) {
            Ok(mut fresh) => match fresh.restore(budget, &state).0 {
                Ok(()) => {
                    self.instance = Instance::Live(fresh);
                    self.perturbed = false;
                    self.checkpoint = checkpoint;
                }
                Err(CallError::Internal(e)) => self.adopt_without_fresh_instance(checkpoint, &e),
                Err(e) => self.make_unavailable(format!(
                    "checkpoint at index {index}: the plugin cannot restore its own state: {e}"
                )),
            },
            Err(e) => self.adopt_without_fresh_instance(checkpoint, &e.to_string()),
        }
    }

    /// The state at a checkpoint index is known but a host failure left no
    /// fresh instance to restore it into. The checkpoint is kept anyway, so
    /// rollbacks and Raft snapshots use the same indexes as on every other
    /// replica; the current instance holds the same state, but not the
    /// canonical heap, so it counts as perturbed: an apply near a limit is
    /// decided again on an instance rebuilt from this checkpoint.
    fn adopt_without_fresh_instance(&mut self, checkpoint: Checkpoint, error: &str) {
        tracing::warn!(
            plugin = %self.plugin.hash(),
            index = checkpoint.index,
            %error,
            "checkpoint kept without a fresh instance"
        );
        self.checkpoint = checkpoint;
        self.perturbed = true;
    }

    /// Rebuilds a canonical instance from the checkpoint: the state after the
    /// last successful apply. A host failure leaves no instance (the next call
    /// tries again); a plugin failure makes the machine unavailable.
    fn rollback(&mut self) {
        if let Instance::Unavailable(_) = self.instance {
            return;
        }
        // Free the old instance's slot before taking a new one.
        self.instance = Instance::Lost;
        match self.rebuild() {
            Ok(live) => {
                self.instance = Instance::Live(live);
                self.perturbed = false;
            }
            Err(CallError::Internal(e)) => {
                tracing::warn!(plugin = %self.plugin.hash(), error = %e, "rebuild failed; will retry");
            }
            Err(e) => self.make_unavailable(format!("rollback failed: {e}")),
        }
    }

    fn rebuild(&self) -> Result<Live, CallError> {
        let limits = self.runtime.limits();
        let mut live = Live::new(&self.runtime, &self.plugin)?;
        if let Some(state) = &self.checkpoint.state {
            live.restore(limits.snapshot_fuel, state).0?;
        }
        for (ctx, command) in self.checkpoint.replay.iter() {
            match live.apply(limits.apply_fuel, ctx, command).0 {
                Ok(_) | Err(CallError::Plugin(_)) => {}
                Err(CallError::Internal(e)) => return Err(CallError::Internal(e)),
                // It succeeded before on a canonical instance (or within a
                // quarter of the limits on a perturbed one); failing now means
                // the plugin is not deterministic.
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
        self.instance = Instance::Unavailable(reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(index: u64) -> ApplyContext {
        ApplyContext {
            index,
            term: 1,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn replay_keeps_commands_back_to_back_and_truncates_whole_entries() {
        let mut replay = Replay::default();
        replay.push(ctx(1), b"ab");
        replay.push(ctx(2), b"");
        replay.push(ctx(3), b"cde");
        let all: Vec<(u64, &[u8])> = replay.iter().map(|(c, b)| (c.index, b)).collect();
        assert_eq!(all, [(1, &b"ab"[..]), (2, b""), (3, b"cde")]);
        assert_eq!(replay.bytes_from(0), b"abcde");
        assert_eq!(replay.bytes_from(2), b"cde");
        assert_eq!(replay.bytes_from(3), b"");
        replay.truncate(1);
        assert_eq!(replay.len(), 1);
        assert_eq!(replay.bytes_from(0), b"ab");
        replay.truncate(0);
        assert_eq!(replay.len(), 0);
        assert!(replay.bytes_from(0).is_empty());
    }

    fn batch(output_lens: &[u32], errors: &[u32], output: &[u8]) -> bindings::BatchResult {
        bindings::BatchResult {
            output_lens: output_lens.to_vec(),
            errors: errors.to_vec(),
            output: output.to_vec(),
        }
    }

    #[test]
    fn a_batch_answer_splits_into_per_entry_results() {
        assert_eq!(
            split_batch(batch(&[2, 3, 0], &[1], b"okbad"), 3),
            Some(vec![
                Ok(Bytes::from_static(b"ok")),
                Err("bad".to_owned()),
                Ok(Bytes::new())
            ])
        );
    }

    #[test]
    fn a_batch_answer_out_of_layout_is_refused() {
        // Wrong number of lengths.
        assert_eq!(split_batch(batch(&[1], &[], b"x"), 2), None);
        // Lengths past the output, or short of it.
        assert_eq!(split_batch(batch(&[2], &[], b"x"), 1), None);
        assert_eq!(split_batch(batch(&[1], &[], b"xy"), 1), None);
        // Error positions out of the batch, repeated or out of order.
        assert_eq!(split_batch(batch(&[1], &[1], b"x"), 1), None);
        assert_eq!(split_batch(batch(&[1, 1], &[0, 0], b"xy"), 2), None);
        assert_eq!(split_batch(batch(&[1, 1], &[1, 0], b"xy"), 2), None);
        // An error text that is not UTF-8.
        assert_eq!(split_batch(batch(&[1], &[0], &[0xFF]), 1), None);
    }
}
