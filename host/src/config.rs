//! The daemon's TOML configuration: parsing, defaults and validation.
//!
//! Every mistake is reported with the file it is in; an unknown key is an
//! error (a typo must not silently fall back to a default), and timeouts that
//! cannot work together are refused with the amount they are off by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use kythira_transport::frame::DEFAULT_MAX_FRAME;
use kythira_transport::tls::TlsFiles;
use serde::Deserialize;

/// Largest component a deploy may carry: its entry, with the envelope and
/// the Append around it, must fit in one peer frame.
pub const MAX_COMPONENT_MIB: u64 = (DEFAULT_MAX_FRAME as u64 >> 20) - 2;

/// Largest log entry a node proposes: a peer frame less room for the message.
pub const MAX_ENTRY_BYTES: usize = DEFAULT_MAX_FRAME - (1 << 20);

/// `kythira serve --config FILE`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    /// This node's id; must match the id in its certificate. Its addresses
    /// are its entry in `members`.
    pub id: u64,
    /// Where the node keeps its log and compiled plugins.
    pub data_dir: PathBuf,
    /// Address of the HTTP/JSON API, if it is served.
    pub http: Option<SocketAddr>,
    /// This node joins a running cluster: it starts knowing no voters,
    /// receives the log as a learner once an operator adds it (`kythira
    /// members add-learner`), and learns the membership from the log. Keep
    /// it set on later starts.
    #[serde(default)]
    pub join: bool,
    /// Certificates.
    pub tls: TlsSection,
    /// The voters the cluster was founded with, this node included:
    /// `id = { peer = "ip:port", client = "ip:port" }`. Never edited
    /// afterwards: members added or removed later are in the log. A node
    /// that joins lists itself and the members it joins.
    pub members: BTreeMap<String, Member>,
    /// Consensus timing.
    #[serde(default)]
    pub raft: RaftSection,
    /// Limits on what clients may ask.
    #[serde(default)]
    pub limits: LimitsSection,
    /// When the node snapshots its state and compacts its log.
    #[serde(default)]
    pub snapshots: SnapshotsSection,
}

/// `[snapshots]`: every node should use the same values, so that replicas
/// snapshot at the same indexes (a follower can then resume a transfer from
/// any of them).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotsSection {
    /// Snapshot after every entry whose index is a multiple of this
    /// (0: never by count).
    pub every_entries: u64,
    /// Snapshot once the entries applied since the last snapshot point
    /// reach this many MiB (0: never by size).
    pub every_mib: u64,
    /// Most MiB per second one snapshot transfer to a follower sends
    /// (0: unbounded).
    pub send_mib_per_s: f64,
}

impl Default for SnapshotsSection {
    fn default() -> Self {
        Self {
            every_entries: 10_000,
            every_mib: 64,
            send_mib_per_s: 0.0,
        }
    }
}

/// One voter's addresses: Raft traffic and client traffic on separate
/// ports, so that a flood of clients cannot starve heartbeats.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// QUIC port for the other nodes.
    pub peer: SocketAddr,
    /// QUIC port for clients.
    pub client: SocketAddr,
}

/// `[tls]`: paths are relative to the configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The cluster's CA certificate.
    pub ca: PathBuf,
    /// This node's certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// `[raft]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSection {
    /// One tick of the consensus clock, in milliseconds.
    pub tick_ms: u64,
    /// Election timeout in ticks (randomized between this and twice this).
    pub election_ticks: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: u32,
    /// Serve `--consistency lease` reads from the leader lease, without a
    /// round of heartbeats. Must be the same on every node; assumes the
    /// nodes' clocks tick at rates within 5 % of each other.
    pub lease_reads: bool,
}

impl Default for RaftSection {
    fn default() -> Self {
        Self {
            tick_ms: 100,
            election_ticks: 10,
            heartbeat_ticks: 2,
            lease_reads: true,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// How long a request may wait for its commit or read, in milliseconds.
    pub request_timeout_ms: u64,
    /// Idle time after which a client session expires, in seconds of log time.
    pub session_ttl_s: u64,
    /// Largest component a deploy may carry, in MiB.
    pub max_component_mib: u64,
    /// Fuel for one apply of a plugin deployed without its own limit.
    pub apply_fuel: Option<u64>,
    /// Fuel for one query (and one JSON translation) of such a plugin.
    pub query_fuel: Option<u64>,
    /// Memory limit of such a plugin, in MiB.
    pub memory_mib: Option<u64>,
    /// Fuel for one `get-state` or restore (checkpoints, snapshots, upgrades).
    pub snapshot_fuel: Option<u64>,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            request_timeout_ms: 10_000,
            session_ttl_s: 3_600,
            max_component_mib: MAX_COMPONENT_MIB,
            apply_fuel: None,
            query_fuel: None,
            memory_mib: None,
            snapshot_fuel: None,
        }
    }
}

/// A validated configuration, ready to start a node.
#[derive(Debug)]
pub struct Config {
    pub id: u64,
    pub peer: SocketAddr,
    pub client: SocketAddr,
    pub http: Option<SocketAddr>,
    pub data_dir: PathBuf,
    pub tls: TlsFiles,
    pub members: BTreeMap<u64, Member>,
    pub join: bool,
    pub lease_reads: bool,
    pub default_limits: kythira_api::DeployLimits,
    pub tick: Duration,
    pub election_ticks: u32,
    pub heartbeat_ticks: u32,
    pub request_timeout: Duration,
    pub session_ttl: Duration,
    pub max_component_bytes: usize,
    pub snapshot_entries: u64,
    pub snapshot_bytes: u64,
    /// Bytes per second of a snapshot transfer, if bounded.
    pub snapshot_send_rate: Option<u64>,
}

/// Reads and validates the configuration at `path`.
pub fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    parse(&text, path)
}

/// Parses and validates `text`, read from `path` (which relative paths and
/// error messages refer to).
pub fn parse(text: &str, path: &Path) -> anyhow::Result<Config> {
    let file: File = toml::from_str(text).map_err(|e| located(&e, text, path))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let rel = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    let in_file = |why: String| anyhow::anyhow!("{}: {why}", path.display());

    let mut members = BTreeMap::new();
    for (key, addr) in &file.members {
        let id: u64 = key.parse().ok().filter(|id| *id > 0).ok_or_else(|| {
            in_file(format!(
                "members: {key:?} is not a node id (a number from 1)"
            ))
        })?;
        members.insert(id, *addr);
    }
    if file.id == 0 {
        bail!(in_file("id: node id 0 is reserved; ids start at 1".into()));
    }
    let Some(me) = members.get(&file.id).copied() else {
        bail!(in_file(format!(
            "members: this node's id {} is not among the members {:?}",
            file.id,
            members.keys().collect::<Vec<_>>()
        )));
    };
    if file.join && members.len() < 2 {
        bail!(in_file(
            "join = true, but members lists no node to join: list the members of the running \
             cluster beside this node"
                .into()
        ));
    }
    let mut seen = std::collections::HashMap::new();
    for (id, m) in &members {
        for addr in [m.peer, m.client] {
            if let Some(other) = seen.insert(addr, *id) {
                bail!(in_file(format!(
                    "members: {addr} is used twice (by node {other} and node {id}); \
                     every peer and client port must be distinct"
                )));
            }
        }
    }
    let r = &file.raft;
    if r.tick_ms == 0 || r.heartbeat_ticks == 0 {
        bail!(in_file(
            "raft: tick_ms and heartbeat_ticks must be positive".into()
        ));
    }
    let min_election = r.heartbeat_ticks.saturating_mul(3);
    if r.election_ticks < min_election {
        bail!(in_file(format!(
            "raft.election_ticks is {} but must be at least 3 × heartbeat_ticks = {min_election} \
             (short by {}), or followers will start elections between heartbeats",
            r.election_ticks,
            min_election - r.election_ticks
        )));
    }
    // An election can take up to twice the election timeout; a request must
    // be allowed to outlast one.
    let election_ms = (2 * u64::from(r.election_ticks)).saturating_mul(r.tick_ms);
    let l = &file.limits;
    if l.request_timeout_ms < election_ms {
        bail!(in_file(format!(
            "limits.request_timeout_ms is {} ms, shorter than the longest election \
             (2 × {} ticks × {} ms = {election_ms} ms) by {} ms",
            l.request_timeout_ms,
            r.election_ticks,
            r.tick_ms,
            election_ms - l.request_timeout_ms
        )));
    }
    if l.session_ttl_s == 0 || l.max_component_mib == 0 {
        bail!(in_file(
            "limits: session_ttl_s and max_component_mib must be positive".into()
        ));
    }
    if l.max_component_mib > MAX_COMPONENT_MIB {
        bail!(in_file(format!(
            "limits.max_component_mib is {} but at most {MAX_COMPONENT_MIB}: a deploy travels \
             in one log entry, which must fit in one {} MiB peer frame",
            l.max_component_mib,
            DEFAULT_MAX_FRAME >> 20
        )));
    }
    let limits = kythira_api::DeployLimits {
        apply_fuel: l.apply_fuel,
        query_fuel: l.query_fuel,
        memory_bytes: l.memory_mib.map(|m| m.saturating_mul(1 << 20)),
        snapshot_fuel: l.snapshot_fuel,
    };
    let checked = kythira_node::machines::resolve(limits);
    checked
        .validate()
        .map_err(|e| in_file(format!("limits: {e}")))?;
    Ok(Config {
        id: file.id,
        peer: me.peer,
        client: me.client,
        default_limits: limits,
        http: file.http,
        data_dir: rel(&file.data_dir),
        tls: TlsFiles {
            ca: rel(&file.tls.ca),
            cert: rel(&file.tls.cert),
            key: rel(&file.tls.key),
        },
        members,
        join: file.join,
        lease_reads: r.lease_reads,
        tick: Duration::from_millis(r.tick_ms),
        election_ticks: r.election_ticks,
        heartbeat_ticks: r.heartbeat_ticks,
        request_timeout: Duration::from_millis(l.request_timeout_ms),
        session_ttl: Duration::from_secs(l.session_ttl_s),
        max_component_bytes: usize::try_from(l.max_component_mib << 20).unwrap_or(usize::MAX),
        snapshot_entries: file.snapshots.every_entries,
        snapshot_bytes: file.snapshots.every_mib.saturating_mul(1 << 20),
        snapshot_send_rate: send_rate(file.snapshots.send_mib_per_s, path)?,
    })
}

/// `send_mib_per_s` in bytes per second; 0 is unbounded.
fn send_rate(mib_per_s: f64, path: &Path) -> anyhow::Result<Option<u64>> {
    if !mib_per_s.is_finite() || mib_per_s < 0.0 {
        bail!(
            "{}: snapshots.send_mib_per_s must be 0 (unbounded) or a positive number, not {mib_per_s}",
            path.display()
        );
    }
    // A receiver gives a transfer up after 60 s without a 1 MiB chunk.
    if mib_per_s > 0.0 && mib_per_s < 1.0 / 30.0 {
        bail!(
            "{}: snapshots.send_mib_per_s is {mib_per_s}; at least 1/30 (one 1 MiB chunk every \
             30 s), or 0 for unbounded",
            path.display()
        );
    }
    let rate = (mib_per_s * f64::from(1u32 << 20)) as u64;
    Ok((rate > 0).then_some(rate))
}

/// toml's message names the key; say which file and line it is on.
fn located(e: &toml::de::Error, text: &str, path: &Path) -> anyhow::Error {
    match e.span() {
        Some(span) => {
            let line = text[..span.start].matches('\n').count() + 1;
            anyhow::anyhow!("{}:{line}: {}", path.display(), e.message())
        }
        None => anyhow::anyhow!("{}: {}", path.display(), e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = 2
data_dir = "node-2"

[tls]
ca = "certs/ca.pem"
cert = "certs/node-2.pem"
key = "certs/node-2-key.pem"

[members]
1 = { peer = "127.0.0.1:7101", client = "127.0.0.1:7001" }
2 = { peer = "127.0.0.1:7102", client = "127.0.0.1:7002" }
3 = { peer = "127.0.0.1:7103", client = "127.0.0.1:7003" }
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("/etc/kythira/node.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_good_file_parses_with_defaults_and_relative_paths() {
        let c = parse(GOOD, Path::new("/etc/kythira/node.toml")).unwrap();
        assert_eq!(c.id, 2);
        assert_eq!(c.members.len(), 3);
        assert_eq!(c.data_dir, Path::new("/etc/kythira/node-2"));
        assert_eq!(c.tls.ca, Path::new("/etc/kythira/certs/ca.pem"));
        assert_eq!(c.tick, Duration::from_millis(100));
    }

    #[test]
    fn snapshot_settings_parse_and_a_rate_too_slow_for_the_receiver_is_refused() {
        let path = Path::new("/etc/kythira/node.toml");
        let c = parse(GOOD, path).unwrap();
        assert_eq!((c.snapshot_entries, c.snapshot_bytes), (10_000, 64 << 20));
        assert_eq!(c.snapshot_send_rate, None);
        let text = format!("{GOOD}\n[snapshots]\nevery_entries = 50\nsend_mib_per_s = 0.5\n");
        let c = parse(&text, path).unwrap();
        assert_eq!(c.snapshot_entries, 50);
        assert_eq!(c.snapshot_send_rate, Some(1 << 19));
        let e = err(&format!("{GOOD}\n[snapshots]\nsend_mib_per_s = 0.01\n"));
        assert!(e.contains("at least 1/30"), "{e}");
        let e = err(&format!("{GOOD}\n[snapshots]\nsend_mib_per_s = -1.0\n"));
        assert!(e.contains("positive"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_the_file() {
        let e = err(&GOOD.replace("data_dir", "data_dri"));
        assert!(e.contains("/etc/kythira/node.toml"), "{e}");
        assert!(e.contains("data_dri"), "{e}");
        let e = err(&format!("{GOOD}\n[raft]\ntick = 5\n"));
        assert!(e.contains("tick"), "{e}");
    }

    #[test]
    fn timeouts_that_cannot_work_say_by_how_much() {
        let e = err(&format!("{GOOD}\n[raft]\nelection_ticks = 4\n"));
        assert!(e.contains("short by 2"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\nrequest_timeout_ms = 1500\n"));
        assert!(e.contains("by 500 ms"), "{e}");
    }

    #[test]
    fn wrong_types_and_reused_ports_are_refused() {
        let e = err(&GOOD.replace("id = 2", "id = \"two\""));
        assert!(e.contains("node.toml:2"), "{e}");
        let e = err(&GOOD.replace("7103", "7102"));
        assert!(e.contains("used twice"), "{e}");
        let e = err(&format!("{GOOD}\n[limits]\napply_fuel = 10\n"));
        assert!(e.contains("apply fuel"), "{e}");
    }

    #[test]
    fn a_joining_node_lists_itself_and_whom_it_joins() {
        let c = parse(GOOD, Path::new("node.toml")).unwrap();
        assert!(!c.join, "founding by default");
        assert!(c.lease_reads, "lease reads on by default");
        let joining = GOOD.replace("id = 2\n", "id = 2\njoin = true\n");
        let c = parse(&joining, Path::new("node.toml")).unwrap();
        assert!(c.join);
        assert_eq!(c.members.len(), 3);
        let alone = joining
            .lines()
            .filter(|l| !l.starts_with("1 =") && !l.starts_with("3 ="))
            .collect::<Vec<_>>()
            .join("\n");
        let e = err(&alone);
        assert!(e.contains("no node to join"), "{e}");
        let e = err(&GOOD.replace("id = 2\n", "id = 2\njoin = \"yes\"\n"));
        assert!(e.contains("node.toml:3"), "{e}");
        let off = format!("{GOOD}\n[raft]\nlease_reads = false\n");
        assert!(!parse(&off, Path::new("node.toml")).unwrap().lease_reads);
    }

    #[test]
    fn the_node_must_be_a_member() {
        let e = err(&GOOD.replace("id = 2", "id = 9"));
        assert!(e.contains("not among the members"), "{e}");
    }
}
