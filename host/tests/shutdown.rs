//! SIGTERM of the leader of three `kythira serve` processes under load:
//! leadership moves by handover, not by an election timeout; nothing
//! acknowledged is lost or applied twice; the process exits 0.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kythira::local::{LocalCluster, Options};
use kythira_api::{Consistency, Payload};
use support::*;

fn add(name: &str) -> Payload {
    Payload::Json(format!(r#"{{"add":{{"name":"{name}","delta":1}}}}"#))
}

fn get(name: &str) -> Payload {
    Payload::Json(format!(r#"{{"get":{{"name":"{name}"}}}}"#))
}

/// Ticks of one second: elections wait 10 to 20 s, and heartbeats come
/// every 2 s, so no follower can elect itself sooner than 8 s after the
/// leader's last heartbeat. A leader seen sooner than that was handed over.
const TICK_MS: u64 = 1_000;
const EARLIEST_ELECTION: Duration = Duration::from_secs(8);

fn slow_ticking_cluster() -> TestCluster {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_kythira"));
    let opts = Options {
        tick_ms: TICK_MS,
        ..Options::default()
    };
    let mut cluster = LocalCluster::create(&exe, dir.path(), &opts).unwrap();
    for id in cluster.ids() {
        // A request may wait out the longest election (20 s).
        let path = cluster.config_path(id).to_path_buf();
        let mut config = std::fs::read_to_string(&path).unwrap();
        config.push_str("\n[limits]\nrequest_timeout_ms = 30000\n");
        std::fs::write(&path, config).unwrap();
    }
    cluster.start_all().unwrap();
    TestCluster { cluster, dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_the_leader_hands_over_and_loses_nothing() {
    let mut c = slow_ticking_cluster();
    let admin = client(&c, "admin");
    // The first election alone takes 10 to 20 s here: wait for it (the
    // client's deadline is a minute) before the CLI's 30 s deploy.
    leader(&admin, &c).await;
    deploy(&c, "counter");
    let old = leader(&admin, &c).await;
    let old_term = admin.status_of(c.addr(old)).await.unwrap().term;

    // Eight clients, each with a session, each counting its own counter.
    const CLIENTS: usize = 8;
    const WRITES: u64 = 40;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut writers = Vec::new();
    for i in 0..CLIENTS {
        let client = client(&c, "app");
        let acked = acked.clone();
        let progress_tx = progress_tx.clone();
        writers.push(tokio::spawn(async move {
            let mut session = client.session().await.expect("session");
            for n in 1..=WRITES {
                let (_, out) = session
                    .apply("counter", add(&format!("c{i}")))
                    .await
                    .expect("write");
                // The answer is the counter's new value: a write applied
                // twice, or one lost after its answer, shows here.
                assert_eq!(json(out), n.to_string(), "client {i}");
                acked[i].store(n, Ordering::SeqCst);
                let _ = progress_tx.send(());
            }
        }));
    }
    for _ in 0..(CLIENTS as u64 * WRITES / 4) {
        progress.recv().await.unwrap();
    }

    let asked = Instant::now();
    let status = tokio::task::block_in_place(|| c.terminate(old, Duration::from_secs(90)));
    let at_stop: u64 = acked.iter().map(|a| a.load(Ordering::SeqCst)).sum();
    let status = status.expect("the leader exits by itself after SIGTERM");
    assert!(status.success(), "the leader exited with {status}");

    let survivors: Vec<_> = c.ids().into_iter().filter(|i| *i != old).collect();
    eventually(Duration::from_secs(60), "a new leader", || {
        let (admin, c, survivors) = (&admin, &c, &survivors);
        async move {
            for id in survivors {
                if let Ok(s) = admin.status_of(c.addr(*id)).await
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
    let moved = asked.elapsed();
    assert!(
        moved < EARLIEST_ELECTION,
        "leadership took {moved:?} to move: an election, not a handover"
    );
    assert!(
        at_stop < CLIENTS as u64 * WRITES,
        "the stop happened under load"
    );
    for w in writers {
        w.await.expect("a writer failed or hung");
    }

    // Every acknowledged write is there once, on both survivors.
    for id in survivors {
        let node = client_for(&c, "app", vec![c.addr(id)]);
        for i in 0..CLIENTS {
            let name = format!("c{i}");
            eventually(
                Duration::from_secs(60),
                "a survivor applies every write",
                || {
                    let node = &node;
                    let name = name.clone();
                    async move {
                        node.query("counter", get(&name), Consistency::Stale)
                            .await
                            .is_ok_and(|v| json(v) == WRITES.to_string())
                    }
                },
            )
            .await;
        }
    }
    // The stopped node comes back with everything it acknowledged.
    c.start(old).unwrap();
    let node = client_for(&c, "app", vec![c.addr(old)]);
    eventually(
        Duration::from_secs(60),
        "the restarted node catches up",
        || {
            let node = &node;
            async move {
                node.query("counter", get("c0"), Consistency::Stale)
                    .await
                    .is_ok_and(|v| json(v) == WRITES.to_string())
            }
        },
    )
    .await;
}
