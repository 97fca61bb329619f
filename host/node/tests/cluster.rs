//! Three nodes in one process, joined by channels instead of QUIC: the
//! node's own logic end to end (election, deploy, replicated applies,
//! linearizable reads, sessions, restart from disk).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kythira_api::{ApiError, Consistency, DeployLimits, Payload, Request, Response, SessionSeq};
use kythira_guest::codec;
use kythira_node::node::{SnapshotDone, SnapshotSent};
use kythira_node::{Caller, Network, Node, NodeConfig, NodeHandle};
use kythira_plugin_kv::{Command, Query, Response as KvResponse};
use kythira_raft::{Message, Role};
use kythira_storage::SnapshotStore;
use tokio::sync::mpsc;

fn kv_component() -> Bytes {
    let dir = std::env::var_os("KYTHIRA_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"));
    let path = dir.join("kv.wasm");
    Bytes::from(std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read {} ({e}); build the plugins with `just plugins`",
            path.display()
        )
    }))
}

/// Routes messages between in-process nodes; a node that is down drops them.
/// Snapshots are copied from the sender's store into the receiver's, then
/// their message is delivered, as the QUIC transport does.
#[derive(Clone, Default)]
struct LocalNet {
    links: Arc<Mutex<BTreeMap<u64, mpsc::Sender<Message>>>>,
    stores: Arc<Mutex<BTreeMap<u64, SnapshotStore>>>,
}

impl Network for LocalNet {
    fn send(&self, m: Message) {
        if let Some(tx) = self.links.lock().unwrap().get(&m.to) {
            let _ = tx.try_send(m);
        }
    }

    fn send_snapshot(&self, m: Message, done: SnapshotDone) {
        let net = self.clone();
        std::thread::spawn(move || {
            let copy = || -> Result<SnapshotSent, String> {
                let stores = net.stores.lock().unwrap().clone();
                let (Some(from), Some(to)) = (stores.get(&m.from), stores.get(&m.to)) else {
                    return Err("node down".into());
                };
                let mut reader = from
                    .open_latest()
                    .map_err(|e| e.to_string())?
                    .ok_or("none")?;
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut reader, &mut data).map_err(|e| e.to_string())?;
                let mut writer = to
                    .begin(reader.info().meta.clone())
                    .map_err(|e| e.to_string())?;
                writer.write_chunk(&data).map_err(|e| e.to_string())?;
                writer.finish().map_err(|e| e.to_string())?;
                let tx = net
                    .links
                    .lock()
                    .unwrap()
                    .get(&m.to)
                    .cloned()
                    .ok_or("node down")?;
                tx.blocking_send(m).map_err(|e| e.to_string())?;
                Ok(SnapshotSent {
                    bytes_sent: data.len() as u64,
                    resumed_from: 0,
                })
            };
            done(copy());
        });
    }
}

struct Cluster {
    net: LocalNet,
    dirs: Vec<tempfile::TempDir>,
    nodes: BTreeMap<u64, Node>,
}

fn config(id: u64, dir: &std::path::Path) -> NodeConfig {
    NodeConfig {
        id,
        voters: vec![1, 2, 3],
        client_addrs: BTreeMap::new(),
        peer_addrs: BTreeMap::new(),
        lease_reads: true,
        data_dir: dir.to_path_buf(),
        tick: Duration::from_millis(20),
        election_ticks: 10,
        heartbeat_ticks: 2,
        // A deploy answers once the plugin is compiled: in a debug build on
        // a busy 2-core machine, that alone can take half a minute.
        request_timeout: Duration::from_secs(120),
        session_ttl: Duration::from_secs(600),
        max_component_bytes: 14 << 20,
        max_entry_bytes: 15 << 20,
        snapshot_entries: 25,
        snapshot_bytes: 64 << 20,
        default_limits: DeployLimits::default(),
        cluster_id: "test".into(),
        seed: id,
    }
}

impl Cluster {
    fn new() -> Self {
        let mut c = Cluster {
            net: LocalNet::default(),
            dirs: (0..3).map(|_| tempfile::tempdir().unwrap()).collect(),
            nodes: BTreeMap::new(),
        };
        for id in 1..=3 {
            c.start(id);
        }
        c
    }

    fn start(&mut self, id: u64) {
        let (tx, rx) = mpsc::channel(1024);
        self.net.links.lock().unwrap().insert(id, tx);
        let cfg = config(id, self.dirs[id as usize - 1].path());
        // A stopped node's applier thread lets go of its snapshot store
        // once it has handled what was queued; the store is locked until
        // then (polled, with a deadline as a safety net).
        let dir = kythira_node::node::snapshot_dir(&cfg.data_dir);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let store = loop {
            match SnapshotStore::open(&dir) {
                Err(kythira_storage::StorageError::Locked { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                other => break other.unwrap(),
            }
        };
        self.net.stores.lock().unwrap().insert(id, store.clone());
        let node =
            Node::start_with_snapshots(cfg, store, self.net.clone(), rx).expect("node starts");
        self.nodes.insert(id, node);
    }

    /// Stops node `id` and waits until its task is gone, and with it the
    /// open log (a restart before that would find the store locked).
    async fn stop(&mut self, id: u64) {
        self.net.links.lock().unwrap().remove(&id);
        self.net.stores.lock().unwrap().remove(&id);
        let node = self.nodes.remove(&id).unwrap();
        node.task.abort();
        let _ = node.task.await;
    }

    fn handle(&self, id: u64) -> &NodeHandle {
        &self.nodes[&id].handle
    }

    /// Waits until some node leads (30 s as a safety net).
    async fn leader(&self) -> u64 {
        let (tx, mut rx) = mpsc::channel(3);
        for (id, n) in &self.nodes {
            let (id, tx, mut seen) = (*id, tx.clone(), n.handle.leadership());
            tokio::spawn(async move {
                if seen.wait_for(|l| l.role == Role::Leader).await.is_ok() {
                    let _ = tx.send(id).await;
                }
            });
        }
        tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a leader within 30 s")
            .expect("a leader")
    }
}

fn put(key: &str, value: &str) -> Request {
    Request::Apply {
        machine: "kv".into(),
        command: Payload::Bytes(
            codec::encode(&Command::Put {
                key: key.into(),
                value: value.into(),
            })
            .unwrap()
            .into(),
        ),
        session: None,
    }
}

fn get(key: &str, consistency: Consistency) -> Request {
    Request::Query {
        machine: "kv".into(),
        query: Payload::Bytes(
            codec::encode(&Query::Get { key: key.into() })
                .unwrap()
                .into(),
        ),
        consistency,
    }
}

fn value(reply: Response) -> Option<Vec<u8>> {
    let bytes = match reply {
        Response::Queried {
            output: Payload::Bytes(b),
        }
        | Response::Applied {
            output: Payload::Bytes(b),
            ..
        } => b,
        other => panic!("unexpected {other:?}"),
    };
    match codec::decode::<KvResponse>(&bytes).unwrap() {
        KvResponse::Value(v) => v,
        other => panic!("unexpected {other:?}"),
    }
}

async fn deploy(h: &NodeHandle) {
    let reply = h
        .call(
            Caller::Admin,
            Request::Deploy {
                machine: "kv".into(),
                component: kv_component(),
                limits: DeployLimits::default(),
            },
        )
        .await
        .expect("deploy");
    assert!(matches!(reply, Response::Deployed { .. }), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_reads_and_survives_a_restart() {
    let mut c = Cluster::new();
    let leader = c.leader().await;
    let h = c.handle(leader).clone();
    deploy(&h).await;
    for i in 0..20 {
        h.call(Caller::Client, put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put");
    }
    let got = h
        .call(Caller::Client, get("k7", Consistency::Linearizable))
        .await
        .unwrap();
    assert_eq!(value(got), Some(b"v7".to_vec()));

    // A follower refuses writes and names the leader.
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let err = c
        .handle(follower)
        .call(Caller::Client, put("x", "y"))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::NotLeader { .. }), "{err:?}");
    // Clients may not deploy.
    let err = h
        .call(
            Caller::Client,
            Request::Deploy {
                machine: "kv2".into(),
                component: kv_component(),
                limits: DeployLimits::default(),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized(_)), "{err:?}");

    // Restart every node: the log on disk brings the state back.
    for id in 1..=3 {
        c.stop(id).await;
    }
    for id in 1..=3 {
        c.start(id);
    }
    let leader = c.leader().await;
    let got = c
        .handle(leader)
        .call(Caller::Client, get("k19", Consistency::Linearizable))
        .await
        .unwrap();
    assert_eq!(value(got), Some(b"v19".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_serial_is_applied_once() {
    let c = Cluster::new();
    let h = c.handle(c.leader().await).clone();
    deploy(&h).await;
    let Response::Session { id } = h
        .call(Caller::Client, Request::RegisterSession)
        .await
        .unwrap()
    else {
        panic!("no session")
    };
    let seq = |serial| SessionSeq {
        id,
        serial,
        acked: serial,
    };
    let with = |serial, key: &str, value: &str| match put(key, value) {
        Request::Apply {
            machine, command, ..
        } => Request::Apply {
            machine,
            command,
            session: Some(seq(serial)),
        },
        _ => unreachable!(),
    };
    let first = h.call(Caller::Client, with(1, "a", "1")).await.unwrap();
    assert_eq!(value(first.clone()), None);
    h.call(Caller::Client, put("a", "2")).await.unwrap();
    // The retry of serial 1 returns the first answer and changes nothing.
    let again = h.call(Caller::Client, with(1, "a", "1")).await.unwrap();
    assert_eq!(value(again), None);
    let now = h
        .call(Caller::Client, get("a", Consistency::Linearizable))
        .await
        .unwrap();
    assert_eq!(value(now), Some(b"2".to_vec()));
    let err = h
        .call(
            Caller::Client,
            Request::Apply {
                machine: "kv".into(),
                command: Payload::Bytes(Bytes::from_static(b"\xff\xff")),
                session: Some(SessionSeq {
                    id: 999_999,
                    serial: 1,
                    acked: 0,
                }),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(err, ApiError::SessionExpired(999_999));
}

/// Snapshots every 25 entries: a node down while the others write catches
/// up through a snapshot, and every node restarts from its snapshot and the
/// log after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_the_compacted_log_catches_up_through_a_snapshot() {
    let mut c = Cluster::new();
    let leader = c.leader().await;
    deploy(c.handle(leader)).await;
    let down = (1..=3).find(|&id| id != leader).unwrap();
    c.stop(down).await;
    let h = c.handle(leader).clone();
    for i in 0..120 {
        h.call(Caller::Client, put(&format!("k{i}"), &format!("v{i}")))
            .await
            .expect("put");
    }
    let taken = h.metrics().snapshots.get();
    assert!(taken >= 3, "snapshots taken: {taken}");
    // The leader kept at most two intervals of log for the node down.
    let status = h.status().await.unwrap();
    assert!(
        status.first_index > 50,
        "log starts at {}",
        status.first_index
    );

    c.start(down);
    let back = c.handle(down).clone();
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            // A read served by the follower itself (ReadIndex): it has the
            // state once it answers with the last value.
            if let Ok(r) = back
                .call(Caller::Client, get("k119", Consistency::Linearizable))
                .await
                && value(r).as_deref() == Some(&b"v119"[..])
            {
                break;
            }
            let mut seen = back.leadership();
            let _ = tokio::time::timeout(Duration::from_millis(200), seen.changed()).await;
        }
    })
    .await;
    assert!(got.is_ok(), "node {down} did not catch up");
    let early = back
        .call(Caller::Client, get("k3", Consistency::Stale))
        .await
        .expect("stale read");
    assert_eq!(value(early).as_deref(), Some(&b"v3"[..]));

    // Every node restarts from its latest snapshot and the log after it.
    for id in 1..=3 {
        c.stop(id).await;
        c.start(id);
    }
    let leader = c.leader().await;
    let got = c
        .handle(leader)
        .call(Caller::Client, get("k42", Consistency::Linearizable))
        .await
        .expect("read after restart");
    assert_eq!(value(got).as_deref(), Some(&b"v42"[..]));
}

/// A removal whose joint configuration could not commit (it needs a voter
/// that is down) is refused before anything is proposed; removing the voter
/// that is down is allowed, and the cluster keeps a leader throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_needs_a_voter_that_is_down_is_refused() {
    let mut c = Cluster::new();
    let leader = c.leader().await;
    let others: Vec<u64> = (1..=3).filter(|&id| id != leader).collect();
    let (down, live) = (others[0], others[1]);
    c.stop(down).await;
    let h = c.handle(leader).clone();
    deploy(&h).await;
    // What is tested is a window of time: a voter silent for longer than an
    // election timeout (at most 400 ms here) counts as down. The live
    // follower answers heartbeats meanwhile.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let refused = h
        .call(Caller::Admin, Request::RemoveMember { id: live })
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("have not been heard from"), "{refused}");
    assert!(refused.contains(&down.to_string()), "{refused}");
    h.call(Caller::Client, put("still", "serving"))
        .await
        .expect("the cluster still writes");
    h.call(Caller::Admin, Request::RemoveMember { id: down })
        .await
        .expect("removing the voter that is down");
    h.call(Caller::Client, put("after", "removal"))
        .await
        .expect("the cluster still writes");
}

/// A leader that took over a moment ago has heard from nobody yet: it
/// waits up to an election timeout for its peers' answers before judging
/// who is alive, so a change asked for right after a transfer goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_waits_for_answers_before_judging_a_change() {
    let mut c = Cluster::new();
    let old = c.leader().await;
    let others: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let (down, new) = (others[0], others[1]);
    deploy(c.handle(old)).await;
    c.stop(down).await;
    // With `down` stopped, the change needs the old leader's answers to
    // the new one, which cannot have come yet when it is asked.
    let leader = match c
        .handle(old)
        .call(Caller::Admin, Request::TransferLeadership { to: new })
        .await
        .expect("transfer")
    {
        Response::Transferred { leader, .. } => leader,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(leader, new);
    c.handle(new)
        .call(Caller::Admin, Request::RemoveMember { id: down })
        .await
        .expect("removing the voter that is down, at once");
    c.handle(new)
        .call(Caller::Client, put("after", "removal"))
        .await
        .expect("the cluster still writes");
}
