//! The client commands of `kythira`, in etcdctl's conventions: global
//! `--endpoints --cacert --cert --key` (or `KYTHIRA_*` variables), `--json`
//! for machine-readable output, and one line on stderr for an error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use kythira_api::{Consistency, DeployLimits, Members, NodeStatus, Payload};
use kythira_client::{Client, ClientConfig};
use kythira_transport::tls::{Tls, TlsFiles};

/// How to reach the cluster.
#[derive(Clone, Debug, Args)]
pub struct Connection {
    /// Nodes to contact, comma-separated host:port.
    #[arg(
        long,
        global = true,
        env = "KYTHIRA_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7001"
    )]
    pub endpoints: Vec<SocketAddr>,
    /// The cluster CA certificate.
    #[arg(
        long,
        global = true,
        env = "KYTHIRA_CACERT",
        default_value = "certs/ca.pem"
    )]
    pub cacert: PathBuf,
    /// This client's certificate.
    #[arg(
        long,
        global = true,
        env = "KYTHIRA_CERT",
        default_value = "certs/admin.pem"
    )]
    pub cert: PathBuf,
    /// This client's private key.
    #[arg(
        long,
        global = true,
        env = "KYTHIRA_KEY",
        default_value = "certs/admin-key.pem"
    )]
    pub key: PathBuf,
    /// How long a command may retry (leader changes), e.g. `30s`, `500ms`.
    #[arg(long, global = true, env = "KYTHIRA_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    /// A client for these endpoints and certificates.
    pub fn client(&self) -> anyhow::Result<Client> {
        self.client_waiting(self.timeout.min(Duration::from_secs(5)))
    }

    /// A client whose every attempt may wait `attempt`: a membership change
    /// or a transfer is answered only once it has taken effect.
    fn client_waiting(&self, attempt: Duration) -> anyhow::Result<Client> {
        let tls = Tls::load(&TlsFiles {
            ca: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        })?;
        let mut cfg = ClientConfig::new(self.endpoints.clone(), tls);
        cfg.deadline = self.timeout;
        cfg.attempt_timeout = attempt;
        Ok(Client::new(cfg)?)
    }
}

/// `query --consistency`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadMode {
    /// Confirmed with a quorum (ReadIndex); any node serves it.
    Linearizable,
    /// From the leader lease, without a round of heartbeats; the leader serves it.
    Lease,
    /// Whatever the node asked has applied.
    Stale,
}

/// `kythira members …`.
#[derive(Debug, Subcommand)]
pub enum MembersCommand {
    /// List the members as the leader sees them: role, addresses, lag.
    List,
    /// Add a node that was started with `join = true` as a learner: it
    /// receives the log but does not vote. Its addresses are replicated.
    AddLearner {
        /// The new node's id (the one in its certificate).
        id: u64,
        /// Its peer (Raft) address, ip:port.
        #[arg(long)]
        peer: SocketAddr,
        /// Its client address, ip:port.
        #[arg(long)]
        client: SocketAddr,
    },
    /// Make a learner a voter once it has caught up (waits up to the
    /// nodes' request timeout, then refuses with its lag).
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Remove a voter or learner; it stops serving. Removing the leader
    /// hands leadership to another voter first.
    Remove {
        /// The member's id.
        id: u64,
    },
}

/// The limits a deploy or a limit change may name; those left out keep the
/// machine's (or, for a new machine, the node's defaults).
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Fuel for one apply.
    #[arg(long)]
    apply_fuel: Option<u64>,
    /// Fuel for one query.
    #[arg(long)]
    query_fuel: Option<u64>,
    /// Memory limit in MiB.
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Fuel for one get-state or restore (checkpoints, snapshots, upgrades).
    #[arg(long)]
    snapshot_fuel: Option<u64>,
}

impl LimitArgs {
    fn deploy_limits(&self) -> DeployLimits {
        DeployLimits {
            apply_fuel: self.apply_fuel,
            query_fuel: self.query_fuel,
            memory_bytes: self.memory_mib.map(|m| m.saturating_mul(1 << 20)),
            snapshot_fuel: self.snapshot_fuel,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Show every endpoint's view of the cluster: one row per node with its
    /// role, term, leader, indexes and how far it is behind the leader.
    Status,
    /// Deploy (or upgrade) a state machine's code.
    Deploy {
        /// Name of the state machine.
        machine: String,
        /// The component (.wasm).
        component: PathBuf,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Upgrade a state machine's code. Every replica hands the state from
    /// the old code to the new at the same log index, or keeps the old code
    /// if that fails. With `--dry-run`, rehearse it on one node instead.
    Upgrade {
        /// Name of the state machine.
        machine: String,
        /// The new component (.wasm).
        component: PathBuf,
        /// Run the migration against a copy of the current state on one node
        /// (the first endpoint that answers) and report, changing nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: a command (JSON) to apply to the migrated copy;
        /// repeat for several, applied in order.
        #[arg(long = "command", requires = "dry_run")]
        commands: Vec<String>,
        /// With --dry-run: a query (JSON) to run on the migrated copy after
        /// the commands; repeat for several.
        #[arg(long = "query", requires = "dry_run")]
        queries: Vec<String>,
    },
    /// Change a state machine's limits; its state moves over at one log index.
    Limits {
        /// Name of the state machine.
        machine: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Remove a state machine and its state.
    Undeploy {
        /// Name of the state machine.
        machine: String,
    },
    /// List the state machines as one node runs them (the first endpoint
    /// that answers): code hash, WIT version, history, limits, state size
    /// and hash.
    Plugins,
    /// Apply a command, given as JSON, to a state machine.
    Apply {
        /// Name of the state machine.
        machine: String,
        /// The command, e.g. '{"put":{"key":"a","value":"1"}}' for kv.
        command: String,
        /// Apply within a session: retried through failures, applied once.
        #[arg(long)]
        exactly_once: bool,
    },
    /// Run a query, given as JSON, against a state machine.
    Query {
        /// Name of the state machine.
        machine: String,
        /// The query, e.g. '{"get":{"key":"a"}}' for kv.
        query: String,
        /// How fresh the answer must be: `linearizable` (confirmed with a
        /// quorum; any node answers), `lease` (the leader answers from its
        /// lease, without a round of heartbeats) or `stale` (the node asked
        /// answers from what it has applied).
        #[arg(
            long,
            value_enum,
            default_value = "linearizable",
            conflicts_with = "stale"
        )]
        consistency: ReadMode,
        /// Same as `--consistency stale`.
        #[arg(long)]
        stale: bool,
    },
    /// List, add, promote or remove members.
    #[command(subcommand)]
    Members(MembersCommand),
    /// Hand leadership to a caught-up voter; answers once it leads.
    Transfer {
        /// The voter's id.
        id: u64,
    },
}

/// Runs a client command, printing its result.
pub async fn run(conn: &Connection, cmd: ClientCommand) -> anyhow::Result<()> {
    let client = match cmd {
        // Answered once carried out: a membership change, a transfer, or
        // code compiled, migrated or serialized on the node.
        ClientCommand::Members(_)
        | ClientCommand::Transfer { .. }
        | ClientCommand::Deploy { .. }
        | ClientCommand::Upgrade { .. }
        | ClientCommand::Limits { .. }
        | ClientCommand::Plugins => conn.client_waiting(conn.timeout)?,
        _ => conn.client()?,
    };
    match cmd {
        ClientCommand::Status => {
            let mut statuses = Vec::new();
            for ep in &conn.endpoints {
                let status = client.status_of(*ep).await.map_err(|e| e.to_string());
                statuses.push((*ep, status));
            }
            let leader_commit = leader_commit(&statuses);
            if conn.json {
                let all: Vec<serde_json::Value> = statuses
                    .iter()
                    .map(|(ep, s)| match s {
                        Ok(s) => serde_json::json!({
                            "endpoint": ep.to_string(),
                            "status": s,
                            "lag": leader_commit.map(|c| c.saturating_sub(s.applied)),
                        }),
                        Err(e) => serde_json::json!({"endpoint": ep.to_string(), "error": e}),
                    })
                    .collect();
                println!("{}", serde_json::to_string(&all)?);
            } else {
                print!("{}", status_table(&statuses));
            }
            if statuses.iter().all(|(_, s)| s.is_err()) {
                anyhow::bail!("no endpoint answered");
            }
        }
        ClientCommand::Deploy {
            machine,
            component,
            limits,
        } => {
            let bytes = std::fs::read(&component)
                .with_context(|| format!("cannot read {}", component.display()))?;
            let limits = limits.deploy_limits();
            let (index, sha256) = client.deploy(&machine, Bytes::from(bytes), limits).await?;
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({"machine": machine, "index": index, "sha256": sha256})
                );
            } else {
                println!("deployed {machine} at index {index}, sha256 {sha256}");
            }
        }
        ClientCommand::Upgrade {
            machine,
            component,
            dry_run,
            commands,
            queries,
        } => {
            let bytes = Bytes::from(
                std::fs::read(&component)
                    .with_context(|| format!("cannot read {}", component.display()))?,
            );
            if dry_run {
                let report = client
                    .dry_run_upgrade(
                        &machine,
                        bytes,
                        commands.into_iter().map(Payload::Json).collect(),
                        queries.into_iter().map(Payload::Json).collect(),
                    )
                    .await?;
                if conn.json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    print!("{}", dry_run_text(&report));
                }
                if let Err(why) = &report.migration {
                    anyhow::bail!("the migration would fail: {why}");
                }
            } else {
                let (index, sha256) = client
                    .upgrade(&machine, bytes, DeployLimits::default())
                    .await?;
                if conn.json {
                    println!(
                        "{}",
                        serde_json::json!({"machine": machine, "index": index, "sha256": sha256})
                    );
                } else {
                    println!("upgraded {machine} at index {index}, sha256 {sha256}");
                }
            }
        }
        ClientCommand::Limits { machine, limits } => {
            let index = client.set_limits(&machine, limits.deploy_limits()).await?;
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({"machine": machine, "index": index})
                );
            } else {
                println!("{machine} runs under the new limits from index {index}");
            }
        }
        ClientCommand::Undeploy { machine } => {
            let index = client.undeploy(&machine).await?;
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({"machine": machine, "index": index})
                );
            } else {
                println!("removed {machine} at index {index}");
            }
        }
        ClientCommand::Plugins => {
            let mut last = None;
            let mut plugins = None;
            for ep in &conn.endpoints {
                match client.plugins_of(*ep).await {
                    Ok(p) => {
                        plugins = Some(p);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let Some(plugins) = plugins else {
                anyhow::bail!(
                    "no endpoint answered: {}",
                    last.map(|e| e.to_string()).unwrap_or_default()
                );
            };
            if conn.json {
                println!("{}", serde_json::to_string(&plugins)?);
            } else {
                print!("{}", plugins_text(&plugins));
            }
        }
        ClientCommand::Apply {
            machine,
            command,
            exactly_once,
        } => {
            let command = Payload::Json(command);
            let (index, output) = if exactly_once {
                client.session().await?.apply(&machine, command).await?
            } else {
                client.apply(&machine, command).await?
            };
            let output = json_text(&output);
            if conn.json {
                println!("{{\"index\":{index},\"output\":{output}}}");
            } else {
                println!("{output}");
            }
        }
        ClientCommand::Query {
            machine,
            query,
            consistency,
            stale,
        } => {
            let consistency = match (stale, consistency) {
                (true, _) | (_, ReadMode::Stale) => Consistency::Stale,
                (false, ReadMode::Lease) => Consistency::Lease,
                (false, ReadMode::Linearizable) => Consistency::Linearizable,
            };
            let output = client
                .query(&machine, Payload::Json(query), consistency)
                .await?;
            let output = json_text(&output);
            if conn.json {
                println!("{{\"output\":{output}}}");
            } else {
                println!("{output}");
            }
        }
        ClientCommand::Members(cmd) => {
            let members = match cmd {
                MembersCommand::List => client.members().await?,
                MembersCommand::AddLearner {
                    id,
                    peer,
                    client: addr,
                } => client.add_learner(id, peer, addr).await?,
                MembersCommand::Promote { id } => client.promote(id).await?,
                MembersCommand::Remove { id } => client.remove_member(id).await?,
            };
            if conn.json {
                println!("{}", serde_json::to_string(&members)?);
            } else {
                print!("{}", members_table(&members));
            }
        }
        ClientCommand::Transfer { id } => {
            let (leader, term) = client.transfer_leadership(id).await?;
            if conn.json {
                println!("{}", serde_json::json!({"leader": leader, "term": term}));
            } else {
                println!("node {leader} leads term {term}");
            }
        }
    }
    Ok(())
}

/// A dry run's report, for people.
fn dry_run_text(r: &kythira_api::DryRunReport) -> String {
    let mut out = format!(
        "dry run: upgrade {} from {} to {} on the state at index {}\n",
        r.machine, r.from_sha256, r.to_sha256, r.at_index
    );
    match &r.migration {
        Ok(m) => out.push_str(&format!(
            "migration: ok, {} fuel, {:.3} ms, state {} bytes\n",
            m.fuel_used,
            m.micros as f64 / 1000.0,
            m.state_bytes
        )),
        Err(why) => out.push_str(&format!("migration: failed: {why}\n")),
    }
    let answer = |a: &Result<Payload, kythira_api::ApiError>| match a {
        Ok(p) => json_text(p),
        Err(e) => format!("error: {e}"),
    };
    for (i, a) in r.commands.iter().enumerate() {
        out.push_str(&format!("command {}: {}\n", i + 1, answer(a)));
    }
    for (i, a) in r.queries.iter().enumerate() {
        out.push_str(&format!("query {}: {}\n", i + 1, answer(a)));
    }
    out.push_str("nothing was changed\n");
    out
}

/// The state machines, for people.
fn plugins_text(plugins: &[kythira_api::PluginReport]) -> String {
    if plugins.is_empty() {
        return "no state machines are deployed\n".into();
    }
    let mut out = String::new();
    for p in plugins {
        out.push_str(&format!("{}\n  code    {} ({})\n", p.name, p.sha256, p.wit));
        out.push_str(&format!(
            "  limits  apply fuel {}, query fuel {}, snapshot fuel {}, memory {} MiB\n",
            p.limits.apply_fuel,
            p.limits.query_fuel,
            p.limits.snapshot_fuel,
            p.limits.memory_bytes >> 20
        ));
        match (&p.state_bytes, &p.state_sha256, &p.error) {
            (Some(bytes), Some(sha), _) => out.push_str(&format!(
                "  state   {bytes} bytes, sha256 {sha} (at index {})\n",
                p.applied
            )),
            (_, _, Some(e)) => out.push_str(&format!("  state   {e}\n")),
            _ => {}
        }
        for c in &p.history {
            out.push_str(&format!(
                "  {:<8}at index {} to {}\n",
                c.change.to_string(),
                c.index,
                c.sha256
            ));
        }
    }
    out
}

/// One line per member, the leader's view.
fn members_table(m: &Members) -> String {
    let mut out = format!(
        "leader {} term {} configuration at index {}{}{}\n",
        m.leader,
        m.term,
        m.config_index,
        if m.committed { "" } else { " (not committed)" },
        if m.joint { " (joint)" } else { "" },
    );
    for s in &m.members {
        let addr = |a: &Option<String>| a.clone().unwrap_or_else(|| "unknown".into());
        out.push_str(&format!(
            "node {} {} peer {} client {} matched {} lag {}{}\n",
            s.id,
            s.role,
            addr(&s.peer),
            addr(&s.client),
            s.matched,
            s.lag,
            if s.id == m.leader { " (leader)" } else { "" },
        ));
    }
    out
}

/// An answer as JSON text: the plugin's JSON, or, if it could not be
/// translated, its bytes as `{"hex": "…"}`.
fn json_text(output: &Payload) -> String {
    match output {
        Payload::Json(text) => text.clone(),
        Payload::Bytes(_) => serde_json::json!({ "hex": output.to_string() }).to_string(),
    }
}

/// The commit index of the leader among the answers (the one of the
/// highest term, should an old leader not have heard of its successor yet).
fn leader_commit(statuses: &[(SocketAddr, Result<NodeStatus, String>)]) -> Option<u64> {
    statuses
        .iter()
        .filter_map(|(_, s)| s.as_ref().ok())
        .filter(|s| s.role == "leader")
        .max_by_key(|s| s.term)
        .map(|s| s.commit)
}

/// One row per endpoint, columns aligned. `LAG` is how many entries the
/// node's applied index trails the leader's commit index (`-` when no
/// leader answered); `SNAPSHOT` the index of its latest snapshot (0: none).
fn status_table(statuses: &[(SocketAddr, Result<NodeStatus, String>)]) -> String {
    const HEADER: [&str; 11] = [
        "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "LAST", "COMMIT", "APPLIED", "LAG", "SNAPSHOT",
        "MACHINES",
    ];
    let leader_commit = leader_commit(statuses);
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|(ep, s)| match s {
            Ok(s) => {
                let machines: Vec<String> = s
                    .machines
                    .iter()
                    .map(|m| format!("{}@{}", m.name, &m.sha256[..12.min(m.sha256.len())]))
                    .collect();
                vec![
                    ep.to_string(),
                    s.id.to_string(),
                    s.role.clone(),
                    s.term.to_string(),
                    s.leader.map_or("none".to_string(), |l| l.to_string()),
                    s.last_index.to_string(),
                    s.commit.to_string(),
                    s.applied.to_string(),
                    leader_commit
                        .map_or("-".to_string(), |c| c.saturating_sub(s.applied).to_string()),
                    s.snapshot_index.to_string(),
                    if machines.is_empty() {
                        "-".to_string()
                    } else {
                        machines.join(",")
                    },
                ]
            }
            Err(e) => vec![ep.to_string(), format!("unreachable: {e}")],
        })
        .collect();
    // Widths from the complete rows only: an error message runs on.
    let mut widths = HEADER.map(str::len);
    for row in rows.iter().filter(|r| r.len() == HEADER.len()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    widths[0] = rows.iter().map(|r| r[0].len()).fold(widths[0], usize::max);
    let line = |cells: &[String]| {
        let last = cells.len() - 1;
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&HEADER.map(String::from));
    for row in &rows {
        out.push_str(&line(row));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_api::MachineStatus;

    fn node(id: u64, role: &str, term: u64, commit: u64, applied: u64) -> NodeStatus {
        NodeStatus {
            id,
            role: role.into(),
            term,
            leader: Some(2),
            leader_addr: None,
            last_index: commit + 1,
            commit,
            applied,
            machines: vec![MachineStatus {
                name: "kv".into(),
                sha256: "5a7a81c0ffee0123456789".into(),
                deployed_at: 2,
            }],
            sessions: 0,
            protocol: 1,
            snapshot_index: 0,
            first_index: 1,
        }
    }

    fn ep(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn one_aligned_row_per_endpoint_with_its_lag_behind_the_leader() {
        let statuses = vec![
            (ep(7001), Ok(node(1, "follower", 3, 118, 110))),
            (ep(7002), Ok(node(2, "leader", 3, 120, 120))),
            (ep(7003), Err("connection refused".to_string())),
        ];
        let table = status_table(&statuses);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        let cells = |l: &str| l.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            cells(lines[0]),
            [
                "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "LAST", "COMMIT", "APPLIED", "LAG",
                "SNAPSHOT", "MACHINES"
            ]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "127.0.0.1:7001",
                "1",
                "follower",
                "3",
                "2",
                "119",
                "118",
                "110",
                "10",
                "0",
                "kv@5a7a81c0ffee"
            ]
        );
        assert_eq!(cells(lines[2])[8], "0", "{table}");
        assert_eq!(lines[3], "127.0.0.1:7003  unreachable: connection refused");
        // Columns line up: every field starts where its header does.
        let at = |l: &str, word: &str| l.find(word).unwrap();
        assert_eq!(at(lines[0], "APPLIED"), at(lines[1], "110"));
        assert_eq!(at(lines[0], "ROLE"), at(lines[2], "leader"));
    }

    #[test]
    fn the_newest_leader_sets_the_lag_and_none_leaves_it_unknown() {
        let statuses = vec![
            (ep(7001), Ok(node(1, "leader", 2, 50, 50))),
            (ep(7002), Ok(node(2, "leader", 3, 80, 79))),
        ];
        assert_eq!(leader_commit(&statuses), Some(80));
        let table = status_table(&statuses);
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().nth(8),
            Some("30")
        );
        let statuses = vec![(ep(7001), Ok(node(1, "candidate", 4, 50, 50)))];
        assert_eq!(leader_commit(&statuses), None);
        let table = status_table(&statuses);
        assert_eq!(
            table.lines().nth(1).unwrap().split_whitespace().nth(8),
            Some("-")
        );
    }
}
