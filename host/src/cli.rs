//! The client commands of `kythira`, in etcdctl's conventions: global
//! `--endpoints --cacert --cert --key` (or `KYTHIRA_*` variables), `--json`
//! for machine-readable output, and one line on stderr for an error.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use kythira_api::{Consistency, DeployLimits, NodeStatus, Payload};
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
        let tls = Tls::load(&TlsFiles {
            ca: self.cacert.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
        })?;
        let mut cfg = ClientConfig::new(self.endpoints.clone(), tls);
        cfg.deadline = self.timeout;
        cfg.attempt_timeout = self.timeout.min(Duration::from_secs(5));
        Ok(Client::new(cfg)?)
    }
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
        /// Answer from the node contacted, without asking the leader (may be stale).
        #[arg(long)]
        stale: bool,
    },
}

/// Runs a client command, printing its result.
pub async fn run(conn: &Connection, cmd: ClientCommand) -> anyhow::Result<()> {
    let client = conn.client()?;
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
            stale,
        } => {
            let consistency = if stale {
                Consistency::Stale
            } else {
                Consistency::Linearizable
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
    }
    Ok(())
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
