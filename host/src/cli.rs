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

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Show every endpoint's view of the cluster.
    Status,
    /// Deploy (or upgrade) a state machine's code.
    Deploy {
        /// Name of the state machine.
        machine: String,
        /// The component (.wasm).
        component: PathBuf,
        /// Fuel for one apply.
        #[arg(long)]
        apply_fuel: Option<u64>,
        /// Fuel for one query.
        #[arg(long)]
        query_fuel: Option<u64>,
        /// Memory limit in MiB.
        #[arg(long)]
        memory_mib: Option<u64>,
    },
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
        ClientCommand::Members(_) | ClientCommand::Transfer { .. } => {
            conn.client_waiting(conn.timeout)?
        }
        _ => conn.client()?,
    };
    match cmd {
        ClientCommand::Status => {
            let mut statuses = Vec::new();
            for ep in &conn.endpoints {
                statuses.push((ep, client.status_of(*ep).await));
            }
            if conn.json {
                let all: Vec<serde_json::Value> = statuses
                    .iter()
                    .map(|(ep, s)| match s {
                        Ok(s) => serde_json::json!({"endpoint": ep.to_string(), "status": s}),
                        Err(e) => {
                            serde_json::json!({"endpoint": ep.to_string(), "error": e.to_string()})
                        }
                    })
                    .collect();
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for (ep, s) in &statuses {
                    match s {
                        Ok(s) => println!("{}", status_line(ep, s)),
                        Err(e) => println!("{ep}: unreachable: {e}"),
                    }
                }
            }
            if statuses.iter().all(|(_, s)| s.is_err()) {
                anyhow::bail!("no endpoint answered");
            }
        }
        ClientCommand::Deploy {
            machine,
            component,
            apply_fuel,
            query_fuel,
            memory_mib,
        } => {
            let bytes = std::fs::read(&component)
                .with_context(|| format!("cannot read {}", component.display()))?;
            let limits = DeployLimits {
                apply_fuel,
                query_fuel,
                memory_bytes: memory_mib.map(|m| m.saturating_mul(1 << 20)),
            };
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

fn status_line(ep: &SocketAddr, s: &NodeStatus) -> String {
    let leader = s.leader.map_or("none".to_string(), |l| l.to_string());
    let machines: Vec<String> = s
        .machines
        .iter()
        .map(|m| format!("{}@{}", m.name, &m.sha256[..12.min(m.sha256.len())]))
        .collect();
    format!(
        "{ep}: node {} {} term {} leader {leader} commit {} applied {} machines [{}]",
        s.id,
        s.role,
        s.term,
        s.commit,
        s.applied,
        machines.join(", ")
    )
}
