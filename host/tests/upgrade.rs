//! The plugin lifecycle with real `kythira serve` processes: code deployed,
//! upgraded, moved to other limits and removed through the log, so every
//! replica switches code at the same index; failed upgrades that change
//! nothing; nodes that were down catching up through the log or a
//! snapshot; dry runs that change nothing.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kythira::local::Options;
use kythira_api::{ApiError, ChangeKind, Consistency, DeployLimits, Payload, PluginReport};
use kythira_client::{Client, ClientError};
use support::*;

fn component(name: &str) -> Bytes {
    Bytes::from(std::fs::read(plugin(name)).unwrap())
}

fn sha256_of(name: &str) -> String {
    use sha2::Digest;
    kythira_node::machines::hex(&sha2::Sha256::digest(component(name)))
}

fn kv_put(key: &str, value: &str) -> Payload {
    Payload::Json(format!(r#"{{"put":{{"key":"{key}","value":"{value}"}}}}"#))
}

fn kv_get(key: &str) -> Payload {
    Payload::Json(format!(r#"{{"get":{{"key":"{key}"}}}}"#))
}

/// kv2's new command.
fn kv_append(key: &str, value: &str) -> Payload {
    Payload::Json(format!(
        r#"{{"append":{{"key":"{key}","value":"{value}"}}}}"#
    ))
}

/// kv2's new query.
fn kv_revision(key: &str) -> Payload {
    Payload::Json(format!(r#"{{"revision":{{"key":"{key}"}}}}"#))
}

fn upgrade_failure(e: ClientError) -> (u64, String) {
    match e {
        ClientError::Api(ApiError::UpgradeFailed { index, reason, .. }) => (index, reason),
        other => panic!("expected an upgrade failure, got {other}"),
    }
}

/// The leader's status.
async fn leader_status(c: &TestCluster, admin: &Client) -> kythira_api::NodeStatus {
    let id = leader(admin, c).await;
    admin.status_of(c.addr(id)).await.unwrap()
}

/// Waits until node `id` has applied `index`.
async fn applied(c: &TestCluster, admin: &Client, id: u64, index: u64) {
    eventually(
        Duration::from_secs(120),
        &format!("node {id} applies index {index}"),
        || async move {
            admin
                .status_of(c.addr(id))
                .await
                .is_ok_and(|s| s.applied >= index)
        },
    )
    .await;
}

/// Every running node's machines, once each has applied `index`.
async fn everywhere(c: &TestCluster, admin: &Client, index: u64) -> Vec<(u64, Vec<PluginReport>)> {
    let mut all = Vec::new();
    for id in c.ids().into_iter().filter(|&id| c.is_running(id)) {
        applied(c, admin, id, index).await;
        let plugins = admin
            .plugins_of(c.addr(id))
            .await
            .unwrap_or_else(|e| panic!("plugins of node {id}: {e}"));
        all.push((id, plugins));
    }
    all
}

fn machine<'a>(plugins: &'a [PluginReport], name: &str) -> &'a PluginReport {
    plugins
        .iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no machine {name} in {plugins:?}"))
}

/// Node `id`'s own answer to `query`, from what it has applied.
async fn local_query(
    c: &TestCluster,
    id: u64,
    machine: &str,
    query: Payload,
) -> Result<String, ClientError> {
    client_for(c, "app", vec![c.addr(id)])
        .query(machine, query, Consistency::Stale)
        .await
        .map(json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_upgraded_under_16_writing_clients_loses_nothing_and_switches_everywhere_at_one_index() {
    let c = start(Options::default());
    deploy(&c, "kv");
    let admin = client(&c, "admin");
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let client = client(&c, "app");
            let (stop, acked) = (stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut session = client.session().await.expect("session");
                let mut written = Vec::new();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) || n < 5 {
                    n += 1;
                    let key = format!("w{w:02}-{n:05}");
                    session
                        .apply("kv", kv_put(&key, &n.to_string()))
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}, write {n}: {e}"));
                    written.push((key, n.to_string()));
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                written
            })
        })
        .collect();
    let reach = |n: u64| {
        let acked = acked.clone();
        async move {
            eventually(Duration::from_secs(120), "writes acknowledged", || {
                let acked = acked.clone();
                async move { acked.load(Ordering::SeqCst) >= n }
            })
            .await;
        }
    };
    reach(100).await;
    let (upgraded_at, sha) = admin
        .upgrade("kv", component("kv2"), DeployLimits::default())
        .await
        .expect("upgrade");
    assert_eq!(sha, sha256_of("kv2"));
    // kv2's new query right away on every node, lagging followers
    // included: a linearizable read answers only once the node has
    // applied the upgrade, translated by the new code.
    for id in c.ids() {
        let node = client_for(&c, "app", vec![c.addr(id)]);
        let out = node
            .query("kv", kv_revision("w00-00001"), Consistency::Linearizable)
            .await
            .unwrap_or_else(|e| panic!("node {id}: {e}"));
        // Written before the upgrade (revision 0) or not yet (null): kv
        // itself would refuse the query.
        let out = json(out);
        assert!(
            out == r#"{"revision":0}"# || out == r#"{"revision":null}"#,
            "node {id}: {out}"
        );
    }
    let before = acked.load(Ordering::SeqCst);
    reach(before + 200).await;

    // The new command works right after the upgrade.
    let app = client(&c, "app");
    let (appended_at, out) = app
        .apply("kv", kv_append("new", "x"))
        .await
        .expect("append");
    assert!(appended_at > upgraded_at);
    assert_eq!(json(out), r#"{"value":null}"#);
    stop.store(true, Ordering::SeqCst);
    let mut written = Vec::new();
    for w in writers {
        written.extend(w.await.expect("a writer failed"));
    }
    let last = leader_status(&c, &admin).await.commit;

    let nodes = everywhere(&c, &admin, last).await;
    let state = &machine(&nodes[0].1, "kv").state_sha256;
    for (id, plugins) in &nodes {
        let kv = machine(plugins, "kv");
        assert_eq!(kv.sha256, sha, "node {id}");
        let history: Vec<_> = kv
            .history
            .iter()
            .map(|h| (h.change, h.sha256.clone()))
            .collect();
        assert_eq!(
            history,
            [
                (ChangeKind::Deploy, sha256_of("kv")),
                (ChangeKind::Upgrade, sha.clone())
            ],
            "node {id}"
        );
        assert_eq!(
            kv.history[1].index, upgraded_at,
            "node {id} switched code elsewhere"
        );
        assert!(
            state.is_some() && &kv.state_sha256 == state,
            "node {id}'s state differs"
        );
        // kv2's new query, on each node's own state.
        let revision = local_query(&c, *id, "kv", kv_revision("new"))
            .await
            .unwrap();
        assert!(
            revision.contains(&appended_at.to_string()),
            "node {id}: {revision}"
        );
        // Every acknowledged write, before and after the upgrade, read by
        // one connection to the node.
        let node = client_for(&c, "app", vec![c.addr(*id)]);
        for (key, value) in &written {
            let got = node
                .query("kv", kv_get(key), Consistency::Stale)
                .await
                .map(json)
                .unwrap();
            assert_eq!(
                got,
                format!(r#"{{"value":"{value}"}}"#),
                "node {id}, key {key}"
            );
        }
    }
    assert!(written.len() as u64 >= before + 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_that_fails_keeps_the_old_code_everywhere_and_says_why() {
    let c = start(Options::default());
    let admin = client(&c, "admin");
    let app = client(&c, "app");
    let looper = plugin("looper");
    let bad = plugin("bad-restore");
    // bad-restore refuses a count ending in anything but 7 or 8, traps on
    // one ending in 7 and loops forever on one ending in 8.
    let cases = [
        ("refused", 1, "refuses every snapshot"),
        ("traps", 7, "trap"),
        ("loops", 8, "fuel"),
    ];
    for (name, count, why) in cases {
        // A small budget for get-state and restore: the looping restore
        // runs until it is spent, on every replica.
        let out = cli_ok(
            &c,
            "admin",
            &[
                "deploy",
                name,
                looper.to_str().unwrap(),
                "--snapshot-fuel",
                "50000000",
            ],
        );
        assert!(out.contains(&format!("deployed {name}")), "{out}");
        for _ in 0..count {
            app.apply(name, Payload::Json(r#""increment""#.into()))
                .await
                .unwrap();
        }
        // Through the CLI: one line that names the index and the reason.
        let err = cli_err(&c, "admin", &["upgrade", name, bad.to_str().unwrap()]);
        assert!(
            err.contains(&format!("upgrade of {name} failed at index")),
            "{err}"
        );
        assert!(err.to_lowercase().contains(why), "{name}: {err}");
        // Through the library: the same, typed.
        let e = admin
            .upgrade(name, component("bad-restore"), DeployLimits::default())
            .await
            .unwrap_err();
        let (index, reason) = upgrade_failure(e);
        assert!(reason.to_lowercase().contains(why), "{name}: {reason}");

        for (id, plugins) in everywhere(&c, &admin, index).await {
            let m = machine(&plugins, name);
            assert_eq!(m.sha256, sha256_of("looper"), "node {id} runs other code");
            assert_eq!(m.history.len(), 1, "node {id}: {:?}", m.history);
            let got = local_query(&c, id, name, Payload::Json(r#""get""#.into()))
                .await
                .unwrap();
            assert_eq!(got, count.to_string(), "node {id} lost the state of {name}");
        }
        // The old code keeps serving.
        let (_, out) = app
            .apply(name, Payload::Json(r#""increment""#.into()))
            .await
            .unwrap();
        assert_eq!(json(out), (count + 1).to_string());
    }

    // A component of another WIT version never reaches the log.
    let mut other = component("kv").to_vec();
    let stamp = kythira_runtime::WIT_PACKAGE;
    assert!(other.ends_with(stamp.as_bytes()));
    let other_version = stamp.replace("@0.3.0", "@9.9.9");
    let tail = other.len() - stamp.len();
    other.truncate(tail);
    other.extend(other_version.as_bytes());
    let before = leader_status(&c, &admin).await.last_index;
    let e = admin
        .deploy("future", Bytes::from(other), DeployLimits::default())
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(text.contains("@9.9.9") && text.contains(stamp), "{text}");
    let after = leader_status(&c, &admin).await.last_index;
    assert_eq!(before, after, "a refused deploy was proposed");
}

/// A cluster serving kv with one follower killed, kv upgraded to kv2 while
/// it was down and a key appended after; returns the cluster, the admin
/// client, the follower, the upgrade's index and the append's.
async fn upgraded_while_down(
    opts: Options,
    writes_after: usize,
) -> (TestCluster, Client, u64, u64, u64) {
    let mut c = start(opts);
    deploy(&c, "kv");
    let admin = client(&c, "admin");
    let app = client(&c, "app");
    for i in 0..10 {
        app.apply("kv", kv_put(&format!("k{i}"), "v"))
            .await
            .unwrap();
    }
    let leader = leader(&admin, &c).await;
    let down = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.kill(down);
    let (upgraded_at, _) = admin
        .upgrade("kv", component("kv2"), DeployLimits::default())
        .await
        .expect("upgrade");
    let (appended_at, _) = app.apply("kv", kv_append("k0", "w")).await.unwrap();
    for i in 0..writes_after {
        app.apply("kv", kv_put(&format!("after{i}"), "v"))
            .await
            .unwrap();
    }
    (c, admin, down, upgraded_at, appended_at)
}

/// Node `id` runs kv2 since `upgraded_at` and holds what was written.
async fn runs_the_new_code(
    c: &TestCluster,
    admin: &Client,
    id: u64,
    upgraded_at: u64,
    appended_at: u64,
) {
    let last = leader_status(c, admin).await.commit;
    applied(c, admin, id, last).await;
    let plugins = admin.plugins_of(c.addr(id)).await.unwrap();
    let kv = machine(&plugins, "kv");
    assert_eq!(kv.sha256, sha256_of("kv2"));
    let upgrade = kv.history.last().unwrap();
    assert_eq!(
        (upgrade.change, upgrade.index),
        (ChangeKind::Upgrade, upgraded_at)
    );
    let value = local_query(c, id, "kv", kv_get("k0")).await.unwrap();
    assert_eq!(value, r#"{"value":"vw"}"#);
    let revision = local_query(c, id, "kv", kv_revision("k0")).await.unwrap();
    assert!(revision.contains(&appended_at.to_string()), "{revision}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_an_upgrade_applies_it_from_the_log() {
    let (mut c, admin, down, upgraded_at, appended_at) =
        upgraded_while_down(Options::default(), 0).await;
    c.start(down).unwrap();
    runs_the_new_code(&c, &admin, down, upgraded_at, appended_at).await;
    let s = admin.status_of(c.addr(down)).await.unwrap();
    assert!(
        s.snapshot_index < upgraded_at,
        "it caught up through a snapshot: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_an_upgrade_gets_the_new_code_in_a_snapshot() {
    let opts = Options {
        snapshot_every: Some(40),
        ..Options::default()
    };
    let (mut c, admin, down, upgraded_at, appended_at) = upgraded_while_down(opts, 120).await;
    // The others compacted past the upgrade: only a snapshot can bring it.
    // Compaction runs behind durable snapshots, in the background.
    eventually(
        Duration::from_secs(120),
        "the log compacted past the upgrade",
        || {
            let (c, admin) = (&c, &admin);
            async move {
                let leader = leader(admin, c).await;
                admin
                    .status_of(c.addr(leader))
                    .await
                    .is_ok_and(|s| s.first_index > upgraded_at)
            }
        },
    )
    .await;
    c.start(down).unwrap();
    runs_the_new_code(&c, &admin, down, upgraded_at, appended_at).await;
    let s = admin.status_of(c.addr(down)).await.unwrap();
    assert!(
        s.snapshot_index > upgraded_at,
        "no snapshot past the upgrade: {s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machines_upgrade_independently_and_removing_one_frees_its_state() {
    let c = start(Options::default());
    let admin = client(&c, "admin");
    let app = client(&c, "app");
    let kv = plugin("kv");
    for name in ["a", "b"] {
        cli_ok(&c, "admin", &["deploy", name, kv.to_str().unwrap()]);
        app.apply(name, kv_put("k", name)).await.unwrap();
    }
    let (upgraded_at, _) = admin
        .upgrade("a", component("kv2"), DeployLimits::default())
        .await
        .unwrap();
    app.apply("a", kv_append("k", "+")).await.unwrap();
    // b still runs v1, which has no append.
    let e = app.apply("b", kv_append("k", "+")).await.unwrap_err();
    assert!(
        matches!(e, ClientError::Api(ApiError::BadRequest(_))),
        "{e}"
    );
    let out = cli_ok(&c, "admin", &["limits", "b", "--memory-mib", "128"]);
    assert!(out.contains("new limits"), "{out}");

    let removed = cli_ok(&c, "admin", &["undeploy", "b"]);
    assert!(removed.contains("removed b"), "{removed}");
    let last = leader_status(&c, &admin).await.commit;
    for (id, plugins) in everywhere(&c, &admin, last).await {
        let names: Vec<_> = plugins.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["a"], "node {id}");
        let a = machine(&plugins, "a");
        assert_eq!(
            (a.sha256.clone(), a.history[1].index),
            (sha256_of("kv2"), upgraded_at)
        );
        let e = local_query(&c, id, "b", kv_get("k")).await.unwrap_err();
        assert!(
            matches!(e, ClientError::Api(ApiError::UnknownMachine(_))),
            "node {id}: {e}"
        );
        let got = local_query(&c, id, "a", kv_get("k")).await.unwrap();
        assert_eq!(got, r#"{"value":"a+"}"#);
    }
    // Its state went with it: deployed again, it starts empty.
    cli_ok(&c, "admin", &["deploy", "b", kv.to_str().unwrap()]);
    let got = app
        .query("b", kv_get("k"), Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(json(got), r#"{"value":null}"#);
    let listed = cli_ok(&c, "admin", &["plugins"]);
    assert!(
        listed.contains("upgrade") && listed.contains(&sha256_of("kv2")),
        "{listed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_reports_success_and_failure_and_changes_nothing() {
    let c = start(Options::default());
    deploy(&c, "kv");
    let admin = client(&c, "admin");
    let app = client(&c, "app");
    for i in 0..20 {
        app.apply("kv", kv_put(&format!("k{i}"), "v"))
            .await
            .unwrap();
    }
    let looper = plugin("looper");
    cli_ok(&c, "admin", &["deploy", "count", looper.to_str().unwrap()]);
    app.apply("count", Payload::Json(r#""increment""#.into()))
        .await
        .unwrap();
    let last = leader_status(&c, &admin).await.commit;
    let states = |nodes: Vec<(u64, Vec<PluginReport>)>| -> BTreeMap<u64, Vec<PluginReport>> {
        nodes
            .into_iter()
            .map(|(id, plugins)| {
                // Everything but the index the node had applied.
                let v = plugins
                    .into_iter()
                    .map(|p| PluginReport { applied: 0, ..p })
                    .collect();
                (id, v)
            })
            .collect()
    };
    let before = states(everywhere(&c, &admin, last).await);

    let kv2 = plugin("kv2");
    let out = cli_ok(
        &c,
        "admin",
        &[
            "--json",
            "upgrade",
            "kv",
            kv2.to_str().unwrap(),
            "--dry-run",
            "--command",
            r#"{"append":{"key":"k1","value":"w"}}"#,
            "--command",
            r#"{"append":{"nope":1}}"#,
            "--query",
            r#"{"get":{"key":"k1"}}"#,
        ],
    );
    let report: kythira_api::DryRunReport = serde_json::from_str(&out).unwrap();
    let migration = report.migration.as_ref().expect("the migration succeeds");
    assert!(
        migration.state_bytes > 0 && migration.fuel_used > 0,
        "{migration:?}"
    );
    assert_eq!(report.to_sha256, sha256_of("kv2"));
    assert_eq!(report.commands.len(), 2);
    assert_eq!(
        report.commands[0],
        Ok(Payload::Json(r#"{"value":"v"}"#.into()))
    );
    assert!(
        matches!(report.commands[1], Err(ApiError::BadRequest(_))),
        "{:?}",
        report.commands[1]
    );
    assert_eq!(
        report.queries,
        [Ok(Payload::Json(r#"{"value":"vw"}"#.into()))]
    );
    let text = cli_ok(
        &c,
        "admin",
        &["upgrade", "kv", kv2.to_str().unwrap(), "--dry-run"],
    );
    assert!(
        text.contains("migration: ok") && text.contains("nothing was changed"),
        "{text}"
    );

    // A migration that would fail is reported as such.
    let report = admin
        .dry_run_upgrade("count", component("bad-restore"), Vec::new(), Vec::new())
        .await
        .unwrap();
    let why = report.migration.unwrap_err();
    assert!(why.contains("refuses every snapshot"), "{why}");
    let out = cli(
        &c,
        "admin",
        &[
            "upgrade",
            "count",
            plugin("bad-restore").to_str().unwrap(),
            "--dry-run",
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("migration: failed"));

    let last = leader_status(&c, &admin).await.commit;
    let after = states(everywhere(&c, &admin, last).await);
    assert_eq!(before, after, "a dry run changed a state");
    let got = app
        .query("kv", kv_get("k1"), Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(json(got), r#"{"value":"v"}"#);
}
