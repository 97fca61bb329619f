//! `kythira serve`: one node of a cluster.

use std::collections::BTreeMap;

use anyhow::bail;
use kythira_api::{ApiError, Reply, Request};
use kythira_node::node::{SnapshotDone, SnapshotSent, snapshot_dir};
use kythira_node::{Caller, Network, Node, NodeConfig, NodeHandle};
use kythira_raft::Message;
use kythira_storage::SnapshotStore;
use kythira_transport::endpoint::Endpoint;
use kythira_transport::peer::{PeerConfig, PeerNet};
use kythira_transport::pki::{Identity, Role};
use kythira_transport::rpc::RpcServer;
use kythira_transport::tls::Tls;

use crate::config::Config;
use kythira::local::READY;

struct Peers(PeerNet);

impl Network for Peers {
    fn send(&self, m: Message) {
        // A full queue or a broken link drops the message; Raft retries.
        if let Err(e) = self.0.send(m) {
            tracing::trace!("not sent: {e}");
        }
    }

    fn set_peers(&self, peers: &BTreeMap<u64, std::net::SocketAddr>) {
        if let Err(e) = self.0.set_peers(peers) {
            tracing::warn!("peer set not updated: {e}");
        }
    }

    fn send_snapshot(&self, m: Message, done: SnapshotDone) {
        let net = self.0.clone();
        tokio::spawn(async move {
            let outcome = net.send_snapshot(m).await;
            done(
                outcome
                    .map(|sent| SnapshotSent {
                        bytes_sent: sent.bytes_sent,
                        resumed_from: sent.resumed_from,
                    })
                    .map_err(|e| e.to_string()),
            );
        });
    }
}

/// What a certificate allows on the client port: nothing for a node's.
pub fn caller(identity: &Identity) -> Option<Caller> {
    match identity {
        Identity::Client {
            role: Role::Admin, ..
        } => Some(Caller::Admin),
        Identity::Client {
            role: Role::Client, ..
        } => Some(Caller::Client),
        Identity::Node(_) => None,
    }
}

/// The cluster's name in data directories: its CA's fingerprint, short.
fn cluster_id(tls: &Tls) -> String {
    tls.ca_fingerprint()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Files and directories this process creates are its owner's alone: the
/// log, snapshots and identity of a node are nobody else's to read (0600 and
/// 0700, whatever the inherited umask).
fn owner_only() {
    // SAFETY: umask has no failure mode; it only replaces the process's mask.
    unsafe {
        libc::umask(0o077);
    }
}

/// The node's TLS material, checked to be this node's.
fn node_tls(cfg: &Config) -> anyhow::Result<Tls> {
    owner_only();
    let tls = Tls::load(&cfg.tls)?;
    if tls.identity() != &Identity::Node(cfg.id) {
        bail!(
            "{}: the certificate is for {:?}, but this node's id is {}",
            cfg.tls.cert.display(),
            tls.identity(),
            cfg.id
        );
    }
    Ok(tls)
}

/// `kythira init`: creates a new node's data directory, once.
pub fn init(cfg: &Config) -> anyhow::Result<()> {
    let tls = node_tls(cfg)?;
    let cluster = cluster_id(&tls);
    kythira_node::disk::init(&cfg.data_dir, cfg.id, &cluster)?;
    println!(
        "initialized {} for node {} of cluster {cluster}",
        cfg.data_dir.display(),
        cfg.id
    );
    Ok(())
}

/// Serves until the node fails or the process is told to stop.
pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let tls = node_tls(&cfg)?;
    // Before anything is bound: a node on the wrong directory, or on one
    // that lost its state, must not even start talking to its peers.
    let cluster_id = cluster_id(&tls);
    let claim = kythira_node::disk::claim_existing(&cfg.data_dir, cfg.id, &cluster_id)?;
    // Peers and clients on separate endpoints: a flood of client
    // connections cannot crowd out the Raft traffic.
    let peer_endpoint = Endpoint::bind(cfg.peer, &tls)?;
    let client_endpoint = Endpoint::bind(cfg.client, &tls)?;
    let peers: BTreeMap<_, _> = cfg
        .members
        .iter()
        .filter(|(id, _)| **id != cfg.id)
        .map(|(id, m)| (*id, m.peer))
        .collect();
    // One store shared by the node, which writes and installs snapshots, and
    // the peer network, which sends and receives them.
    let snapshots = SnapshotStore::open(snapshot_dir(&cfg.data_dir))?;
    let (net, inbound) = peer_endpoint.start_peers(PeerConfig {
        snapshot_send_rate: cfg.snapshot_send_rate,
        ..PeerConfig::new(cfg.id, peers).with_snapshots(snapshots.clone())
    })?;
    let node = Node::start_claimed(
        NodeConfig {
            id: cfg.id,
            // A joining node learns the voters from the log.
            voters: if cfg.join {
                Vec::new()
            } else {
                cfg.members.keys().copied().collect()
            },
            client_addrs: cfg
                .members
                .iter()
                .map(|(id, m)| (*id, m.client.to_string()))
                .collect(),
            peer_addrs: cfg.members.iter().map(|(id, m)| (*id, m.peer)).collect(),
            lease_reads: cfg.lease_reads,
            data_dir: cfg.data_dir.clone(),
            tick: cfg.tick,
            election_ticks: cfg.election_ticks,
            heartbeat_ticks: cfg.heartbeat_ticks,
            request_timeout: cfg.request_timeout,
            session_ttl: cfg.session_ttl,
            max_component_bytes: cfg.max_component_bytes,
            max_entry_bytes: crate::config::MAX_ENTRY_BYTES,
            snapshot_entries: cfg.snapshot_entries,
            snapshot_bytes: cfg.snapshot_bytes,
            default_limits: cfg.default_limits,
            cluster_id,
            seed: seed(cfg.id),
        },
        claim,
        snapshots,
        Peers(net),
        inbound,
    )?;
    let handle = node.handle.clone();
    client_endpoint.serve_clients(RpcServer::new(move |identity: Identity, req: Request| {
        let handle: NodeHandle = handle.clone();
        async move {
            let reply: Reply = match caller(&identity) {
                Some(caller) => handle.call(caller, req).await,
                None => Err(ApiError::Unauthorized(format!(
                    "{identity} holds a node certificate; clients need a client certificate \
                     (`kythira cert client`)"
                ))),
            };
            reply
        }
    }))?;
    let http = match cfg.http {
        Some(addr) => Some(crate::http::start(addr, &tls, node.handle.clone()).await?),
        None => None,
    };
    match &http {
        Some(h) => println!(
            "{READY} node {} peers {} clients {} http {}",
            cfg.id, cfg.peer, cfg.client, h.addr
        ),
        None => println!(
            "{READY} node {} peers {} clients {}",
            cfg.id, cfg.peer, cfg.client
        ),
    }
    let mut task = node.task;
    let ended = |r: Result<Result<(), kythira_node::NodeError>, tokio::task::JoinError>| match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(anyhow::Error::from(e).context("the node stopped")),
        Err(e) => Err(anyhow::anyhow!("the node's task failed: {e}")),
    };
    let stopped = tokio::select! {
        r = &mut task => ended(r),
        _ = shutdown_signal() => {
            // Bounded: answering what was accepted takes at most a request
            // timeout, a handover two election timeouts; a node that cannot
            // finish in that time stops anyway (its writes are durable as
            // they complete, so nothing acknowledged is lost).
            let election = cfg.tick * 2 * cfg.election_ticks;
            let bound = cfg.request_timeout + 3 * election;
            tracing::info!("stop requested (SIGTERM or Ctrl-C)");
            match tokio::time::timeout(bound, node.handle.shutdown()).await {
                Ok(Ok(Some(to))) => tracing::info!(to, "leadership handed over"),
                Ok(Ok(None)) => tracing::info!("stopped without handing leadership over (not leading, or no voter took it)"),
                Ok(Err(e)) => tracing::warn!("stopping: {e}"),
                Err(_) => tracing::warn!("not stopped cleanly within {bound:?}; stopping anyway"),
            }
            match tokio::time::timeout(election, &mut task).await {
                Ok(r) => ended(r),
                Err(_) => Ok(()),
            }
        }
    };
    client_endpoint.close();
    peer_endpoint.close();
    stopped
}

/// Election timeouts must differ between nodes; the seed only needs to.
fn seed(id: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
