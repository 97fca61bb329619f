//! What an operator sees of a real 3-node cluster of `kythira serve`
//! processes: `/metrics` and `/health` over HTTPS with client
//! certificates, and `kythira status`, while the cluster works, loses its
//! leader, loses its quorum and gets it back.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use kythira::local::{LocalCluster, Options};
use kythira_api::Payload;
use serde_json::Value;
use support::https;
use support::*;
use tokio_rustls::TlsConnector;

/// Safety net of every wait below; each ends as soon as its condition holds.
const WAIT: Duration = Duration::from_secs(60);

/// One scrape: every sample by its `name{labels}`.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// Parses the text format: `# HELP`/`# TYPE` comments, then
    /// `name{labels} value` lines.
    fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line:?}"));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("not a number: {line:?}")),
            };
            assert!(
                samples.insert(series.to_string(), value).is_none(),
                "{series} twice"
            );
        }
        Scrape(samples)
    }

    /// The value of `series`; it must be exported.
    fn get(&self, series: &str) -> f64 {
        *self
            .0
            .get(series)
            .unwrap_or_else(|| panic!("{series} is not exported; have {:?}", self.0.keys()))
    }

    /// The value of `series`, 0 if not exported yet (a machine a node has
    /// not deployed yet).
    fn get_or_zero(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// Series whose name starts with `prefix`.
    fn matching(&self, prefix: &str) -> Vec<(&str, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }

    fn role(&self) -> &'static str {
        let roles = ["leader", "follower", "candidate", "pre-candidate"];
        let on: Vec<_> = roles
            .into_iter()
            .filter(|r| self.get(&format!("kythira_raft_role{{role=\"{r}\"}}")) == 1.0)
            .collect();
        assert_eq!(on.len(), 1, "exactly one role is 1: {on:?}");
        on[0]
    }
}

struct Http {
    tls: TlsConnector,
    addrs: BTreeMap<u64, SocketAddr>,
}

impl Http {
    fn new(c: &LocalCluster) -> Self {
        Http {
            tls: https::connector(c, "app").unwrap(),
            addrs: c
                .ids()
                .into_iter()
                .map(|id| (id, c.http_addr(id).unwrap()))
                .collect(),
        }
    }

    async fn metrics(&self, id: u64) -> Scrape {
        let (status, content_type, body) = https::get(&self.tls, self.addrs[&id], "/metrics")
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(content_type.starts_with("text/plain"), "{content_type}");
        Scrape::parse(&body)
    }

    /// The status code and the JSON body of `/health`; `None` if the node
    /// does not answer (it is down).
    async fn health(&self, id: u64) -> Option<(u16, Value)> {
        let (status, content_type, body) = https::get(&self.tls, self.addrs[&id], "/health")
            .await
            .ok()?;
        assert_eq!(content_type, "application/json");
        Some((status, serde_json::from_str(&body).unwrap()))
    }
}

fn put(i: usize) -> Payload {
    Payload::Json(format!(r#"{{"put":{{"key":"k{i}","value":"v{i}"}}}}"#))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_follow_the_cluster() {
    let mut c = start(Options {
        http: true,
        ..Options::default()
    });
    deploy(&c, "kv");
    let client = client(&c, "app");
    let leader = leader(&client, &c).await;
    let followers: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    let http = Http::new(&c);

    // Every node healthy once each has heard from the leader.
    for id in c.ids() {
        eventually(WAIT, "every node healthy", || async {
            http.health(id).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
        let (_, body) = http.health(id).await.unwrap();
        assert_eq!(body["status"], "ok", "{body}");
        assert_eq!(body["id"], id, "{body}");
        assert_eq!(body["leader"], leader, "{body}");
    }

    // Roles, term and leader as each node sees them.
    let before: BTreeMap<u64, Scrape> = {
        let mut m = BTreeMap::new();
        for id in c.ids() {
            m.insert(id, http.metrics(id).await);
        }
        m
    };
    let term = before[&leader].get("kythira_raft_term");
    assert!(term >= 1.0);
    assert_eq!(before[&leader].role(), "leader");
    // The leader's empty entry of its term, then the deploy, committed and
    // applied before the deploy was answered.
    assert!(before[&leader].get("kythira_raft_commit_index") >= 2.0);
    assert!(before[&leader].get("kythira_applied_index") >= 2.0);
    for id in c.ids() {
        let m = &before[&id];
        assert_eq!(m.get("kythira_raft_leader"), leader as f64, "node {id}");
        assert!(
            m.get("kythira_raft_leader_changes_total") >= 1.0,
            "node {id}"
        );
        if id != leader {
            assert_eq!(m.role(), "follower", "node {id}");
            assert!(
                m.matching("kythira_replication_lag_entries").is_empty(),
                "only a leader reports lag: {:?}",
                m.matching("kythira_replication_lag_entries")
            );
        }
    }
    assert_eq!(
        before[&leader]
            .matching("kythira_replication_lag_entries{")
            .len(),
        2,
        "one lag per peer on the leader"
    );

    // The leader answered the deploy once it had applied it: the machine
    // shows, with nothing applied yet.
    assert_eq!(
        before[&leader].get(r#"kythira_machine_applies_total{machine="kv"}"#),
        0.0
    );

    // Writes: the indexes, the machine's applies and fuel, the log's writes
    // and the leader's proposals all move, on every node.
    const WRITES: usize = 30;
    let mut last = 0;
    for i in 0..WRITES {
        let (index, _) = client.apply("kv", put(i)).await.unwrap();
        last = index;
    }
    let kv = |m: &Scrape, what: &str| m.get(&format!("kythira_machine_{what}{{machine=\"kv\"}}"));
    let kv_before = |m: &Scrape, what: &str| {
        m.get_or_zero(&format!("kythira_machine_{what}{{machine=\"kv\"}}"))
    };
    for id in c.ids() {
        eventually(WAIT, "every node applied the writes", || async {
            http.metrics(id).await.get("kythira_applied_index") >= last as f64
        })
        .await;
        let (b, a) = (&before[&id], http.metrics(id).await);
        assert!(
            a.get("kythira_raft_commit_index") >= last as f64,
            "node {id}"
        );
        assert!(a.get("kythira_raft_last_index") >= last as f64, "node {id}");
        assert!(
            kv(&a, "applies_total") >= kv_before(b, "applies_total") + WRITES as f64,
            "node {id}: {} then {}",
            kv_before(b, "applies_total"),
            kv(&a, "applies_total")
        );
        assert!(
            kv(&a, "fuel_used_total") > kv_before(b, "fuel_used_total"),
            "node {id}"
        );
        assert!(
            kv(&a, "apply_seconds_count") > kv_before(b, "apply_seconds_count"),
            "node {id}"
        );
        assert!(
            a.get("kythira_apply_seconds_count") > b.get("kythira_apply_seconds_count"),
            "node {id}"
        );
        // Every write reached this node's log through a durable write.
        assert!(
            a.get("kythira_log_fsync_seconds_count") > b.get("kythira_log_fsync_seconds_count"),
            "node {id}"
        );
        assert!(
            a.get("kythira_log_write_entries_sum")
                >= b.get("kythira_log_write_entries_sum") + WRITES as f64,
            "node {id}"
        );
    }
    let m = http.metrics(leader).await;
    assert!(
        m.get("kythira_proposals_total")
            >= before[&leader].get("kythira_proposals_total") + WRITES as f64
    );
    // The followers catch up: their lag on the leader drops to 0.
    eventually(WAIT, "the followers' lag drops to 0", || async {
        let m = http.metrics(leader).await;
        followers
            .iter()
            .all(|f| m.get(&format!("kythira_replication_lag_entries{{peer=\"{f}\"}}")) == 0.0)
    })
    .await;

    // A write sent to a follower is refused there (and redirected).
    let follower = followers[0];
    let refused = |m: &Scrape| m.get(r#"kythira_proposal_failures_total{reason="not_leader"}"#);
    let was = refused(&http.metrics(follower).await);
    client_for(&c, "app", vec![c.addr(follower)])
        .apply("kv", put(WRITES))
        .await
        .unwrap();
    assert_eq!(refused(&http.metrics(follower).await), was + 1.0);

    // `kythira status`: a row per node, one leader, nobody behind.
    let table = cli_ok(&c, "app", &["status"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..9],
        [
            "ENDPOINT", "ID", "ROLE", "TERM", "LEADER", "LAST", "COMMIT", "APPLIED", "LAG"
        ]
    );
    assert_eq!(rows.len(), 4, "{table}");
    for row in &rows[1..] {
        let role = if row[1] == leader.to_string() {
            "leader"
        } else {
            "follower"
        };
        assert_eq!(row[2], role, "{table}");
        assert_eq!(row[4], leader.to_string(), "{table}");
        assert!(
            row[8].parse::<u64>().is_ok(),
            "a number of entries: {table}"
        );
    }

    // The leader dies: a survivor sees a new leader in a later term.
    let watcher = followers[1];
    let changes = |m: &Scrape| m.get("kythira_raft_leader_changes_total");
    let changes_before = changes(&http.metrics(watcher).await);
    c.kill(leader);
    eventually(WAIT, "a new leader", || async {
        let m = http.metrics(watcher).await;
        let now = m.get("kythira_raft_leader");
        now != 0.0 && now != leader as f64
    })
    .await;
    let m = http.metrics(watcher).await;
    assert!(changes(&m) > changes_before);
    assert!(m.get("kythira_raft_term") > term);
    // Both transitions are in the logs, with their fields.
    let (new_leader, new_term) = (
        m.get("kythira_raft_leader") as u64,
        m.get("kythira_raft_term") as u64,
    );
    let log = |id: u64| std::fs::read_to_string(c.dir().join(format!("node-{id}.log"))).unwrap();
    let won = format!("became leader node={new_leader} term={new_term} ");
    assert!(
        log(new_leader).lines().any(|l| l.contains(" INFO ")
            && l.contains(&won)
            && l.contains("reason=\"won the election\"")),
        "no {won:?} in:\n{}",
        log(new_leader)
    );
    let seen = format!("leader changed node={watcher} term={new_term} leader={new_leader} ");
    assert!(
        log(watcher).contains(&seen),
        "no {seen:?} in:\n{}",
        log(watcher)
    );
    let table = cli_ok(&c, "app", &["status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&c.addr(leader).to_string()) && l.contains("unreachable")),
        "{table}"
    );

    // Then the other: the last node loses its leader and says so.
    let other = followers[0];
    c.kill(other);
    eventually(WAIT, "the last node reports no leader", || async {
        http.health(watcher).await.is_some_and(|(s, _)| s == 503)
    })
    .await;
    let (_, body) = http.health(watcher).await.unwrap();
    assert_eq!(body["status"], "unavailable", "{body}");
    assert_eq!(body["reason"], "no leader known", "{body}");
    assert!(body["leader"].is_null(), "{body}");
    let m = http.metrics(watcher).await;
    assert_eq!(m.get("kythira_raft_leader"), 0.0);
    assert_ne!(m.role(), "leader");
    assert!(m.matching("kythira_replication_lag_entries{").is_empty());

    // The quorum back: healthy again, everywhere.
    c.start(leader).unwrap();
    c.start(other).unwrap();
    for id in c.ids() {
        eventually(WAIT, "healthy again", || async {
            http.health(id).await.is_some_and(|(s, _)| s == 200)
        })
        .await;
    }
    let m = http.metrics(watcher).await;
    assert_ne!(m.get("kythira_raft_leader"), 0.0);
}
