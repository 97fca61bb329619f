//! `kythira demo`: a three-node cluster of real processes on loopback,
//! driven through the same CLI an operator uses.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, bail};
use clap::Args;
use kythira::local::{LocalCluster, Options};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Directory holding the built components (`just plugins`).
    #[arg(long, default_value = "target/plugins")]
    plugins: PathBuf,
    /// Keep the cluster running afterwards, until Ctrl-C.
    #[arg(long)]
    keep: bool,
}

/// Runs `cmd`, echoing it and its output like a terminal session would.
fn show(cluster: &LocalCluster, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd: Command = cluster.cli("admin");
    cmd.args(args);
    println!("\n$ kythira {}", shell_words(args));
    let out = cmd.output().context("cannot run kythira")?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    print!("{stdout}");
    if !out.status.success() {
        bail!(
            "`kythira {}` failed: {}",
            shell_words(args),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if a.contains(['{', ' ', '"']) {
                format!("'{a}'")
            } else {
                a.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The id of the node the cluster agrees leads, from `status --json`.
fn leader(cluster: &LocalCluster) -> anyhow::Result<u64> {
    let mut cmd = cluster.cli("admin");
    let out = cmd.args(["--json", "status"]).output()?;
    let all: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status printed {}", String::from_utf8_lossy(&out.stdout)))?;
    all.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            s["status"]["role"]
                .as_str()
                .filter(|r| *r == "leader")
                .and(s["status"]["id"].as_u64())
        })
        .next()
        .context("no node reports itself leader")
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let kv = args.plugins.join("kv.wasm");
    if !kv.exists() {
        bail!(
            "{} is missing: build the plugins with `just plugins`",
            kv.display()
        );
    }
    let kv = kv.canonicalize()?;
    let kv2 = args
        .plugins
        .join("kv2.wasm")
        .canonicalize()
        .with_context(|| {
            format!(
                "{}/kv2.wasm is missing: build the plugins with `just plugins`",
                args.plugins.display()
            )
        })?;
    let exe = std::env::current_exe()?;
    let tmp = tempfile::Builder::new().prefix("kythira-demo-").tempdir()?;
    // Removed when the demo ends, after every process is stopped.
    let dir = tmp.path().to_path_buf();
    let mut cluster = LocalCluster::create(&exe, &dir, &Options::default())?;
    println!(
        "cluster directory {} (fresh CA and certificates in certs/)",
        dir.display()
    );
    cluster.start_all()?;
    for id in cluster.ids() {
        println!(
            "node {id}: kythira serve (pid {}) on {}",
            cluster.pid(id).unwrap_or(0),
            cluster.addr(id)
        );
    }
    let kv_arg = kv.to_string_lossy().to_string();
    // The client waits out the first election: it retries until a leader answers.
    show(&cluster, &["deploy", "kv", &kv_arg])?;
    show(&cluster, &["status"])?;
    show(
        &cluster,
        &[
            "apply",
            "kv",
            r#"{"put":{"key":"greeting","value":"hello"}}"#,
        ],
    )?;
    show(
        &cluster,
        &[
            "apply",
            "--exactly-once",
            "kv",
            r#"{"put":{"key":"planet","value":"kythira"}}"#,
        ],
    )?;
    show(&cluster, &["query", "kv", r#"{"get":{"key":"greeting"}}"#])?;

    let old = leader(&cluster)?;
    println!("\nkilling the leader, node {old} (SIGKILL)");
    cluster.kill(old);
    let out = show(&cluster, &["query", "kv", r#"{"get":{"key":"planet"}}"#])?;
    if !out.contains("kythira") {
        bail!("the new leader lost the data: {out}");
    }
    let new = leader(&cluster)?;
    println!("node {new} leads now and serves what node {old} acknowledged");
    show(
        &cluster,
        &[
            "apply",
            "kv",
            r#"{"put":{"key":"greeting","value":"hello again"}}"#,
        ],
    )?;
    println!("\nrestarting node {old}: it replays its log and catches up");
    cluster.start(old)?;
    caught_up(&cluster, old, new).await?;
    show(&cluster, &["status"])?;

    println!("\nupgrading kv to its second version (an append command, a revision per key)");
    let kv2_arg = kv2.to_string_lossy().to_string();
    show(
        &cluster,
        &[
            "upgrade",
            "kv",
            &kv2_arg,
            "--dry-run",
            "--command",
            r#"{"append":{"key":"greeting","value":"!"}}"#,
            "--query",
            r#"{"get":{"key":"greeting"}}"#,
        ],
    )?;
    show(&cluster, &["upgrade", "kv", &kv2_arg])?;
    show(
        &cluster,
        &[
            "apply",
            "kv",
            r#"{"append":{"key":"greeting","value":"!"}}"#,
        ],
    )?;
    let out = show(&cluster, &["query", "kv", r#"{"get":{"key":"greeting"}}"#])?;
    if !out.contains("hello again!") {
        bail!("the upgrade lost the data: {out}");
    }
    show(&cluster, &["plugins"])?;

    let f = cluster.client_files("admin");
    println!(
        "\ntry next, from another terminal{}:",
        if args.keep { "" } else { " (with --keep)" }
    );
    println!(
        "  export KYTHIRA_ENDPOINTS={} KYTHIRA_CACERT={} KYTHIRA_CERT={} KYTHIRA_KEY={}",
        cluster.endpoints_arg(),
        f.ca.display(),
        f.cert.display(),
        f.key.display()
    );
    println!("  alias kythira={}", exe.display());
    println!("  kythira status");
    println!(r#"  kythira apply kv '{{"put":{{"key":"a","value":"1"}}}}'"#);
    println!(r#"  kythira query kv '{{"scan":{{"prefix":"","limit":10}}}}'"#);
    println!("  kythira bench --clients 16 --duration 5s");
    if args.keep {
        println!(
            "\nthe cluster runs until Ctrl-C (directory {})",
            dir.display()
        );
        tokio::signal::ctrl_c().await?;
    }
    drop(cluster);
    println!("\ndemo finished; all nodes stopped");
    Ok(())
}

/// Waits until node `id` has applied what the leader had committed when it
/// came back: the replay of its log and the entries it missed. A demo may
/// poll; the bound only keeps a broken node from hanging it.
async fn caught_up(cluster: &LocalCluster, id: u64, leader: u64) -> anyhow::Result<()> {
    let tls = kythira_transport::tls::Tls::load(&cluster.client_files("admin"))?;
    let client =
        kythira_client::Client::new(kythira_client::ClientConfig::new(cluster.endpoints(), tls))?;
    let target = client.status_of(cluster.addr(leader)).await?.commit;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(s) = client.status_of(cluster.addr(id)).await
            && s.applied >= target
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("node {id} did not catch up to index {target} within 60 s");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
