//! The replicated state of a node above the log: deployed state machines and
//! client sessions, advanced entry by entry.
//!
//! [`Machines::apply`] is deterministic: the same committed entries give the
//! same answers and the same state on every replica, failures included. It
//! hands runs of consecutive commands for one machine to the runtime as one
//! batch, the fast path for a busy log.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use kythira_api::{
    ApiError, ChangeKind, CodeChange, DeployLimits, LimitsReport, MachineStatus, Payload,
    PluginReport, Reply, Response, SessionSeq,
};
use kythira_raft::{Entry, EntryKind};
use kythira_runtime::{
    ApplyContext, CallError, Limits, Machine, MachineImage, Plugin, Runtime, RuntimeError,
};
use sha2::{Digest, Sha256};

use crate::addresses::{AddressBook, Addresses};
use crate::engines::{CompileError, Engines};
use crate::entry::{Envelope, Op};
use crate::image::{self, Image, MachineRecord};
use crate::metrics::Metrics;
use crate::sessions::{Admit, Sessions};

/// The answer to one committed entry, for whoever waits on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Index of the entry.
    pub index: u64,
    /// Term of the entry; a waiter whose proposal had another term lost it.
    pub term: u64,
    /// What the entry produced. Commands carry `Payload::Bytes`.
    pub reply: Reply,
}

/// A deployed machine with what identifies its code.
struct Deployed {
    machine: Machine,
    plugin: Plugin,
    /// The component's bytes, for snapshots.
    component: Bytes,
    runtime: Runtime,
    limits: Limits,
    sha256: String,
    /// Code and limit changes, oldest first, at most [`HISTORY_LEN`].
    history: Vec<CodeChange>,
}

impl Deployed {
    /// Index of the entry that installed the code it runs.
    fn deployed_at(&self) -> u64 {
        self.history
            .iter()
            .rev()
            .find(|c| c.change != ChangeKind::Limits)
            .map_or(0, |c| c.index)
    }

    fn record(&mut self, change: CodeChange) {
        if self.history.len() == HISTORY_LEN {
            self.history.remove(0);
        }
        self.history.push(change);
    }
}

/// Changes a machine's history keeps: the latest ones.
pub const HISTORY_LEN: usize = 32;

/// A copy of a machine's state and code, for a rehearsal that must change
/// nothing (a dry-run upgrade).
pub struct Fork {
    /// The machine's image: its checkpoint and the commands since.
    pub image: MachineImage,
    /// The code it runs.
    pub plugin: Plugin,
    /// The runtime it runs in.
    pub runtime: Runtime,
    /// sha256 of its code, hex.
    pub sha256: String,
    /// Index the node had applied.
    pub applied: u64,
    /// Log time of that entry.
    pub last_timestamp_ms: u64,
}

/// What an entry does to a machine's code.
enum Change {
    /// Install, or upgrade if the machine exists.
    Deploy(Code),
    /// Upgrade; the machine must exist.
    Upgrade(Code),
    /// Same code, other limits; the machine must exist.
    Limits,
}

/// A component an entry carries.
struct Code {
    component: Bytes,
    sha256: [u8; 32],
}

/// A deployed machine's code, for work outside the log (JSON translation).
#[derive(Clone)]
pub struct PluginInfo {
    /// The loaded plugin.
    pub plugin: Plugin,
    /// The runtime it was loaded into.
    pub runtime: Runtime,
}

/// Deployed state machines and client sessions.
pub struct Machines {
    machines: BTreeMap<String, Deployed>,
    /// One runtime per distinct set of limits (limits are per engine).
    engines: Engines,
    sessions: Sessions<Reply>,
    /// Members' addresses, replicated state like the sessions.
    addresses: AddressBook,
    applied: u64,
    last_timestamp_ms: u64,
    /// Machines' code or limits changed since [`Machines::take_code_changed`].
    code_changed: bool,
    metrics: Arc<Metrics>,
}

/// Most machines a cluster runs. The pools hold two instances per machine
/// (a rebuild overlaps the old instance), so this keeps every pool at half
/// its size: running out of instances, a local failure, cannot happen
/// through deploys. Decided from replicated state only, so every replica
/// refuses the same deploy.
pub const MAX_MACHINES: usize = 8;

/// Most distinct sets of limits (one engine each) a cluster runs.
pub const MAX_LIMIT_SETS: usize = 4;

/// One command waiting in a batch.
struct Pending {
    ctx: ApplyContext,
    session: Option<SessionSeq>,
    command: Bytes,
}

impl Machines {
    /// An empty registry running machines on `engines`.
    pub fn new(engines: Engines) -> Self {
        Self {
            machines: BTreeMap::new(),
            engines,
            sessions: Sessions::default(),
            addresses: AddressBook::default(),
            applied: 0,
            last_timestamp_ms: 0,
            code_changed: false,
            metrics: Arc::default(),
        }
    }

    /// Reports applies, fuel and time per machine to `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Log time of the last entry applied.
    pub fn last_timestamp_ms(&self) -> u64 {
        self.last_timestamp_ms
    }

    /// The runtimes machines run on.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    /// Whether a machine was deployed, upgraded, moved to other limits or
    /// removed since the last call.
    pub fn take_code_changed(&mut self) -> bool {
        std::mem::take(&mut self.code_changed)
    }

    /// Highest index applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Number of open sessions.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// The members' addresses, as the log has them so far.
    pub fn addresses(&self) -> &AddressBook {
        &self.addresses
    }

    /// The deployed machines.
    pub fn status(&self) -> Vec<MachineStatus> {
        self.machines
            .iter()
            .map(|(name, d)| MachineStatus {
                name: name.clone(),
                sha256: d.sha256.clone(),
                deployed_at: d.deployed_at(),
            })
            .collect()
    }

    /// Every machine as `kythira plugins` lists it. Reads each state with
    /// `get-state` on the machine's instance (a local call, like a query).
    pub fn reports(&mut self) -> Vec<PluginReport> {
        let applied = self.applied;
        self.machines
            .iter_mut()
            .map(|(name, d)| {
                let (state, error) = match d.machine.unavailable() {
                    Some(why) => (None, Some(format!("unavailable: {why}"))),
                    None => match d.machine.get_state().result {
                        Ok(state) => (Some(state), None),
                        Err(e) => (None, Some(format!("get-state failed: {e}"))),
                    },
                };
                PluginReport {
                    name: name.clone(),
                    sha256: d.sha256.clone(),
                    wit: kythira_runtime::WIT_PACKAGE.to_string(),
                    limits: LimitsReport {
                        apply_fuel: d.limits.apply_fuel,
                        query_fuel: d.limits.query_fuel,
                        snapshot_fuel: d.limits.snapshot_fuel,
                        memory_bytes: d.limits.memory_bytes as u64,
                    },
                    history: d.history.clone(),
                    applied,
                    state_bytes: state.as_ref().map(|s| s.len() as u64),
                    state_sha256: state.as_ref().map(|s| hex(&Sha256::digest(s))),
                    error,
                }
            })
            .collect()
    }

    /// A copy of machine `name`'s state and code, without a plugin call.
    pub fn fork(&self, name: &str) -> Option<Fork> {
        self.machines.get(name).map(|d| Fork {
            image: d.machine.image(),
            plugin: d.plugin.clone(),
            runtime: d.runtime.clone(),
            sha256: d.sha256.clone(),
            applied: self.applied,
            last_timestamp_ms: self.last_timestamp_ms,
        })
    }

    /// The code of machine `name`, if deployed.
    pub fn plugin(&self, name: &str) -> Option<PluginInfo> {
        self.machines.get(name).map(|d| PluginInfo {
            plugin: d.plugin.clone(),
            runtime: d.runtime.clone(),
        })
    }

    /// The replicated state as a snapshot holds it: a copy of the sessions
    /// and of the commands since each machine's checkpoint, and references
    /// to the checkpoints and components. No plugin call.
    pub fn image(&self) -> Image {
        let mut components = BTreeMap::new();
        let machines = self
            .machines
            .iter()
            .map(|(name, d)| {
                components.insert(d.sha256.clone(), d.component.clone());
                let record = MachineRecord {
                    sha256: d.sha256.clone(),
                    history: d.history.clone(),
                    limits: d.limits.into(),
                    state: d.machine.image().into(),
                };
                (name.clone(), record)
            })
            .collect();
        Image {
            format: image::FORMAT,
            applied: self.applied,
            last_timestamp_ms: self.last_timestamp_ms,
            sessions: self.sessions.clone(),
            addresses: self.addresses.clone(),
            components,
            machines,
        }
    }

    /// Rebuilds the replicated state a snapshot holds: each machine's code
    /// loaded (compiled plugins are cached under `cache_dir`) and its state
    /// restored and replayed as on the replica that took it.
    pub fn from_image(
        image: Image,
        engines: Engines,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut restored = Self::new(engines).with_metrics(metrics);
        restored.applied = image.applied;
        restored.last_timestamp_ms = image.last_timestamp_ms;
        restored.sessions = image.sessions;
        restored.addresses = image.addresses;
        for (name, record) in image.machines {
            let component = image.components.get(&record.sha256).ok_or_else(|| {
                format!(
                    "machine {name} runs code {} the snapshot lacks",
                    record.sha256
                )
            })?;
            if hex(&Sha256::digest(component)) != record.sha256 {
                return Err(format!(
                    "the code of machine {name} does not match its sha256"
                ));
            }
            let limits = Limits::try_from(record.limits)?;
            let runtime = restored
                .engines
                .runtime(limits)
                .map_err(|e| format!("machine {name}: {e}"))?;
            let plugin = runtime
                .load(component)
                .map_err(|e| format!("machine {name}: {e}"))?;
            let machine = runtime
                .resume(&plugin, &(&record.state).into())
                .map_err(|e| format!("machine {name}: {e}"))?;
            restored.metrics.machine_deployed(&name);
            restored.machines.insert(
                name,
                Deployed {
                    machine,
                    plugin,
                    component: component.clone(),
                    runtime,
                    limits,
                    sha256: record.sha256,
                    history: record.history,
                },
            );
        }
        restored.retain_engines();
        Ok(restored)
    }

    /// Runs a read-only query against machine `name`.
    pub fn query(&mut self, name: &str, query: &[u8]) -> Result<Bytes, ApiError> {
        let d = self
            .machines
            .get_mut(name)
            .ok_or_else(|| ApiError::UnknownMachine(name.to_string()))?;
        d.machine.query(query).result.map_err(call_error)
    }

    /// Applies committed entries, in order, and returns one answer per
    /// `Normal` entry, in log order.
    ///
    /// # Panics
    /// If the entries do not follow the last applied one, or the runtime
    /// fails locally (not deterministically): this replica would diverge, so
    /// it stops, and replays the log when restarted.
    pub fn apply(&mut self, entries: &[Entry]) -> Vec<Answer> {
        let mut answers = Vec::with_capacity(entries.len());
        let mut run: Option<(String, Vec<Pending>)> = None;
        let mut in_run: HashSet<(u64, u64)> = HashSet::new();
        for e in entries {
            assert_eq!(e.index, self.applied + 1, "entries applied out of order");
            self.applied = e.index;
            // No-ops and configuration entries are the core's own.
            if e.kind != EntryKind::Normal {
                continue;
            }
            let env = match Envelope::decode(e.index, &e.data) {
                Ok(env) => env,
                Err(err) => {
                    // Every replica refuses the same bytes the same way.
                    tracing::error!(index = e.index, "skipping an entry: {err}");
                    self.flush(&mut run, &mut in_run, &mut answers);
                    answers.push(answer(e, Err(ApiError::BadRequest(err.to_string()))));
                    continue;
                }
            };
            debug_assert!(
                env.timestamp_ms >= self.last_timestamp_ms,
                "log time went back"
            );
            let now = env.timestamp_ms.max(self.last_timestamp_ms);
            self.last_timestamp_ms = now;
            self.sessions.expire(now);
            let ctx = ApplyContext {
                index: e.index,
                term: e.term,
                timestamp_ms: now,
            };
            match env.op {
                Op::Apply {
                    machine,
                    session,
                    command,
                } => {
                    if run.as_ref().is_some_and(|(name, _)| *name != machine)
                        || session.is_some_and(|s| in_run.contains(&(s.id, s.serial)))
                    {
                        self.flush(&mut run, &mut in_run, &mut answers);
                    }
                    if let Some(seq) = session {
                        match self.sessions.admit(seq, now) {
                            Admit::Apply => {}
                            Admit::Duplicate(reply) => {
                                let reply = reply.clone();
                                answers.push(answer(e, reply));
                                continue;
                            }
                            Admit::Expired => {
                                answers.push(answer(e, Err(ApiError::SessionExpired(seq.id))));
                                continue;
                            }
                            Admit::Forgotten => {
                                let why = format!(
                                    "serial {} of session {} was acknowledged already",
                                    seq.serial, seq.id
                                );
                                answers.push(answer(e, Err(ApiError::BadRequest(why))));
                                continue;
                            }
                        }
                        in_run.insert((seq.id, seq.serial));
                    }
                    if !self.machines.contains_key(&machine) {
                        let reply = Err(ApiError::UnknownMachine(machine));
                        if let Some(seq) = session {
                            in_run.remove(&(seq.id, seq.serial));
                            self.sessions.record(seq, reply.clone());
                        }
                        answers.push(answer(e, reply));
                        continue;
                    }
                    run.get_or_insert_with(|| (machine, Vec::new()))
                        .1
                        .push(Pending {
                            ctx,
                            session,
                            command,
                        });
                }
                Op::Deploy {
                    machine,
                    component,
                    sha256,
                    limits,
                } => {
                    self.flush(&mut run, &mut in_run, &mut answers);
                    let change = Change::Deploy(Code { component, sha256 });
                    answers.push(answer(e, self.change(&machine, change, limits, e.index)));
                }
                Op::Upgrade {
                    machine,
                    component,
                    sha256,
                    limits,
                } => {
                    self.flush(&mut run, &mut in_run, &mut answers);
                    let change = Change::Upgrade(Code { component, sha256 });
                    answers.push(answer(e, self.change(&machine, change, limits, e.index)));
                }
                Op::SetLimits { machine, limits } => {
                    self.flush(&mut run, &mut in_run, &mut answers);
                    answers.push(answer(
                        e,
                        self.change(&machine, Change::Limits, limits, e.index),
                    ));
                }
                Op::Undeploy { machine } => {
                    self.flush(&mut run, &mut in_run, &mut answers);
                    answers.push(answer(e, self.undeploy(&machine, e.index)));
                }
                Op::RegisterSession { ttl_ms } => {
                    self.flush(&mut run, &mut in_run, &mut answers);
                    self.sessions.register(e.index, ttl_ms, now);
                    answers.push(answer(e, Ok(Response::Session { id: e.index })));
                }
                // Addresses touch no machine: the run goes on around them.
                Op::SetAddress { id, peer, client } => {
                    let reply = self
                        .addresses
                        .set(id, Addresses { peer, client })
                        .map(|()| recorded(e.index))
                        .map_err(|err| ApiError::Membership(err.to_string()));
                    answers.push(answer(e, reply));
                }
                Op::RemoveMember { id } => {
                    self.addresses.remove(id, e.index);
                    answers.push(answer(e, Ok(recorded(e.index))));
                }
            }
        }
        self.flush(&mut run, &mut in_run, &mut answers);
        // Entries answered without the plugin (duplicates, refusals) answer
        // before the run they sit in is flushed: restore log order.
        answers.sort_by_key(|a| a.index);
        answers
    }

    /// Applies the batched commands of one machine.
    fn flush(
        &mut self,
        run: &mut Option<(String, Vec<Pending>)>,
        in_run: &mut HashSet<(u64, u64)>,
        answers: &mut Vec<Answer>,
    ) {
        in_run.clear();
        let Some((name, pending)) = run.take() else {
            return;
        };
        let d = self
            .machines
            .get_mut(&name)
            .expect("commands join a run only for deployed machines");
        let batch: Vec<(ApplyContext, &[u8])> =
            pending.iter().map(|p| (p.ctx, &p.command[..])).collect();
        let started = Instant::now();
        let outcomes = d.machine.apply_batch(&batch);
        assert_eq!(outcomes.len(), pending.len(), "one outcome per command");
        let fuel = outcomes.iter().map(|o| o.fuel_used).sum();
        self.metrics
            .machine_applied(&name, pending.len() as u64, fuel, started.elapsed());
        for (p, outcome) in pending.iter().zip(outcomes) {
            let reply = match outcome.result {
                Ok(output) => Ok(Response::Applied {
                    index: p.ctx.index,
                    output: Payload::Bytes(output),
                }),
                Err(err) => Err(call_error(local_failure_stops(err, p.ctx.index))),
            };
            if let Some(seq) = p.session {
                self.sessions.record(seq, reply.clone());
            }
            answers.push(Answer {
                index: p.ctx.index,
                term: p.ctx.term,
                reply,
            });
        }
    }

    /// Installs, upgrades or moves machine `name` to other limits, as the
    /// entry at `index` says. Every refusal and failure is the entry's
    /// replicated answer; a local failure stops the node.
    fn change(&mut self, name: &str, change: Change, limits: DeployLimits, index: u64) -> Reply {
        let reply = self.try_change(name, change, limits, index);
        // Refused or not, a runtime built for limits no machine runs goes.
        self.retain_engines();
        reply
    }

    fn try_change(
        &mut self,
        name: &str,
        change: Change,
        limits: DeployLimits,
        index: u64,
    ) -> Reply {
        let refuse = |why: String| Err(ApiError::Deploy(why));
        let (code, kind) = match change {
            Change::Deploy(code) if self.machines.contains_key(name) => {
                (Some(code), ChangeKind::Upgrade)
            }
            Change::Deploy(code) => (Some(code), ChangeKind::Deploy),
            Change::Upgrade(code) => (Some(code), ChangeKind::Upgrade),
            Change::Limits => (None, ChangeKind::Limits),
        };
        if kind != ChangeKind::Deploy && !self.machines.contains_key(name) {
            return Err(ApiError::UnknownMachine(name.to_string()));
        }
        if let Some(code) = &code
            && <[u8; 32]>::from(Sha256::digest(&code.component)) != code.sha256
        {
            return refuse("the component's sha256 does not match the one deployed".into());
        }
        let limits = match self.machines.get(name) {
            Some(d) => resolve_against(limits, d.limits),
            None => resolve(limits),
        };
        if kind == ChangeKind::Deploy && self.machines.len() >= MAX_MACHINES {
            return refuse(format!(
                "the cluster runs {MAX_MACHINES} machines, the most this version supports"
            ));
        }
        // Decided from the machines alone (replicated state), never from
        // which runtimes this node happens to hold.
        let mut sets: Vec<Limits> = self
            .machines
            .iter()
            .filter(|(n, _)| n.as_str() != name)
            .map(|(_, d)| d.limits)
            .chain([limits])
            .collect();
        sets.sort_by_key(|l| (l.apply_fuel, l.query_fuel, l.memory_bytes, l.snapshot_fuel));
        sets.dedup();
        if sets.len() > MAX_LIMIT_SETS {
            return refuse(format!(
                "the cluster's machines use {MAX_LIMIT_SETS} different sets of limits, the most \
                 it may; deploy under limits one of them uses"
            ));
        }
        let runtime = match self.engines.runtime(limits) {
            Ok(r) => r,
            Err(e @ RuntimeError::InvalidConfig(_)) => return refuse(e.to_string()),
            Err(e) => panic!("cannot build a plugin runtime: {e}; stopping rather than diverge"),
        };
        let component = match code {
            Some(code) => code.component,
            None => self.machines[name].component.clone(),
        };
        // Through the registry: if the compile thread is compiling this
        // component, wait for its artifact rather than compile it twice.
        let plugin = match self.engines.compile(limits, &component) {
            Ok((_, p)) => p,
            Err(CompileError::Load(e)) => return refuse(e.to_string()),
            Err(CompileError::Runtime(e)) => {
                panic!("cannot build a plugin runtime: {e}; stopping rather than diverge")
            }
        };
        let sha256 = plugin.hash().to_string();
        match self.machines.get_mut(name) {
            Some(d) if d.sha256 == sha256 && d.limits == limits => {
                // The same code under the same limits (a retry, say):
                // nothing to carry over; the answer names the change that
                // put them in place.
                let index = d.history.last().map_or(index, |c| c.index);
                Ok(Response::Deployed { index, sha256 })
            }
            Some(d) => {
                // A deploy of the code it runs under other limits moves it.
                let kind = if d.sha256 == sha256 {
                    ChangeKind::Limits
                } else {
                    kind
                };
                match d.machine.migrate(&runtime, &plugin, index) {
                    Ok(migration) => {
                        tracing::info!(
                            machine = name,
                            index,
                            change = %kind,
                            from = %d.sha256,
                            to = %sha256,
                            state_bytes = migration.state_bytes,
                            fuel = migration.fuel_used,
                            "machine changed"
                        );
                        d.plugin = plugin;
                        d.component = component;
                        d.runtime = runtime;
                        d.limits = limits;
                        d.sha256.clone_from(&sha256);
                        d.record(CodeChange {
                            index,
                            sha256: sha256.clone(),
                            change: kind,
                        });
                        self.metrics.machine_changed(name, kind, true);
                        self.code_changed = true;
                        Ok(Response::Deployed { index, sha256 })
                    }
                    Err(e) => {
                        let e = local_failure_stops(e, index);
                        tracing::warn!(machine = name, index, change = %kind, "failed, the old code keeps running: {e}");
                        self.metrics.machine_changed(name, kind, false);
                        Err(ApiError::UpgradeFailed {
                            machine: name.to_string(),
                            index,
                            reason: e.to_string(),
                        })
                    }
                }
            }
            None => {
                let machine = match runtime.start(&plugin) {
                    Ok(m) => m,
                    Err(e) => return refuse(local_failure_stops(e, index).to_string()),
                };
                let component = self.shared_component(&sha256, component);
                self.metrics.machine_deployed(name);
                self.machines.insert(
                    name.to_string(),
                    Deployed {
                        machine,
                        plugin,
                        component,
                        runtime,
                        limits,
                        sha256: sha256.clone(),
                        history: vec![CodeChange {
                            index,
                            sha256: sha256.clone(),
                            change: ChangeKind::Deploy,
                        }],
                    },
                );
                self.code_changed = true;
                Ok(Response::Deployed { index, sha256 })
            }
        }
    }

    /// Removes machine `name` and its state; its code goes with the last
    /// machine that runs it.
    fn undeploy(&mut self, name: &str, index: u64) -> Reply {
        if self.machines.remove(name).is_none() {
            return Err(ApiError::UnknownMachine(name.to_string()));
        }
        tracing::info!(machine = name, index, "machine removed");
        self.metrics.machine_removed(name);
        self.code_changed = true;
        self.retain_engines();
        Ok(Response::Undeployed { index })
    }

    /// The bytes of component `sha256` as another machine holds them, so
    /// that a component is kept once however many machines run it.
    fn shared_component(&self, sha256: &str, component: Bytes) -> Bytes {
        self.machines
            .values()
            .find(|d| d.sha256 == sha256)
            .map_or(component, |d| d.component.clone())
    }

    /// Drops the runtimes no machine runs on any more.
    fn retain_engines(&self) {
        let in_use: Vec<Limits> = self.machines.values().map(|d| d.limits).collect();
        self.engines.retain(&in_use);
    }
}

/// A call error as a replicated result; a local runtime failure (not
/// deterministic: other replicas may have succeeded) stops this node, which
/// replays the log when restarted.
fn local_failure_stops(e: CallError, index: u64) -> CallError {
    if let CallError::Internal(why) = &e {
        panic!("local runtime failure at entry {index}: {why}; stopping rather than diverge");
    }
    e
}

/// The limits a deploy entry names, with the built-in defaults for the rest.
/// Defaults are constants, never a node's configuration, so every replica
/// resolves the same limits.
pub fn resolve(limits: DeployLimits) -> Limits {
    resolve_against(limits, Limits::default())
}

/// The limits an entry names, with `base`'s for the rest: an upgrade or a
/// limit change keeps what it does not name of the limits the machine runs
/// under when the entry applies (replicated state), not of those the
/// proposing node had applied when it proposed.
pub fn resolve_against(limits: DeployLimits, base: Limits) -> Limits {
    let d = base;
    Limits {
        apply_fuel: limits.apply_fuel.unwrap_or(d.apply_fuel),
        query_fuel: limits.query_fuel.unwrap_or(d.query_fuel),
        memory_bytes: limits
            .memory_bytes
            .map_or(d.memory_bytes, |m| usize::try_from(m).unwrap_or(usize::MAX)),
        snapshot_fuel: limits.snapshot_fuel.unwrap_or(d.snapshot_fuel),
        ..d
    }
}

/// The answer to an entry the node keeps for itself: only its index matters.
fn recorded(index: u64) -> Response {
    Response::Applied {
        index,
        output: Payload::Bytes(Bytes::new()),
    }
}

fn answer(e: &Entry, reply: Reply) -> Answer {
    Answer {
        index: e.index,
        term: e.term,
        reply,
    }
}

/// A failed call as the client sees it.
pub fn call_error(err: CallError) -> ApiError {
    match err {
        CallError::Plugin(why) => ApiError::Rejected(why),
        other => ApiError::Plugin(other.to_string()),
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String");
    }
    s
}
