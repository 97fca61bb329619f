//! The cluster changes under load: eight clients write through sessions
//! while a fourth process joins as a learner, is promoted, a voter is
//! removed, leadership is handed over, and the leader is removed. No
//! acknowledged write is lost, no call hangs, and every remaining node ends
//! with the same state.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use kythira::local::Options;
use kythira_api::{Consistency, Payload};
use kythira_client::Client;
use kythira_guest::codec;
use kythira_plugin_kv::{Command, Query, Response, Scan};
use support::*;

/// Longest any one call may take: the client's own deadline (60 s) and a
/// margin. A call still running after it is a hang.
const CALL_LIMIT: Duration = Duration::from_secs(90);

async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_LIMIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} still had no answer after {CALL_LIMIT:?}"))
}

fn put(key: &str, value: &str) -> Payload {
    Payload::Bytes(Bytes::from(
        codec::encode(&Command::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        })
        .unwrap(),
    ))
}

fn decode(p: Payload) -> Response {
    match p {
        Payload::Bytes(b) => codec::decode(&b).unwrap(),
        other => panic!("expected the plugin's bytes, got {other:?}"),
    }
}

async fn get(client: &Client, key: &str, consistency: Consistency) -> Option<Vec<u8>> {
    let q = Payload::Bytes(Bytes::from(
        codec::encode(&Query::Get {
            key: key.as_bytes().to_vec(),
        })
        .unwrap(),
    ));
    match decode(
        bounded("a read", client.query("kv", q, consistency))
            .await
            .unwrap(),
    ) {
        Response::Value(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

/// Every key and value the node at `client` has applied, by stale scans.
async fn state(client: &Client) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut all = BTreeMap::new();
    let mut after = None;
    loop {
        let q = Query::Scan(Scan {
            prefix: Vec::new(),
            start_after: after.clone(),
            limit: 1_000,
        });
        let q = Payload::Bytes(Bytes::from(codec::encode(&q).unwrap()));
        let answer = bounded("a scan", client.query("kv", q, Consistency::Stale))
            .await
            .unwrap();
        let Response::Entries { entries, more } = decode(answer) else {
            panic!("a scan answers entries");
        };
        after = entries.last().map(|(k, _)| k.clone());
        all.extend(entries);
        if !more {
            return all;
        }
    }
}

/// An admin client whose attempts may wait as long as a change takes:
/// membership changes and transfers answer once they have taken effect.
fn operator(c: &support::TestCluster) -> Client {
    let tls = kythira_transport::tls::Tls::load(&c.client_files("admin")).unwrap();
    let mut cfg = kythira_client::ClientConfig::new(c.endpoints(), tls);
    cfg.deadline = Duration::from_secs(120);
    cfg.attempt_timeout = Duration::from_secs(60);
    Client::new(cfg).unwrap()
}

/// Deploys the kv plugin as machine `kv`; the answer comes once it is
/// compiled (seconds in a debug build on a busy machine).
async fn deploy_kv(c: &support::TestCluster) {
    let component = std::fs::read(plugin("kv")).unwrap();
    operator(c)
        .deploy("kv", component.into(), kythira_api::DeployLimits::default())
        .await
        .expect("deploy kv");
}

/// Runs an operation that hands leadership over. A target that is not
/// caught up within an election timeout (half a second here; a busy 2-core
/// machine can stall a process that long) fails the transfer, as it should;
/// an operator asks again, and so does this.
async fn handed_over<T, F, Fut>(what: &str, op: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, kythira_client::ClientError>>,
{
    for _ in 0..5 {
        match bounded(what, op()).await {
            Ok(v) => return v,
            Err(e) if e.to_string().contains("did not catch up") => {
                eprintln!("{what}: {e}; again");
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: the target never caught up");
}

/// What the writers saw: each acknowledged (key, value).
struct Writers {
    acked: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    fn start(c: &support::TestCluster, n: usize) -> Self {
        let acked = Arc::new(std::sync::Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..n)
            .map(|i| {
                let client = client(c, "app");
                let (acked, count, stop) = (acked.clone(), count.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut session = bounded("a session", client.session())
                        .await
                        .expect("a session");
                    let mut serial = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        serial += 1;
                        let (key, value) = (format!("w{i}-{serial}"), format!("v{serial}"));
                        let answer = bounded(
                            &format!("write {key}"),
                            session.apply("kv", put(&key, &value)),
                        )
                        .await;
                        // Sessions retry through every leader change and
                        // removal until the client's deadline: a write that
                        // fails means the cluster stopped serving for that
                        // long.
                        let (_, out) = answer.unwrap_or_else(|e| panic!("write {key}: {e}"));
                        assert_eq!(decode(out), Response::Value(None), "{key} written once");
                        acked.lock().unwrap().push((key, value));
                        count.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Writers {
            acked,
            count,
            stop,
            tasks,
        }
    }

    /// Waits until `n` more writes are acknowledged: the change that
    /// follows happens under load.
    async fn progress(&self, n: u64) {
        let from = self.count.load(Ordering::SeqCst);
        eventually(Duration::from_secs(120), "writes acknowledged", || async {
            self.count.load(Ordering::SeqCst) >= from + n
        })
        .await;
    }

    async fn stop(self) -> Vec<(String, String)> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("a writer failed");
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconfiguration_under_load_loses_nothing() {
    let mut c = start(Options::default());
    deploy_kv(&c).await;
    let admin = operator(&c);
    let writers = Writers::start(&c, 8);
    writers.progress(40).await;

    // A fourth process joins as a learner and is promoted.
    let new = c.add_node().unwrap();
    c.start(new).unwrap();
    let m = bounded(
        "add-learner",
        admin.add_learner(new, c.peer_addr(new), c.addr(new)),
    )
    .await
    .expect("add-learner");
    assert!(m.members.iter().any(|s| s.id == new && s.role == "learner"));
    writers.progress(40).await;
    let m = bounded("promote", admin.promote(new))
        .await
        .expect("promote");
    assert!(m.committed && !m.joint, "{m:?}");
    assert!(m.members.iter().any(|s| s.id == new && s.role == "voter"));
    // Its log is caught up; its state machine too before it may lead (a
    // debug build compiles the plugin for seconds, and a leader answers
    // writes only once it has applied them).
    let early = writers.acked.lock().unwrap()[0].clone();
    let node = client_for(&c, "app", vec![c.addr(new)]);
    let q = Query::Get {
        key: early.0.as_bytes().to_vec(),
    };
    let q = Payload::Bytes(Bytes::from(codec::encode(&q).unwrap()));
    eventually(
        Duration::from_secs(120),
        "the new voter applies the log",
        || {
            let (node, q) = (&node, q.clone());
            async move {
                node.query("kv", q, Consistency::Stale)
                    .await
                    .is_ok_and(|v| decode(v) != Response::Value(None))
            }
        },
    )
    .await;
    writers.progress(40).await;

    // A follower voter is removed.
    let first = bounded("members", admin.members()).await.unwrap().leader;
    let gone = c
        .ids()
        .into_iter()
        .find(|id| *id != first && *id != new)
        .unwrap();
    let m = bounded("remove a follower", admin.remove_member(gone))
        .await
        .expect("remove a follower");
    assert!(m.members.iter().all(|s| s.id != gone), "{m:?}");
    writers.progress(40).await;

    // Leadership is handed to another voter.
    let to = m
        .members
        .iter()
        .map(|s| s.id)
        .find(|id| *id != m.leader)
        .unwrap();
    let (leader, _) = handed_over("transfer", || admin.transfer_leadership(to)).await;
    assert_eq!(leader, to);
    writers.progress(40).await;

    // The leader is removed: leadership moves on first.
    let m = handed_over("remove the leader", || admin.remove_member(to)).await;
    assert!(m.members.iter().all(|s| s.id != to), "{m:?}");
    assert_ne!(m.leader, to);
    writers.progress(40).await;
    let acked = writers.stop().await;

    let remaining: Vec<u64> = m.members.iter().map(|s| s.id).collect();
    assert_eq!(remaining.len(), 2, "{m:?}");
    for removed in [gone, to] {
        let s = bounded("status", admin.status_of(c.addr(removed)))
            .await
            .unwrap();
        assert_eq!(s.role, "removed", "node {removed}: {s:?}");
    }

    // Every acknowledged write is there, read linearizably through each
    // remaining node.
    for id in &remaining {
        let node = client_for(&c, "app", vec![c.addr(*id)]);
        for (key, value) in &acked {
            let got = get(&node, key, Consistency::Linearizable).await;
            assert_eq!(
                got.as_deref(),
                Some(value.as_bytes()),
                "node {id} lost {key}"
            );
        }
    }
    // Every remaining node holds the same state once it applied the same
    // log (a linearizable read above made each apply up to the leader's
    // commit index at the time, and no write came after).
    let mut states = Vec::new();
    for id in &remaining {
        let node = client_for(&c, "app", vec![c.addr(*id)]);
        states.push((*id, state(&node).await));
    }
    let (first_id, first_state) = &states[0];
    assert_eq!(first_state.len(), acked.len(), "only the writes, each once");
    for (id, s) in &states[1..] {
        assert!(
            s == first_state,
            "node {id} and node {first_id} differ ({} and {} keys)",
            s.len(),
            first_state.len()
        );
    }
}
