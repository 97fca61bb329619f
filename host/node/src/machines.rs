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
use kythira_api::{ApiError, DeployLimits, MachineStatus, Payload, Reply, Response, SessionSeq};
use kythira_raft::{Entry, EntryKind};
use kythira_runtime::{
    ApplyContext, CallError, Limits, Machine, Plugin, Runtime, RuntimeConfig, RuntimeError,
};
use sha2::{Digest, Sha256};

use crate::addresses::{AddressBook, Addresses};
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
    deployed_at: u64,
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
    runtimes: Vec<(Limits, Runtime)>,
    sessions: Sessions<Reply>,
    /// Members' addresses, replicated state like the sessions.
    addresses: AddressBook,
    applied: u64,
    last_timestamp_ms: u64,
    cache_dir: Option<std::path::PathBuf>,
    metrics: Arc<Metrics>,
}

/// Largest machine count one runtime's instance pool is sized for.
const MACHINES_PER_RUNTIME: u32 = 16;

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
    /// An empty registry; compiled plugins are cached under `cache_dir`.
    pub fn new(cache_dir: Option<std::path::PathBuf>) -> Self {
        Self {
            machines: BTreeMap::new(),
            runtimes: Vec::new(),
            sessions: Sessions::default(),
            addresses: AddressBook::default(),
            applied: 0,
            last_timestamp_ms: 0,
            cache_dir,
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

    /// Where compiled plugins are cached.
    pub fn cache_dir(&self) -> Option<std::path::PathBuf> {
        self.cache_dir.clone()
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
                deployed_at: d.deployed_at,
            })
            .collect()
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
                    deployed_at: d.deployed_at,
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
        cache_dir: Option<std::path::PathBuf>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut restored = Self::new(cache_dir).with_metrics(metrics);
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
                    deployed_at: record.deployed_at,
                },
            );
        }
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
                    let reply = self
                        .deploy(&machine, component, sha256, limits, e.index)
                        .map(|sha256| Response::Deployed {
                            index: e.index,
                            sha256,
                        });
                    answers.push(answer(e, reply));
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

    /// Installs or upgrades machine `name`; returns the code's sha256 in hex.
    fn deploy(
        &mut self,
        name: &str,
        component: Bytes,
        sha256: [u8; 32],
        limits: DeployLimits,
        index: u64,
    ) -> Result<String, ApiError> {
        let refuse = |why: String| Err(ApiError::Deploy(why));
        let actual: [u8; 32] = Sha256::digest(&component).into();
        if actual != sha256 {
            return refuse("the component's sha256 does not match the one deployed".into());
        }
        let limits = resolve(limits);
        if !self.machines.contains_key(name) && self.machines.len() >= MAX_MACHINES {
            return refuse(format!(
                "the cluster runs {MAX_MACHINES} machines, the most this version supports"
            ));
        }
        let in_use: Vec<Limits> = self.machines.values().map(|d| d.limits).collect();
        // Engines no machine uses any more (their deploys failed or moved on).
        self.runtimes.retain(|(l, _)| in_use.contains(l));
        if !self.runtimes.iter().any(|(l, _)| *l == limits) && self.runtimes.len() >= MAX_LIMIT_SETS
        {
            return refuse(format!(
                "the cluster's machines use {MAX_LIMIT_SETS} different sets of limits, the most \
                 it may; deploy under limits one of them uses"
            ));
        }
        let runtime = self.runtime(limits)?;
        let plugin = match runtime.load(&component) {
            Ok(p) => p,
            Err(e) => return refuse(e.to_string()),
        };
        let hex = hex(&sha256);
        match self.machines.get_mut(name) {
            Some(d) if d.limits != limits => refuse(format!(
                "{name} runs under other limits (apply fuel {}, query fuel {}, memory {} bytes); \
                 an upgrade keeps them, so deploy without limits or under a new name",
                d.limits.apply_fuel, d.limits.query_fuel, d.limits.memory_bytes
            )),
            Some(d) => {
                if let Err(e) = d.machine.upgrade(&plugin, index) {
                    let e = local_failure_stops(e, index);
                    return refuse(format!("upgrade failed, the old code keeps running: {e}"));
                }
                d.plugin = plugin;
                d.component = component;
                d.sha256 = hex.clone();
                d.deployed_at = index;
                Ok(hex)
            }
            None => {
                let machine = match runtime.start(&plugin) {
                    Ok(m) => m,
                    Err(e) => return refuse(local_failure_stops(e, index).to_string()),
                };
                self.metrics.machine_deployed(name);
                self.machines.insert(
                    name.to_string(),
                    Deployed {
                        machine,
                        plugin,
                        component,
                        runtime,
                        limits,
                        sha256: hex.clone(),
                        deployed_at: index,
                    },
                );
                Ok(hex)
            }
        }
    }

    /// The runtime for `limits`. Limits a runtime refuses are the entry's
    /// replicated error; any other failure to build one is this node's own.
    fn runtime(&mut self, limits: Limits) -> Result<Runtime, ApiError> {
        if let Some((_, r)) = self.runtimes.iter().find(|(l, _)| *l == limits) {
            return Ok(r.clone());
        }
        let runtime = match Runtime::new(RuntimeConfig {
            limits,
            cache_dir: self.cache_dir.clone(),
            max_machines: MACHINES_PER_RUNTIME,
        }) {
            Ok(r) => r,
            Err(e @ RuntimeError::InvalidConfig(_)) => return Err(ApiError::Deploy(e.to_string())),
            Err(e) => panic!("cannot build a plugin runtime: {e}; stopping rather than diverge"),
        };
        self.runtimes.push((limits, runtime.clone()));
        Ok(runtime)
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
    let d = Limits::default();
    Limits {
        apply_fuel: limits.apply_fuel.unwrap_or(d.apply_fuel),
        query_fuel: limits.query_fuel.unwrap_or(d.query_fuel),
        memory_bytes: limits
            .memory_bytes
            .map_or(d.memory_bytes, |m| usize::try_from(m).unwrap_or(usize::MAX)),
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
