//! Three `kythira serve` processes on 127.0.0.1: election, deploy, applies
//! and queries through every node, leader failure under load, and
//! exactly-once retries across a leader change, one process per data
//! directory.

mod support;

use std::time::Duration;

use kythira::local::Options;
use kythira_api::{Consistency, Payload, Request, Response, SessionSeq};
use support::counters::{add, counter_load, counters_reach, get};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_serves_the_cli_and_the_client_library() {
    let c = start(Options::default());
    deploy(&c, "kv");

    // Through each node alone: followers name the leader and the CLI follows.
    for id in c.ids() {
        let ep = c.addr(id).to_string();
        let put = format!(r#"{{"put":{{"key":"via-{id}","value":"v{id}"}}}}"#);
        let out = cli_ok(&c, "app", &["--endpoints", &ep, "apply", "kv", &put]);
        assert_eq!(out.trim(), r#"{"value":null}"#);
    }
    for id in c.ids() {
        let ep = c.addr(id).to_string();
        for other in c.ids() {
            let get = format!(r#"{{"get":{{"key":"via-{other}"}}}}"#);
            let out = cli_ok(&c, "app", &["--endpoints", &ep, "query", "kv", &get]);
            assert_eq!(out.trim(), format!(r#"{{"value":"v{other}"}}"#));
        }
    }
    // --json on a write and on status.
    let out = cli_ok(
        &c,
        "app",
        &[
            "--json",
            "apply",
            "kv",
            r#"{"put":{"key":"j","value":"1"}}"#,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["index"].as_u64().unwrap() > 0 && v["output"]["value"].is_null(),
        "{out}"
    );
    let out = cli_ok(&c, "app", &["--json", "status"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(all.len(), 3);
    let leaders: Vec<_> = all.iter().map(|s| s["status"]["leader"].clone()).collect();
    assert!(
        leaders.iter().all(|l| *l == leaders[0] && !l.is_null()),
        "{out}"
    );
    for s in &all {
        assert_eq!(s["status"]["machines"][0]["name"], "kv", "{out}");
    }

    // The client library, against each node in turn.
    for id in c.ids() {
        let client = client_for(&c, "app", vec![c.addr(id)]);
        let key = format!(r#"{{"put":{{"key":"lib-{id}","value":"x"}}}}"#);
        let (index, out) = client.apply("kv", Payload::Json(key)).await.unwrap();
        assert!(index > 0);
        assert_eq!(json(out), r#"{"value":null}"#);
        let got = client
            .query(
                "kv",
                Payload::Json(format!(r#"{{"get":{{"key":"lib-{id}"}}}}"#)),
                Consistency::Linearizable,
            )
            .await
            .unwrap();
        assert_eq!(json(got), r#"{"value":"x"}"#);
    }
    // A stale read is served by the node asked (a client that knows only
    // it, so nothing redirects it), from what that node has applied.
    for id in c.ids() {
        let node = client_for(&c, "app", vec![c.addr(id)]);
        eventually(Duration::from_secs(30), "a node applies the writes", || {
            let node = &node;
            async move {
                node.query(
                    "kv",
                    Payload::Json(r#"{"get":{"key":"lib-3"}}"#.into()),
                    Consistency::Stale,
                )
                .await
                .is_ok_and(|v| json(v) == r#"{"value":"x"}"#)
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_load_loses_and_doubles_nothing() {
    let mut c = start(Options::default());
    deploy(&c, "counter");
    let admin = client(&c, "admin");
    let old = leader(&admin, &c).await;

    // Eight clients, each with a session, each counting its own counter.
    const CLIENTS: usize = 8;
    const WRITES: u64 = 40;
    let mut load = counter_load(&c, CLIENTS, WRITES);
    // Kill the leader once a quarter of the writes are acknowledged.
    load.wait_for(CLIENTS as u64 * WRITES / 4).await;
    let old_term = admin.status_of(c.addr(old)).await.unwrap().term;
    c.kill(old);
    let killed = std::time::Instant::now();
    let killed_at = load.total();
    // A survivor leads a later term within a few election timeouts (0.5 to
    // 1 s each here; the bound leaves room for a loaded 2-core machine).
    new_leader_after(&admin, &c, old, old_term, Duration::from_secs(30)).await;
    let failover = killed.elapsed();
    assert!(
        failover < Duration::from_secs(8),
        "no new leader for {failover:?}"
    );
    load.finish().await;
    let new = leader(&admin, &c).await;
    assert_ne!(new, old);
    assert!(
        killed_at < CLIENTS as u64 * WRITES,
        "the kill happened under load"
    );

    // The killed node comes back, replays its log and catches up.
    c.start(old).unwrap();
    for id in c.ids() {
        counters_reach(&c, id, CLIENTS, WRITES, "a node catches up").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_serial_applies_once_across_a_leader_change() {
    let mut c = start(Options::default());
    deploy(&c, "counter");
    let admin = client(&c, "admin");
    let old = leader(&admin, &c).await;
    let Response::Session { id } = admin
        .request(&Request::RegisterSession, true)
        .await
        .unwrap()
    else {
        panic!("no session");
    };
    let command = Request::Apply {
        machine: "counter".into(),
        command: add("once"),
        session: Some(SessionSeq {
            id,
            serial: 1,
            acked: 1,
        }),
    };
    let first = admin.request(&command, true).await.unwrap();
    c.kill(old);
    // The same serial again, through a surviving node, to the new leader.
    let others: Vec<_> = c
        .ids()
        .into_iter()
        .filter(|i| *i != old)
        .map(|i| c.addr(i))
        .collect();
    let retry_client = client_for(&c, "admin", others);
    let again = retry_client.request(&command, true).await.unwrap();
    assert_eq!(first, again, "the retry returns the first answer");
    let value = retry_client
        .query("counter", get("once"), Consistency::Linearizable)
        .await
        .unwrap();
    assert_eq!(json(value), "1", "applied once");
    assert_ne!(leader(&retry_client, &c).await, old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_of_one_serves() {
    let c = start(Options {
        nodes: 1,
        ..Options::default()
    });
    deploy(&c, "kv");
    let out = cli_ok(
        &c,
        "app",
        &["apply", "kv", r#"{"put":{"key":"solo","value":"1"}}"#],
    );
    assert_eq!(out.trim(), r#"{"value":null}"#);
    let out = cli_ok(&c, "app", &["query", "kv", r#"{"get":{"key":"solo"}}"#]);
    assert_eq!(out.trim(), r#"{"value":"1"}"#);
}

/// Asserts that nobody but the owner may read anything under `path`.
fn owner_only(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{} is {mode:o}", path.display());
    if path.is_dir() {
        for item in std::fs::read_dir(path).unwrap() {
            owner_only(&item.unwrap().path());
        }
    }
}

/// The stderr of a `kythira serve` that must be refused: it exits before it
/// binds anything.
fn serve_refused(config: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args(["serve", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "served");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A member whose data directory is missing or empty (a failed mount, a
/// lost disk) refuses to start afresh, which could make it vote twice in a
/// term, and says what to do; `kythira init` creates a directory only where
/// there is none. The cluster keeps serving, and the node comes back once
/// its directory does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_without_its_data_directory_refuses_to_start() {
    let mut c = start(Options::default());
    deploy(&c, "kv");
    let put = |key: &str| format!(r#"{{"put":{{"key":"{key}","value":"x"}}}}"#);
    cli_ok(&c, "app", &["apply", "kv", &put("before")]);
    // Everything a node keeps is its owner's alone.
    owner_only(&c.dir().join("data/node-1"));
    c.kill(3);
    let data = c.dir().join("data/node-3");
    let aside = c.dir().join("data/node-3.aside");
    std::fs::rename(&data, &aside).unwrap();

    let missing = serve_refused(c.config_path(3));
    assert!(missing.contains("is missing"), "{missing}");
    assert!(missing.contains("kythira init"), "{missing}");
    assert!(missing.contains("members remove 3"), "{missing}");
    // As after a failed mount: the mount point is there, empty.
    std::fs::create_dir(&data).unwrap();
    let empty = serve_refused(c.config_path(3));
    assert!(empty.contains("is empty"), "{empty}");

    // A directory with the identity but without its log.
    std::fs::remove_dir(&data).unwrap();
    std::fs::rename(&aside, &data).unwrap();
    std::fs::rename(data.join("log"), c.dir().join("data/log-3.aside")).unwrap();
    let no_log = serve_refused(c.config_path(3));
    assert!(no_log.contains("has lost its log"), "{no_log}");
    std::fs::create_dir(data.join("log")).unwrap();
    let empty_log = serve_refused(c.config_path(3));
    assert!(empty_log.contains("has lost its log"), "{empty_log}");
    std::fs::remove_dir(data.join("log")).unwrap();
    std::fs::rename(c.dir().join("data/log-3.aside"), data.join("log")).unwrap();

    // init never touches a directory that holds something.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args(["init", "--config"])
        .arg(c.config_path(3))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not empty"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    cli_ok(&c, "app", &["apply", "kv", &put("meanwhile")]);
    c.start(3).unwrap();
    let node = client_for(&c, "app", vec![c.addr(3)]);
    for key in ["before", "meanwhile"] {
        eventually(Duration::from_secs(60), "node 3 catches up", || {
            let node = &node;
            async move {
                node.query(
                    "kv",
                    Payload::Json(format!(r#"{{"get":{{"key":"{key}"}}}}"#)),
                    Consistency::Stale,
                )
                .await
                .is_ok_and(|v| json(v) == r#"{"value":"x"}"#)
            }
        })
        .await;
    }
}

/// A second `kythira serve` on a running node's data directory is refused
/// before it touches the log or binds a port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_serves_one_process_at_a_time() {
    let c = start(Options::default());
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args(["serve", "--config"])
        .arg(c.config_path(1))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second process did not stop");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("in use by another kythira process"),
        "{stderr}"
    );
    // The first still serves.
    let admin = client(&c, "admin");
    assert!(admin.status_of(c.addr(1)).await.is_ok());
}
