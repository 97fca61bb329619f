//! Shared helpers for the tests that run real `kythira serve` processes.

#![allow(dead_code)]

pub mod counters;
pub mod https;

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kythira::local::{LocalCluster, Options};
use kythira_api::{Consistency, Payload};
use kythira_client::{Client, ClientConfig};
use kythira_transport::tls::Tls;

/// Where `just plugins` puts the components (`KYTHIRA_PLUGIN_DIR` overrides).
pub fn plugin(name: &str) -> PathBuf {
    let dir = std::env::var_os("KYTHIRA_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins"));
    let path = dir.join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the plugins with `just plugins`",
        path.display()
    );
    path
}

/// A started three-node cluster in a temporary directory (removed at the
/// end, after the processes are killed).
pub struct TestCluster {
    pub cluster: LocalCluster,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestCluster {
    type Target = LocalCluster;
    fn deref(&self) -> &LocalCluster {
        &self.cluster
    }
}

impl std::ops::DerefMut for TestCluster {
    fn deref_mut(&mut self) -> &mut LocalCluster {
        &mut self.cluster
    }
}

pub fn start(opts: Options) -> TestCluster {
    let dir = tempfile::tempdir().unwrap();
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_kythira"));
    let mut cluster = LocalCluster::create(&exe, dir.path(), &opts).unwrap();
    cluster.start_all().unwrap();
    TestCluster { cluster, dir }
}

/// Runs the CLI as client `who`; returns its output.
pub fn cli(cluster: &LocalCluster, who: &str, args: &[&str]) -> Output {
    cluster.cli(who).args(args).output().unwrap()
}

/// Runs the CLI and insists it succeeds; returns stdout.
pub fn cli_ok(cluster: &LocalCluster, who: &str, args: &[&str]) -> String {
    let out = cli(cluster, who, args);
    assert!(
        out.status.success(),
        "kythira {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the CLI and insists it fails with one line on stderr; returns it.
pub fn cli_err(cluster: &LocalCluster, who: &str, args: &[&str]) -> String {
    let out = cli(cluster, who, args);
    assert!(!out.status.success(), "kythira {args:?} succeeded");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "not one line: {stderr}"
    );
    stderr
}

/// A client library handle for client `who`, reaching `endpoints`.
pub fn client_for(
    cluster: &LocalCluster,
    who: &str,
    endpoints: Vec<std::net::SocketAddr>,
) -> Client {
    let tls = Tls::load(&cluster.client_files(who)).unwrap();
    let mut cfg = ClientConfig::new(endpoints, tls);
    cfg.deadline = Duration::from_secs(60);
    cfg.attempt_timeout = Duration::from_secs(5);
    Client::new(cfg).unwrap()
}

pub fn client(cluster: &LocalCluster, who: &str) -> Client {
    client_for(cluster, who, cluster.endpoints())
}

/// Deploys `name` from the built plugins as machine `name`, through the CLI.
pub fn deploy(cluster: &LocalCluster, name: &str) {
    let path = plugin(name);
    let out = cli_ok(cluster, "admin", &["deploy", name, path.to_str().unwrap()]);
    assert!(out.contains(&format!("deployed {name}")), "{out}");
}

/// A JSON payload's text.
pub fn json(p: Payload) -> String {
    match p {
        Payload::Json(s) => s,
        other => panic!("expected JSON, got {other:?}"),
    }
}

/// The id of the node every reachable node names as leader.
pub async fn leader(client: &Client, cluster: &LocalCluster) -> u64 {
    // A linearizable read goes through the leader, so one exists after it.
    let _ = client
        .query(
            "none",
            Payload::Json("{}".into()),
            Consistency::Linearizable,
        )
        .await;
    for id in cluster
        .ids()
        .into_iter()
        .filter(|id| cluster.is_running(*id))
    {
        if let Ok(s) = client.status_of(cluster.addr(id)).await
            && s.role == "leader"
        {
            return id;
        }
    }
    panic!("no node leads");
}

/// Polls `check` until it holds or `within` passes. For conditions in other
/// processes that announce nothing (a restarted node catching up), there is
/// no event to wait on; the deadline is a safety net, not a schedule.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a node other than `old` leads a term after `old_term`.
pub async fn new_leader_after(
    admin: &Client,
    cluster: &LocalCluster,
    old: u64,
    old_term: u64,
    within: Duration,
) {
    let survivors: Vec<_> = cluster.ids().into_iter().filter(|i| *i != old).collect();
    eventually(within, "a new leader", || {
        let survivors = &survivors;
        async move {
            for id in survivors {
                if let Ok(s) = admin.status_of(cluster.addr(*id)).await
                    && s.role == "leader"
                    && s.term > old_term
                {
                    return true;
                }
            }
            false
        }
    })
    .await;
}
