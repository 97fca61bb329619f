//! Clusters of real `kythira serve` processes on this machine, on loopback:
//! what `kythira demo` runs, and what the cluster tests run.
//!
//! Every process a [`LocalCluster`] starts is killed when it is dropped,
//! whatever happened, unless it was told to [`LocalCluster::keep`] them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use kythira_transport::pki::{Ca, Identity, Role};

/// The line `kythira serve` prints once it serves.
pub const READY: &str = "kythira: serving";

/// How the cluster's nodes are configured.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of voters.
    pub nodes: u64,
    /// Serve the HTTP API too.
    pub http: bool,
    /// Consensus tick; elections take about 10 to 20 ticks.
    pub tick_ms: u64,
    /// How long to wait for a node to come up (a safety net, not a schedule).
    pub start_timeout: Duration,
    /// `[snapshots] every_entries` of every node; `None` keeps the default.
    pub snapshot_every: Option<u64>,
    /// `[snapshots] send_mib_per_s` of every node; `None` keeps the default.
    pub snapshot_send_mib_per_s: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: 3,
            http: false,
            tick_ms: 50,
            start_timeout: Duration::from_secs(120),
            snapshot_every: None,
            snapshot_send_mib_per_s: None,
        }
    }
}

struct Proc {
    addr: SocketAddr,
    peer: SocketAddr,
    http: Option<SocketAddr>,
    config: PathBuf,
    child: Option<Child>,
    /// Extra environment of its process.
    env: Vec<(String, String)>,
}

/// A cluster of `kythira serve` processes under one directory.
pub struct LocalCluster {
    exe: PathBuf,
    dir: PathBuf,
    nodes: BTreeMap<u64, Proc>,
    start_timeout: Duration,
    tick_ms: u64,
    http: bool,
    snapshot_every: Option<u64>,
    snapshot_send_mib_per_s: Option<f64>,
    keep: bool,
}

/// Free loopback ports, as the OS hands them out. They are released before
/// the nodes bind them; another process could take one in between, which a
/// test would see as a node failing to start.
fn free_ports(n: usize, udp: bool) -> anyhow::Result<Vec<u16>> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..n {
        let port = if udp {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            let p = s.local_addr()?.port();
            held.push(Box::new(s) as Box<dyn std::any::Any>);
            p
        } else {
            let s = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let p = s.local_addr()?.port();
            held.push(Box::new(s) as Box<dyn std::any::Any>);
            p
        };
        ports.push(port);
    }
    Ok(ports)
}

impl LocalCluster {
    /// Writes certificates (a fresh CA, one per node, `admin` and `app`
    /// clients) and node configurations under `dir`. Starts nothing.
    pub fn create(exe: &Path, dir: &Path, opts: &Options) -> anyhow::Result<Self> {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs)
            .with_context(|| format!("cannot create {}", certs.display()))?;
        let ca = Ca::generate()?;
        ca.write(&certs.join("ca.pem"), &certs.join("ca-key.pem"))?;
        for (name, role) in [("admin", Role::Admin), ("app", Role::Client)] {
            ca.issue(&Identity::client(name, role)?, &[])?.write(
                &certs.join(format!("{name}.pem")),
                &certs.join(format!("{name}-key.pem")),
            )?;
        }
        let mut cluster = Self {
            exe: exe.to_path_buf(),
            dir: dir.to_path_buf(),
            nodes: BTreeMap::new(),
            start_timeout: opts.start_timeout,
            tick_ms: opts.tick_ms,
            http: opts.http,
            snapshot_every: opts.snapshot_every,
            snapshot_send_mib_per_s: opts.snapshot_send_mib_per_s,
            keep: false,
        };
        for id in 1..=opts.nodes {
            cluster.prepare(&ca, id)?;
        }
        for id in 1..=opts.nodes {
            cluster.write_config(id, false)?;
        }
        Ok(cluster)
    }

    /// Ports and a certificate for node `id`.
    fn prepare(&mut self, ca: &Ca, id: u64) -> anyhow::Result<()> {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let certs = self.dir.join("certs");
        ca.issue(&Identity::Node(id), &[ip])?.write(
            &certs.join(format!("node-{id}.pem")),
            &certs.join(format!("node-{id}-key.pem")),
        )?;
        // Ports are released before the node binds them, so the OS may hand
        // one out again: skip those another node of the cluster has.
        let taken: Vec<u16> = self
            .nodes
            .values()
            .flat_map(|p| [Some(p.addr), Some(p.peer), p.http])
            .flatten()
            .map(|a| a.port())
            .collect();
        let quic = loop {
            let ports = free_ports(2, true)?;
            if ports.iter().all(|p| !taken.contains(p)) {
                break ports;
            }
        };
        let http = if self.http {
            let port = loop {
                let port = free_ports(1, false)?[0];
                if !taken.contains(&port) && !quic.contains(&port) {
                    break port;
                }
            };
            Some(SocketAddr::new(ip, port))
        } else {
            None
        };
        self.nodes.insert(
            id,
            Proc {
                addr: SocketAddr::new(ip, quic[0]),
                peer: SocketAddr::new(ip, quic[1]),
                http,
                config: self.dir.join(format!("node-{id}.toml")),
                child: None,
                env: Vec::new(),
            },
        );
        Ok(())
    }

    /// Writes node `id`'s configuration, listing every node prepared so far.
    fn write_config(&self, id: u64, join: bool) -> anyhow::Result<()> {
        let members: String = self
            .nodes
            .iter()
            .map(|(id, p)| {
                format!(
                    "{id} = {{ peer = \"{}\", client = \"{}\" }}\n",
                    p.peer, p.addr
                )
            })
            .collect();
        let node = &self.nodes[&id];
        let http_line = node
            .http
            .map_or(String::new(), |a| format!("http = \"{a}\"\n"));
        let join_line = if join { "join = true\n" } else { "" };
        let mut snapshots = String::new();
        if let Some(n) = self.snapshot_every {
            snapshots.push_str(&format!("every_entries = {n}\n"));
        }
        if let Some(rate) = self.snapshot_send_mib_per_s {
            snapshots.push_str(&format!("send_mib_per_s = {rate:?}\n"));
        }
        if !snapshots.is_empty() {
            snapshots.insert_str(0, "\n[snapshots]\n");
        }
        std::fs::write(
            &node.config,
            format!(
                "id = {id}\ndata_dir = \"data/node-{id}\"\n{http_line}{join_line}\n\
                 [tls]\nca = \"certs/ca.pem\"\ncert = \"certs/node-{id}.pem\"\nkey = \"certs/node-{id}-key.pem\"\n\n\
                 [members]\n{members}\n\
                 [raft]\ntick_ms = {}\nelection_ticks = 10\nheartbeat_ticks = 2\n{snapshots}",
                self.tick_ms
            ),
        )?;
        Ok(())
    }

    /// Prepares a new node, with the next free id, to join the running
    /// cluster: a certificate, ports, and a configuration with `join =
    /// true` that lists every node of this cluster (the log tells it which
    /// were removed). Starts nothing: [`LocalCluster::start`] does, and
    /// `kythira members add-learner` makes it a member.
    pub fn add_node(&mut self) -> anyhow::Result<u64> {
        let certs = self.dir.join("certs");
        let ca = Ca::read(&certs.join("ca.pem"), &certs.join("ca-key.pem"))?;
        let id = self.nodes.keys().next_back().map_or(1, |last| last + 1);
        self.prepare(&ca, id)?;
        self.write_config(id, true)?;
        Ok(id)
    }

    /// Starts every node that is not running, and waits until each serves.
    pub fn start_all(&mut self) -> anyhow::Result<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let mut waits = Vec::new();
        for id in ids {
            if self.nodes[&id].child.is_none() {
                waits.push((id, self.spawn(id)?));
            }
        }
        for (id, ready) in waits {
            self.wait_ready(id, ready)?;
        }
        Ok(())
    }

    /// Starts node `id` and waits until it serves.
    pub fn start(&mut self, id: u64) -> anyhow::Result<()> {
        let ready = self.spawn(id)?;
        self.wait_ready(id, ready)
    }

    fn spawn(&mut self, id: u64) -> anyhow::Result<mpsc::Receiver<String>> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("node-{id}.log")))?;
        // A node's first start: its data directory is created once, as an
        // operator would with `kythira init`.
        if !self.dir.join(format!("data/node-{id}")).exists() {
            let out = Command::new(&self.exe)
                .arg("init")
                .arg("--config")
                .arg(&node.config)
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("cannot start {}", self.exe.display()))?;
            if !out.status.success() {
                bail!(
                    "kythira init for node {id} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        let mut child = Command::new(&self.exe)
            .arg("serve")
            .arg("--config")
            .arg(&node.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        node.child = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }

    fn wait_ready(&mut self, id: u64, lines: mpsc::Receiver<String>) -> anyhow::Result<()> {
        loop {
            match lines.recv_timeout(self.start_timeout) {
                Ok(line) if line.starts_with(READY) => return Ok(()),
                Ok(_) => continue,
                Err(_) => {
                    // The output ended (the process exited) or the safety net ran out.
                    let log = std::fs::read_to_string(self.dir.join(format!("node-{id}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(20).collect();
                    self.kill(id);
                    bail!(
                        "node {id} did not start; last lines of its log:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }

    /// Kills node `id` with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Asks node `id` to stop with SIGTERM, as an operator or a service
    /// manager would, and waits for it to exit (up to `within`, then it is
    /// killed). Returns its exit status, `None` if it had to be killed.
    pub fn terminate(&mut self, id: u64, within: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.nodes.get_mut(&id).and_then(|n| n.child.take())?;
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits pid_t");
        // SAFETY: `kill` has no memory effects; the pid is our own child,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(within) {
            Ok(status) => status.ok(),
            Err(_) => {
                // SAFETY: as above; the waiting thread has not reaped it.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = rx.recv();
                None
            }
        }
    }

    /// Sets (or with `None` removes) `key` in node `id`'s environment from
    /// its next start on, e.g. `KYTHIRA_CRASH_AT` to stop it at a crash point.
    pub fn set_env(&mut self, id: u64, key: &str, value: Option<&str>) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.env.retain(|(k, _)| k != key);
            if let Some(value) = value {
                node.env.push((key.to_string(), value.to_string()));
            }
        }
    }

    /// Whether node `id`'s process ended by itself (it is then reaped).
    pub fn has_exited(&mut self, id: u64) -> bool {
        let Some(node) = self.nodes.get_mut(&id) else {
            return false;
        };
        match node.child.as_mut().map(Child::try_wait) {
            Some(Ok(Some(_))) => {
                node.child = None;
                true
            }
            _ => false,
        }
    }

    /// The last lines of node `id`'s log.
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let log =
            std::fs::read_to_string(self.dir.join(format!("node-{id}.log"))).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Whether node `id` runs.
    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.child.is_some())
    }

    /// The process id of node `id`, if it runs.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.nodes.get(&id)?.child.as_ref().map(Child::id)
    }

    /// Node ids.
    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    /// Raft (peer) address of node `id`.
    pub fn peer_addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].peer
    }

    /// Configuration file of node `id`.
    pub fn config_path(&self, id: u64) -> &Path {
        &self.nodes[&id].config
    }

    /// Client address of node `id`.
    pub fn addr(&self, id: u64) -> SocketAddr {
        self.nodes[&id].addr
    }

    /// HTTP address of node `id`, if it serves HTTP.
    pub fn http_addr(&self, id: u64) -> Option<SocketAddr> {
        self.nodes[&id].http
    }

    /// Every node's QUIC address.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.nodes.values().map(|n| n.addr).collect()
    }

    /// The `--endpoints` value for all nodes.
    pub fn endpoints_arg(&self) -> String {
        let eps: Vec<String> = self.endpoints().iter().map(ToString::to_string).collect();
        eps.join(",")
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Certificate and key of client `name` (`admin` or `app`), with the CA.
    pub fn client_files(&self, name: &str) -> kythira_transport::tls::TlsFiles {
        let certs = self.dir.join("certs");
        kythira_transport::tls::TlsFiles {
            ca: certs.join("ca.pem"),
            cert: certs.join(format!("{name}.pem")),
            key: certs.join(format!("{name}-key.pem")),
        }
    }

    /// `kythira` with the connection flags of client `name` filled in.
    pub fn cli(&self, name: &str) -> Command {
        let files = self.client_files(name);
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--endpoints")
            .arg(self.endpoints_arg())
            .arg("--cacert")
            .arg(files.ca)
            .arg("--cert")
            .arg(files.cert)
            .arg("--key")
            .arg(files.key);
        cmd
    }

    /// Leaves the processes running when the cluster is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        for id in self.ids() {
            self.kill(id);
        }
    }
}
