//! SIGTERM of the leader of three `kythira serve` processes under load:
//! leadership moves by handover, not by an election timeout; nothing
//! acknowledged is lost or applied twice; the process exits 0.

mod support;

use std::time::{Duration, Instant};

use kythira::local::{LocalCluster, Options};
use kythira_api::Consistency;
use support::counters::{counter_load, counters_reach, get};
use support::*;

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
    let mut load = counter_load(&c, CLIENTS, WRITES);
    load.wait_for(CLIENTS as u64 * WRITES / 4).await;

    let at_stop = load.total();
    let asked = Instant::now();
    let status = tokio::task::block_in_place(|| c.terminate(old, Duration::from_secs(90)));
    let status = status.expect("the leader exits by itself after SIGTERM");
    assert!(status.success(), "the leader exited with {status}");

    new_leader_after(&admin, &c, old, old_term, Duration::from_secs(60)).await;
    let moved = asked.elapsed();
    assert!(
        moved < EARLIEST_ELECTION,
        "leadership took {moved:?} to move: an election, not a handover"
    );
    assert!(
        at_stop < CLIENTS as u64 * WRITES,
        "the stop happened under load"
    );
    load.finish().await;

    // Every acknowledged write is there once, on both survivors.
    for id in c.ids().into_iter().filter(|i| *i != old) {
        counters_reach(&c, id, CLIENTS, WRITES, "a survivor applies every write").await;
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
