//! Membership and leadership from the CLI, against real `kythira serve`
//! processes: a node that joins, learns the log, is promoted and serves;
//! removed nodes stop and say so; bad requests are refused and change
//! nothing; leadership moves by transfer without an election timeout; and
//! only `admin` certificates may do any of it.

mod support;

use std::time::{Duration, Instant};

use kythira::local::{LocalCluster, Options};
use kythira_api::{Consistency, Members, Payload};
use kythira_client::{Client, ClientConfig};
use kythira_transport::tls::Tls;
use support::*;

fn put(key: &str, value: &str) -> String {
    format!(r#"{{"put":{{"key":"{key}","value":"{value}"}}}}"#)
}

fn get(key: &str) -> String {
    format!(r#"{{"get":{{"key":"{key}"}}}}"#)
}

/// `members list --json`, through the CLI.
fn members(c: &LocalCluster) -> Members {
    let out = cli_ok(c, "admin", &["--json", "members", "list"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn roles(m: &Members) -> Vec<(u64, String)> {
    m.members.iter().map(|s| (s.id, s.role.clone())).collect()
}

/// Client `who` whose attempts may wait a minute: a deploy answers once the
/// plugin is compiled (seconds in a debug build on a busy machine), and a
/// membership change or transfer once it has taken effect.
fn patient(c: &LocalCluster, who: &str) -> kythira_client::Client {
    patient_at(c, who, c.endpoints())
}

/// [`patient`], reaching `endpoints` only.
fn patient_at(
    c: &LocalCluster,
    who: &str,
    endpoints: Vec<std::net::SocketAddr>,
) -> kythira_client::Client {
    let tls = kythira_transport::tls::Tls::load(&c.client_files(who)).unwrap();
    let mut cfg = kythira_client::ClientConfig::new(endpoints, tls);
    cfg.deadline = std::time::Duration::from_secs(120);
    cfg.attempt_timeout = std::time::Duration::from_secs(60);
    kythira_client::Client::new(cfg).unwrap()
}

/// Deploys the kv plugin as machine `kv`.
async fn deploy_kv(c: &LocalCluster) {
    let component = std::fs::read(plugin("kv")).unwrap();
    patient(c, "admin")
        .deploy("kv", component.into(), kythira_api::DeployLimits::default())
        .await
        .expect("deploy kv");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_is_promoted_and_members_are_removed() {
    let mut c = start(Options::default());
    deploy_kv(&c).await;
    cli_ok(&c, "app", &["apply", "kv", &put("before", "1")]);
    let m = members(&c);
    assert_eq!(
        roles(&m),
        [
            (1, "voter".into()),
            (2, "voter".into()),
            (3, "voter".into())
        ]
    );

    // Node 4 starts with `join = true`: it serves, but is no member yet.
    let new = c.add_node().unwrap();
    c.start(new).unwrap();
    let admin = client(&c, "admin");
    let s = admin.status_of(c.addr(new)).await.unwrap();
    assert_eq!((s.leader, s.commit), (None, 0), "{s:?}");

    let (peer, addr) = (c.peer_addr(new).to_string(), c.addr(new).to_string());
    let out = cli_ok(
        &c,
        "admin",
        &[
            "members",
            "add-learner",
            &new.to_string(),
            "--peer",
            &peer,
            "--client",
            &addr,
        ],
    );
    assert!(
        out.contains(&format!("node {new} learner peer {peer} client {addr}")),
        "{out}"
    );
    // The learner receives the log, deploy included, and serves a
    // linearizable read at once: it waits until it has applied up to the
    // leader's read index, so it knows the machine even if the deploy was
    // not applied yet when the read arrived.
    let learner = patient_at(&c, "app", vec![c.addr(new)]);
    let got = learner
        .query(
            "kv",
            Payload::Json(get("before")),
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert_eq!(json(got), r#"{"value":"1"}"#);

    // Adding it again, promoting a voter, touching unknown ids: refused.
    let e = cli_err(
        &c,
        "admin",
        &[
            "members",
            "add-learner",
            &new.to_string(),
            "--peer",
            "127.0.0.1:1",
            "--client",
            "127.0.0.1:2",
        ],
    );
    assert!(
        e.contains(&format!("node {new} is already a member (learner)")),
        "{e}"
    );
    let e = cli_err(
        &c,
        "admin",
        &[
            "members",
            "add-learner",
            "9",
            "--peer",
            &peer,
            "--client",
            "127.0.0.1:2",
        ],
    );
    assert!(
        e.contains(&format!("already the address of node {new}")),
        "{e}"
    );
    let e = cli_err(&c, "admin", &["members", "promote", "2"]);
    assert!(e.contains("node 2 is a voter already"), "{e}");
    let e = cli_err(&c, "admin", &["members", "promote", "9"]);
    assert!(e.contains("node 9 is not a member"), "{e}");
    let e = cli_err(&c, "admin", &["members", "remove", "9"]);
    assert!(e.contains("node 9 is not a member"), "{e}");
    let e = cli_err(&c, "admin", &["transfer", &new.to_string()]);
    assert!(e.contains("is a learner; promote it first"), "{e}");
    assert_eq!(members(&c).members.len(), 4, "nothing changed");

    // Promotion: a voter of the final configuration, committed.
    let out = cli_ok(&c, "admin", &["members", "promote", &new.to_string()]);
    assert!(out.contains(&format!("node {new} voter")), "{out}");
    let m = members(&c);
    assert!(m.committed && !m.joint, "{m:?}");
    assert_eq!(roles(&m).iter().filter(|(_, r)| r == "voter").count(), 4);
    // Restarted, the new voter finds its place from its log: it serves
    // linearizable reads, and writes go through it.
    c.kill(new);
    c.start(new).unwrap();
    let got = learner
        .query(
            "kv",
            Payload::Json(get("before")),
            Consistency::Linearizable,
        )
        .await
        .unwrap();
    assert_eq!(json(got), r#"{"value":"1"}"#);
    // (After the read: a write is not retried on the connection the kill
    // broke, its outcome being unknown.)
    learner
        .apply("kv", Payload::Json(put("through-new", "1")))
        .await
        .unwrap();

    // Remove a follower: it stops, says so, and the rest go on.
    let leader = leader(&admin, &c).await;
    let gone = c
        .ids()
        .into_iter()
        .find(|id| *id != leader && *id != new)
        .unwrap();
    let out = cli_ok(&c, "admin", &["members", "remove", &gone.to_string()]);
    assert!(!out.contains(&format!("node {gone} ")), "{out}");
    eventually(Duration::from_secs(30), "the removed node says so", || {
        let (admin, c) = (&admin, &c);
        async move {
            admin
                .status_of(c.addr(gone))
                .await
                .is_ok_and(|s| s.role == "removed")
        }
    })
    .await;
    // Asked alone, it refuses (clients that know other nodes move on).
    let mut cfg = ClientConfig::new(
        vec![c.addr(gone)],
        Tls::load(&c.client_files("app")).unwrap(),
    );
    cfg.deadline = Duration::from_secs(2);
    let alone = Client::new(cfg).unwrap();
    let e = alone
        .query("kv", Payload::Json(get("before")), Consistency::Stale)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!("node {gone} was removed from the cluster")),
        "{e}"
    );
    // Restarted, it replays its log and is removed again.
    c.kill(gone);
    c.start(gone).unwrap();
    eventually(Duration::from_secs(60), "the restarted node knows", || {
        let (admin, c) = (&admin, &c);
        async move {
            admin
                .status_of(c.addr(gone))
                .await
                .is_ok_and(|s| s.role == "removed")
        }
    })
    .await;
    let e = cli_err(
        &c,
        "admin",
        &[
            "members",
            "add-learner",
            &gone.to_string(),
            "--peer",
            "127.0.0.1:1",
            "--client",
            "127.0.0.1:2",
        ],
    );
    assert!(e.contains("was removed") && e.contains("new id"), "{e}");
    cli_ok(&c, "app", &["apply", "kv", &put("after", "2")]);

    // Remove the leader: leadership moves first, then it goes.
    let out = cli_ok(&c, "admin", &["members", "remove", &leader.to_string()]);
    assert!(!out.contains(&format!("node {leader} ")), "{out}");
    let m = members(&c);
    assert_ne!(m.leader, leader);
    let left: Vec<u64> = m.members.iter().map(|s| s.id).collect();
    assert_eq!(left.len(), 2, "{m:?}");
    eventually(
        Duration::from_secs(30),
        "the old leader says it was removed",
        || {
            let (admin, c) = (&admin, &c);
            async move {
                admin
                    .status_of(c.addr(leader))
                    .await
                    .is_ok_and(|s| s.role == "removed")
            }
        },
    )
    .await;
    for id in left {
        let node = client_for(&c, "app", vec![c.addr(id)]);
        let got = node
            .query("kv", Payload::Json(get("after")), Consistency::Linearizable)
            .await
            .unwrap();
        assert_eq!(json(got), r#"{"value":"2"}"#);
    }
    // Two voters left; neither may go below one.
    let last = members(&c);
    let follower = last
        .members
        .iter()
        .find(|s| s.id != last.leader)
        .unwrap()
        .id;
    cli_ok(&c, "admin", &["members", "remove", &follower.to_string()]);
    let e = cli_err(
        &c,
        "admin",
        &["members", "remove", &last.leader.to_string()],
    );
    assert!(e.contains("is the last voter"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_moves_leadership_without_an_election_timeout() {
    // Long election timeouts (2 to 4 s): an election would show.
    let c = start(Options {
        tick_ms: 200,
        ..Options::default()
    });
    let admin = client(&c, "admin");
    let old = leader(&admin, &c).await;
    let before = admin.status_of(c.addr(old)).await.unwrap().term;
    let to = c.ids().into_iter().find(|id| *id != old).unwrap();
    let started = Instant::now();
    let out = cli_ok(&c, "admin", &["transfer", &to.to_string()]);
    let took = started.elapsed();
    assert_eq!(out.trim(), format!("node {to} leads term {}", before + 1));
    assert!(
        took < Duration::from_secs(2),
        "the transfer took {took:?}, as long as an election timeout"
    );
    // Every node sees the new leader.
    for id in c.ids() {
        eventually(
            Duration::from_secs(30),
            "every node sees the new leader",
            || {
                let (admin, c) = (&admin, &c);
                async move {
                    admin
                        .status_of(c.addr(id))
                        .await
                        .is_ok_and(|s| s.leader == Some(to) && s.term == before + 1)
                }
            },
        )
        .await;
    }
    // To itself: nothing to do. To a stranger: refused.
    let out = cli_ok(&c, "admin", &["transfer", &to.to_string()]);
    assert_eq!(out.trim(), format!("node {to} leads term {}", before + 1));
    let e = cli_err(&c, "admin", &["transfer", "9"]);
    assert!(e.contains("node 9 is not a member"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_may_not_deploy_change_members_or_transfer() {
    let mut c = start(Options::default());
    let admin = client(&c, "admin");
    let leader = leader(&admin, &c).await;
    let before = admin.members().await.unwrap();
    let other = c.ids().into_iter().find(|id| *id != leader).unwrap();
    let new = c.add_node().unwrap();
    let kv = plugin("kv");
    let attempts: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["deploy".into(), "kv".into(), kv.display().to_string()],
            "deploying code",
        ),
        (
            vec![
                "members".into(),
                "add-learner".into(),
                new.to_string(),
                "--peer".into(),
                c.peer_addr(new).to_string(),
                "--client".into(),
                c.addr(new).to_string(),
            ],
            "changing the membership",
        ),
        (
            vec!["members".into(), "remove".into(), other.to_string()],
            "changing the membership",
        ),
        (
            vec!["members".into(), "promote".into(), other.to_string()],
            "changing the membership",
        ),
        (
            vec!["transfer".into(), other.to_string()],
            "transferring leadership",
        ),
    ];
    for (args, action) in attempts {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = cli_err(&c, "app", &args);
        assert!(
            e.contains(action) && e.contains("`admin` role") && e.contains("`client` role"),
            "{args:?}: {e}"
        );
    }
    // Nothing changed: the same members, the same leader, no machine.
    let after = admin.members().await.unwrap();
    assert_eq!(
        after
            .members
            .iter()
            .map(|m| (m.id, &m.role))
            .collect::<Vec<_>>(),
        before
            .members
            .iter()
            .map(|m| (m.id, &m.role))
            .collect::<Vec<_>>()
    );
    assert_eq!((after.leader, after.term), (before.leader, before.term));
    assert_eq!(after.config_index, before.config_index);
    let s = admin.status_of(c.addr(leader)).await.unwrap();
    assert!(s.machines.is_empty(), "{s:?}");
    // The client certificate still reads and lists.
    cli_ok(&c, "app", &["members", "list"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_lags_is_not_promoted_and_changes_go_one_at_a_time() {
    let mut c = start(Options::default());
    // A learner that never starts: it can only lag.
    let absent = c.add_node().unwrap();
    let (peer, addr) = (c.peer_addr(absent).to_string(), c.addr(absent).to_string());
    cli_ok(
        &c,
        "admin",
        &[
            "members",
            "add-learner",
            &absent.to_string(),
            "--peer",
            &peer,
            "--client",
            &addr,
        ],
    );
    // Promoting it waits (the nodes' request timeout, 10 s) and refuses
    // with its lag; meanwhile no other change may start.
    let promote = c
        .cli("admin")
        .args(["members", "promote", &absent.to_string()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(Duration::from_secs(30), "the promotion under way", || {
        let c = &c;
        async move {
            // Refused whether or not the promotion holds the lock (node 1
            // is a voter): only the reason tells.
            let e = cli_err(c, "admin", &["members", "promote", "1"]);
            e.contains(&format!(
                "promoting node {absent} is under way; one change at a time"
            ))
        }
    })
    .await;
    let e = cli_err(&c, "admin", &["transfer", "2"]);
    assert!(e.contains("under way; one change at a time"), "{e}");
    let out = promote.wait_with_output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8(out.stderr).unwrap();
    assert!(
        e.contains(&format!("learner {absent} is")) && e.contains("entries behind the leader"),
        "{e}"
    );
    let m = members(&c);
    assert!(
        m.members
            .iter()
            .any(|s| s.id == absent && s.role == "learner"),
        "still a learner: {m:?}"
    );
    // It can be removed although it never answers.
    let out = cli_ok(&c, "admin", &["members", "remove", &absent.to_string()]);
    assert!(!out.contains(&format!("node {absent} ")), "{out}");
    assert_eq!(members(&c).members.len(), 3);
}
