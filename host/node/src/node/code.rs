//! Requests that change a machine's code or limits, or look at it: deploy,
//! upgrade (and its dry run), limits, undeploy and the plugin list.
//!
//! A leader validates and compiles a component before it proposes the entry
//! that carries it, so a component that cannot load is refused with the
//! reason and never reaches the log; the compiled artifact it leaves in the
//! cache is what applying the entry loads. What the entry does is decided at
//! apply, the same on every replica (`machines.rs`).

use bytes::Bytes;
use kythira_api::{
    ApiError, Consistency, DeployLimits, DryRunReport, MigrationReport, Payload, PluginReport,
    Reply, Response,
};
use kythira_runtime::{ApplyContext, CallError, Limits, Plugin, RuntimeError};
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::{NodeHandle, stopped, validate_name};
use crate::applier::Work;
use crate::edge::{Translate, translate_in, translate_out};
use crate::engines::CompileError;
use crate::entry::Op;
use crate::machines::{self, Fork, PluginInfo, call_error};

/// What a deploy-like request asks for.
pub(super) enum CodeRequest {
    /// Install, or upgrade if the machine exists.
    Deploy,
    /// Upgrade; the machine must exist.
    Upgrade,
}

impl NodeHandle {
    /// Validates `component`, then proposes its deploy or upgrade.
    pub(super) async fn deploy(
        &self,
        kind: CodeRequest,
        machine: String,
        component: Bytes,
        limits: DeployLimits,
    ) -> Reply {
        validate_name(&machine)?;
        if component.len() > self.cfg.max_component_bytes {
            return Err(ApiError::Deploy(format!(
                "the component is {} bytes, more than the {} this node accepts",
                component.len(),
                self.cfg.max_component_bytes
            )));
        }
        if matches!(kind, CodeRequest::Upgrade) && !self.is_deployed(&machine) {
            return Err(ApiError::UnknownMachine(machine));
        }
        let (resolved, limits) = self.limits_for(&machine, limits)?;
        self.compile(resolved, component.clone()).await?;
        let sha256: [u8; 32] = Sha256::digest(&component).into();
        self.propose(match kind {
            CodeRequest::Deploy => Op::Deploy {
                machine,
                component,
                sha256,
                limits,
            },
            CodeRequest::Upgrade => Op::Upgrade {
                machine,
                component,
                sha256,
                limits,
            },
        })
        .await
    }

    /// Proposes moving `machine` to other limits.
    pub(super) async fn set_limits(&self, machine: String, limits: DeployLimits) -> Reply {
        if !self.is_deployed(&machine) {
            return Err(ApiError::UnknownMachine(machine));
        }
        let (_, limits) = self.limits_for(&machine, limits)?;
        self.propose(Op::SetLimits { machine, limits }).await
    }

    /// Proposes removing `machine`.
    pub(super) async fn undeploy(&self, machine: String) -> Reply {
        if !self.is_deployed(&machine) {
            return Err(ApiError::UnknownMachine(machine));
        }
        self.propose(Op::Undeploy { machine }).await
    }

    /// Every machine as this node runs it.
    pub(super) async fn plugins(&self) -> Result<Vec<PluginReport>, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.applier
            .send(Work::Plugins { reply })
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Rehearses an upgrade on a copy of this node's state, current as of a
    /// linearizable read: the migration, then `commands` and `queries` on
    /// the migrated copy. Nothing is proposed and no machine is touched.
    pub(super) async fn dry_run(
        &self,
        machine: String,
        component: Bytes,
        commands: Vec<Payload>,
        queries: Vec<Payload>,
    ) -> Reply {
        if component.len() > self.cfg.max_component_bytes {
            return Err(ApiError::Deploy(format!(
                "the component is {} bytes, more than the {} this node accepts",
                component.len(),
                self.cfg.max_component_bytes
            )));
        }
        // One at a time: a rehearsal holds instances from the pool the
        // machines draw on.
        // The permit goes with the rehearsal's thread, which runs on if the
        // request is abandoned.
        let one = self.dry_runs.clone().try_acquire_owned().map_err(|_| {
            ApiError::Unavailable("another dry run is under way on this node".into())
        })?;
        // Everything committed before the request is applied here first.
        self.query(String::new(), Bytes::new(), Consistency::Linearizable)
            .await?;
        let (reply, rx) = oneshot::channel();
        self.applier
            .send(Work::Fork {
                machine: machine.clone(),
                reply,
            })
            .map_err(|_| stopped())?;
        let fork = rx
            .await
            .map_err(|_| stopped())?
            .ok_or_else(|| ApiError::UnknownMachine(machine.clone()))?;
        tokio::task::spawn_blocking(move || {
            let _one = one;
            // Compiled by the machine's own runtime: the copy runs there.
            let plugin = fork
                .runtime
                .load(&component)
                .map_err(|e| ApiError::Deploy(e.to_string()))?;
            rehearse(machine, fork, plugin, commands, queries)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map(Response::DryRun)
    }

    fn is_deployed(&self, machine: &str) -> bool {
        self.shared
            .plugins
            .lock()
            .expect("lock")
            .contains_key(machine)
    }

    /// The limits an entry for `machine` carries, and what they resolve to
    /// on this node now (checked here, so that a bad value is refused before
    /// it is proposed). For a machine this node knows, only the limits asked
    /// for: the rest are the machine's own at apply, which a limit change
    /// this node has not applied yet may still move. For a new machine,
    /// every limit, this node's defaults for those not asked for.
    fn limits_for(
        &self,
        machine: &str,
        asked: DeployLimits,
    ) -> Result<(Limits, DeployLimits), ApiError> {
        let current = self
            .shared
            .plugins
            .lock()
            .expect("lock")
            .get(machine)
            .map(|info| *info.runtime.limits());
        let (resolved, entry) = match current {
            Some(base) => (machines::resolve_against(asked, base), asked),
            None => {
                let d = self.cfg.default_limits;
                let resolved = machines::resolve(DeployLimits {
                    apply_fuel: asked.apply_fuel.or(d.apply_fuel),
                    query_fuel: asked.query_fuel.or(d.query_fuel),
                    memory_bytes: asked.memory_bytes.or(d.memory_bytes),
                    snapshot_fuel: asked.snapshot_fuel.or(d.snapshot_fuel),
                });
                let complete = DeployLimits {
                    apply_fuel: Some(resolved.apply_fuel),
                    query_fuel: Some(resolved.query_fuel),
                    memory_bytes: Some(resolved.memory_bytes as u64),
                    snapshot_fuel: Some(resolved.snapshot_fuel),
                };
                (resolved, complete)
            }
        };
        resolved
            .validate()
            .map_err(|e| ApiError::Deploy(e.to_string()))?;
        Ok((resolved, entry))
    }

    /// Validates, compiles and instantiates `component` as applying it
    /// will, off the event loop: a component whose instantiation fails
    /// (a start function that traps, an initial memory over the cap) would
    /// fail at apply on every replica, so it is refused here.
    async fn compile(&self, limits: Limits, component: Bytes) -> Result<(), ApiError> {
        // One at a time, with the permit held until the work ends (it runs
        // on if the request is abandoned): the trial start takes an
        // instance from the pool the machines draw on.
        let one = self
            .trials
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopped())?;
        let engines = self.engines.clone();
        tokio::task::spawn_blocking(move || {
            let _one = one;
            let (runtime, plugin) = engines.compile(limits, &component).map_err(|e| match e {
                CompileError::Load(e) => ApiError::Deploy(e.to_string()),
                CompileError::Runtime(e @ RuntimeError::InvalidConfig(_)) => {
                    ApiError::Deploy(e.to_string())
                }
                CompileError::Runtime(e) => ApiError::Internal(e.to_string()),
            })?;
            match runtime.start(&plugin) {
                Ok(_) => Ok(()),
                Err(CallError::Internal(why)) => Err(ApiError::Unavailable(format!(
                    "no instance to try the component in: {why}"
                ))),
                Err(e) => Err(ApiError::Deploy(format!(
                    "the component fails when it starts: {e}"
                ))),
            }
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
    }
}

/// The dry run proper, on a blocking thread.
fn rehearse(
    machine: String,
    fork: Fork,
    plugin: Plugin,
    commands: Vec<Payload>,
    queries: Vec<Payload>,
) -> Result<DryRunReport, ApiError> {
    let mut report = DryRunReport {
        machine,
        at_index: fork.applied,
        from_sha256: fork.sha256,
        to_sha256: plugin.hash().to_string(),
        migration: Err(String::new()),
        commands: Vec::new(),
        queries: Vec::new(),
    };
    let local = |e: kythira_runtime::CallError| match e {
        kythira_runtime::CallError::Internal(why) => {
            ApiError::Unavailable(format!("no instance for the dry run: {why}"))
        }
        other => ApiError::Internal(format!("the machine's copy does not rebuild: {other}")),
    };
    let mut copy = fork
        .runtime
        .resume(&fork.plugin, &fork.image)
        .map_err(local)?;
    // The upgrade entry would come next in the log.
    let index = fork.applied + 1;
    match copy.upgrade(&plugin, index) {
        Ok(m) => {
            report.migration = Ok(MigrationReport {
                fuel_used: m.fuel_used,
                micros: u64::try_from(m.duration.as_micros()).unwrap_or(u64::MAX),
                state_bytes: m.state_bytes as u64,
            })
        }
        Err(kythira_runtime::CallError::Internal(why)) => {
            return Err(ApiError::Unavailable(format!(
                "no instance for the dry run: {why}"
            )));
        }
        Err(e) => {
            report.migration = Err(e.to_string());
            return Ok(report);
        }
    }
    let new = PluginInfo {
        plugin,
        runtime: fork.runtime,
    };
    for (i, command) in commands.into_iter().enumerate() {
        let json = command.is_json();
        let answer = to_bytes(&new, Translate::Command, command).and_then(|bytes| {
            let ctx = ApplyContext {
                index: index + 1 + i as u64,
                term: 0,
                timestamp_ms: fork.last_timestamp_ms,
            };
            let output = copy.apply(ctx, &bytes).result.map_err(call_error)?;
            to_json(&new, Translate::Response, output, json)
        });
        report.commands.push(answer);
    }
    for query in queries {
        let json = query.is_json();
        let answer = to_bytes(&new, Translate::Query, query).and_then(|bytes| {
            let output = copy.query(&bytes).result.map_err(call_error)?;
            to_json(&new, Translate::QueryResponse, output, json)
        });
        report.queries.push(answer);
    }
    Ok(report)
}

fn to_bytes(info: &PluginInfo, direction: Translate, payload: Payload) -> Result<Bytes, ApiError> {
    match payload {
        Payload::Bytes(b) => Ok(b),
        Payload::Json(json) => translate_in(info, direction, json),
    }
}

fn to_json(
    info: &PluginInfo,
    direction: Translate,
    output: Bytes,
    json: bool,
) -> Result<Payload, ApiError> {
    if json {
        translate_out(info, direction, &output).map(Payload::Json)
    } else {
        Ok(Payload::Bytes(output))
    }
}
