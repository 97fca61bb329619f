//! Snapshots with real `kythira serve` processes: a node down while the
//! others write and compact catches up through a snapshot; one killed in the
//! middle of installing it restarts consistent; a transfer cut by killing
//! its sender resumes from another node where it stopped.

mod support;

use std::time::Duration;

use kythira::local::Options;
use kythira_api::{Consistency, Payload};
use kythira_client::Client;
use support::*;

fn put(key: &str, value: &str) -> Payload {
    Payload::Json(format!(r#"{{"put":{{"key":"{key}","value":"{value}"}}}}"#))
}

fn get(key: &str) -> Payload {
    Payload::Json(format!(r#"{{"get":{{"key":"{key}"}}}}"#))
}

/// Node `id`'s own answer for `key`, without asking the leader.
async fn local_value(c: &TestCluster, id: u64, key: &str) -> Option<String> {
    let client = client_for(c, "app", vec![c.addr(id)]);
    client
        .query("kv", get(key), Consistency::Stale)
        .await
        .ok()
        .map(json)
}

/// Waits until node `id` holds `key` = `value` by its own state, and has a
/// snapshot.
async fn caught_up(c: &TestCluster, admin: &Client, id: u64, key: &str, value: &str) {
    let want = format!(r#"{{"value":"{value}"}}"#);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while local_value(c, id, key).await.as_deref() != Some(want.as_str()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node {id} did not catch up; its log ends:\n{}\nthe others' logs end:\n{}",
            c.log_tail(id, 40),
            c.ids()
                .into_iter()
                .filter(|&o| o != id)
                .map(|o| c.log_tail(o, 25))
                .collect::<Vec<_>>()
                .join("\n----\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = admin
        .status_of(c.addr(id))
        .await
        .unwrap_or_else(|e| panic!("status of node {id}: {e}; log:\n{}", c.log_tail(id, 30)));
    assert!(s.snapshot_index > 0, "node {id} has no snapshot: {s:?}");
}

/// A started cluster serving kv with one follower killed: the cluster, an
/// `admin` and an `app` client, the leader and the follower down.
async fn one_follower_down(opts: Options) -> (TestCluster, Client, Client, u64, u64) {
    let mut c = start(opts);
    deploy(&c, "kv");
    let admin = client(&c, "admin");
    let app = client(&c, "app");
    let leader = leader(&admin, &c).await;
    let down = c.ids().into_iter().find(|&id| id != leader).unwrap();
    c.kill(down);
    (c, admin, app, leader, down)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_compaction_catches_up_through_a_snapshot_even_if_killed_installing_it()
{
    let (mut c, admin, app, leader, down) = one_follower_down(Options {
        snapshot_every: Some(40),
        ..Options::default()
    })
    .await;
    for i in 0..200 {
        app.apply("kv", put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put");
    }
    // The others compacted their logs past everything the node down has.
    for id in c.ids().into_iter().filter(|&id| id != down) {
        let s = admin.status_of(c.addr(id)).await.unwrap();
        assert!(s.snapshot_index >= 160, "node {id}: {s:?}");
        assert!(s.first_index > 100, "node {id} kept its log: {s:?}");
    }

    // The node comes back, receives the snapshot and dies between making it
    // durable and resetting its log to it.
    c.set_env(down, "KYTHIRA_CRASH_AT", Some("snapshot-install"));
    c.start(down).unwrap();
    eventually(Duration::from_secs(120), "the crash point", || {
        let exited = c.cluster.has_exited(down);
        async move { exited }
    })
    .await;
    let log = c.log_tail(down, 20);
    assert!(log.contains("crash point snapshot-install"), "{log}");

    // Restarted, it finishes the install from the snapshot on its disk and
    // serves the same state as the others.
    c.set_env(down, "KYTHIRA_CRASH_AT", None);
    c.start(down).unwrap();
    app.apply("kv", put("after", "restart")).await.expect("put");
    caught_up(&c, &admin, down, "after", "restart").await;
    for key in ["k0", "k77", "k199"] {
        let want = local_value(&c, leader, key).await;
        assert!(want.is_some());
        assert_eq!(local_value(&c, down, key).await, want, "{key}");
    }
}

/// Bytes of node `id`'s partial snapshot reception, if one is under way.
fn partial_bytes(c: &TestCluster, id: u64) -> u64 {
    let dir = c.dir().join(format!("data/node-{id}/snapshots"));
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("incoming-"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0)
}

/// The largest `resumed_from` among the snapshots node `id` received.
fn resumed_from(c: &TestCluster, id: u64) -> u64 {
    let log = std::fs::read_to_string(c.dir().join(format!("node-{id}.log"))).unwrap_or_default();
    log.lines()
        .filter(|l| l.contains("snapshot received"))
        .filter_map(|l| l.split("resumed_from=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_by_killing_its_sender_resumes_from_the_new_leader() {
    // Transfers paced at 1 MiB/s, so a 4 MiB snapshot takes seconds: long
    // enough to cut it in the middle.
    let (mut c, admin, app, leader, down) = one_follower_down(Options {
        snapshot_every: Some(20),
        snapshot_send_mib_per_s: Some(1.0),
        ..Options::default()
    })
    .await;
    let value = "x".repeat(32 << 10);
    for i in 0..128 {
        app.apply("kv", put(&format!("big{i}"), &value))
            .await
            .expect("put");
    }
    let term = admin.status_of(c.addr(leader)).await.unwrap().term;

    c.start(down).unwrap();
    eventually(Duration::from_secs(60), "a partial snapshot", || {
        let held = partial_bytes(&c, down);
        async move { held >= 1 << 20 }
    })
    .await;
    c.kill(leader);
    new_leader_after(&admin, &c, leader, term, Duration::from_secs(60)).await;

    caught_up(&c, &admin, down, "big127", &value).await;
    let resumed = resumed_from(&c, down);
    assert!(
        resumed >= 1 << 20,
        "the transfer started over (resumed from {resumed}); log:\n{}",
        c.log_tail(down, 30)
    );
}
