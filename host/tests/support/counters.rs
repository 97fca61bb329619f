//! Load for the failure tests: writers that each count their own counter
//! through a session, so that an acknowledged write lost or applied twice
//! shows in an answer or in the final count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kythira::local::LocalCluster;
use kythira_api::Payload;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{client, json};

/// The counter plugin's command adding one to counter `name`.
pub fn add(name: &str) -> Payload {
    Payload::Json(format!(r#"{{"add":{{"name":"{name}","delta":1}}}}"#))
}

/// The counter plugin's query for counter `name`.
pub fn get(name: &str) -> Payload {
    Payload::Json(format!(r#"{{"get":{{"name":"{name}"}}}}"#))
}

/// Writers under way.
pub struct CounterLoad {
    /// How many writes each writer had acknowledged.
    pub acked: Arc<Vec<AtomicU64>>,
    /// One message per acknowledged write.
    pub progress: mpsc::UnboundedReceiver<()>,
    /// The writers; each fails if an answer is not its counter's next value.
    pub writers: Vec<JoinHandle<()>>,
}

impl CounterLoad {
    /// Waits until `n` more writes are acknowledged.
    pub async fn wait_for(&mut self, n: u64) {
        for _ in 0..n {
            self.progress.recv().await.expect("writers are running");
        }
    }

    /// Acknowledged writes so far, all writers together.
    pub fn total(&self) -> u64 {
        self.acked.iter().map(|a| a.load(Ordering::SeqCst)).sum()
    }

    /// Waits for every writer to finish, failing on any that failed.
    pub async fn finish(self) {
        for w in self.writers {
            w.await.expect("a writer failed or hung");
        }
    }
}

/// `clients` writers (as client `app`), writer `i` adding `writes` times to
/// counter `c{i}` of machine `counter`, each through its own session.
pub fn counter_load(c: &LocalCluster, clients: usize, writes: u64) -> CounterLoad {
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..clients).map(|_| AtomicU64::new(0)).collect());
    let (progress_tx, progress) = mpsc::unbounded_channel();
    let writers = (0..clients)
        .map(|i| {
            let client = client(c, "app");
            let acked = acked.clone();
            let progress_tx = progress_tx.clone();
            tokio::spawn(async move {
                let mut session = client.session().await.expect("session");
                for n in 1..=writes {
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
            })
        })
        .collect();
    CounterLoad {
        acked,
        progress,
        writers,
    }
}

/// Waits until node `id` has applied every counter at `writes` (stale reads
/// of that node alone: what it applied, not what a leader says).
pub async fn counters_reach(c: &LocalCluster, id: u64, clients: usize, writes: u64, what: &str) {
    let node = super::client_for(c, "app", vec![c.addr(id)]);
    for i in 0..clients {
        let name = format!("c{i}");
        super::eventually(std::time::Duration::from_secs(60), what, || {
            let (node, name) = (&node, name.clone());
            async move {
                node.query("counter", get(&name), kythira_api::Consistency::Stale)
                    .await
                    .is_ok_and(|v| json(v) == writes.to_string())
            }
        })
        .await;
    }
}
