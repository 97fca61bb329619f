//! The thread that applies committed entries through the plugin runtime and
//! answers whoever waits on them.
//!
//! Plugin calls block (they are bounded by fuel, not by await points), so
//! they run here rather than on the event loop, which keeps electing,
//! replicating and writing while a batch applies. One ordered channel
//! carries entries, waiters and reads, so a waiter is always registered
//! before its entry can arrive, and a read is served only once the entries
//! up to its index are applied.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::Instant;

use bytes::Bytes;
use kythira_api::{ApiError, MachineStatus, PluginReport, Reply};
use kythira_raft::Entry;
use tokio::sync::oneshot;

use crate::addresses::AddressBook;
use crate::image::Image;
use crate::machines::{Fork, Machines, PluginInfo};
use crate::metrics::{Metrics, ProposalFailure};
use crate::snapshots::Policy;
use kythira_storage::{SnapshotReader, SnapshotStore};

/// Work for the applier, in log order.
pub enum Work {
    /// Committed entries.
    Apply(Vec<Entry>),
    /// Answer `reply` when the entry at `index` is applied, if its term is `term`.
    Wait {
        /// Index of the proposal.
        index: u64,
        /// Term of the proposal.
        term: u64,
        /// Where the answer goes.
        reply: oneshot::Sender<Reply>,
    },
    /// A query to serve once `index` is applied (a confirmed ReadIndex).
    Read {
        /// Applied index the answer must reflect.
        index: u64,
        /// Machine name; empty for a barrier, answered with no bytes.
        machine: String,
        /// The query, in the plugin's encoding.
        query: Bytes,
        /// Where the answer goes.
        reply: oneshot::Sender<Result<Bytes, ApiError>>,
    },
    /// A copy of machine `machine`'s state and code, for a dry run.
    Fork {
        /// The machine.
        machine: String,
        /// Where the copy goes (`None`: no such machine).
        reply: oneshot::Sender<Option<Fork>>,
    },
    /// Every machine as `kythira plugins` lists it.
    Plugins {
        /// Where the list goes.
        reply: oneshot::Sender<Vec<PluginReport>>,
    },
    /// This node stopped leading: fail every waiter, their outcome is unknown.
    Abandon,
    /// The core installed the snapshot at `index`: replace the state with
    /// the one `reader` holds.
    Install {
        /// Index of the snapshot.
        index: u64,
        /// The snapshot's file, opened when the core installed it.
        reader: SnapshotReader,
    },
    /// The node stopped: end the thread once what came before is handled,
    /// releasing the state machines and the snapshot store although handles
    /// (which can queue reads) may outlive the node.
    Stop,
}

/// How the applier snapshots.
pub struct Snapshots {
    /// When.
    pub policy: Policy,
    /// Where images of due snapshots go (to the event loop, which writes them).
    pub images: tokio::sync::mpsc::UnboundedSender<Image>,
    /// Where installed snapshots are read from.
    pub store: SnapshotStore,
}

/// The applier thread's state.
struct State {
    machines: Machines,
    shared: Arc<Shared>,
    snapshots: Snapshots,
    waiters: HashMap<u64, (u64, oneshot::Sender<Reply>)>,
    reads: Vec<Read>,
}

impl State {
    fn handle(&mut self, w: Work) {
        match w {
            // The thread's loop ends on it before it gets here.
            Work::Stop => {}
            Work::Apply(entries) => {
                // Batches end where a snapshot falls due, so that its image
                // is the state at exactly that index.
                let mut rest = &entries[..];
                while !rest.is_empty() {
                    let policy = &mut self.snapshots.policy;
                    let due = rest.iter().position(|e| policy.due_after(e));
                    let (batch, tail) = rest.split_at(due.map_or(rest.len(), |i| i + 1));
                    self.apply(batch);
                    if due.is_some() {
                        // The event loop drops images when it is gone.
                        let _ = self.snapshots.images.send(self.machines.image());
                    }
                    rest = tail;
                }
                serve_reads(&mut self.machines, &mut self.reads);
            }
            Work::Wait { index, term, reply } => {
                if index <= self.machines.applied() {
                    let _ = reply.send(lost(&self.shared.metrics));
                } else {
                    self.waiters.insert(index, (term, reply));
                }
            }
            Work::Read {
                index,
                machine,
                query,
                reply,
            } => {
                self.reads.push(Read {
                    index,
                    machine,
                    query,
                    reply,
                });
                serve_reads(&mut self.machines, &mut self.reads);
            }
            Work::Fork { machine, reply } => {
                let _ = reply.send(self.machines.fork(&machine));
            }
            Work::Plugins { reply } => {
                let _ = reply.send(self.machines.reports());
            }
            Work::Abandon => {
                for (_, (_, reply)) in self.waiters.drain() {
                    let _ = reply.send(lost(&self.shared.metrics));
                }
            }
            Work::Install { index, reader } => {
                let started = Instant::now();
                let machines = match load_snapshot(reader, index, &self.machines, &self.shared) {
                    Ok(m) => m,
                    // The log is already reset to the snapshot: without its
                    // state this replica cannot go on. A restart recovers
                    // from the snapshot file (or reports it damaged).
                    Err(e) => panic!("cannot install the snapshot at index {index}: {e}"),
                };
                self.machines = machines;
                self.snapshots.policy.restart();
                self.shared.metrics.snapshots_installed.inc();
                // Entries up to the snapshot were never applied here: whoever
                // waits on them cannot be told their outcome.
                let installed = self.machines.applied();
                let stale: Vec<u64> = self
                    .waiters
                    .keys()
                    .copied()
                    .filter(|&i| i <= installed)
                    .collect();
                for i in stale {
                    if let Some((_, reply)) = self.waiters.remove(&i) {
                        let _ = reply.send(lost(&self.shared.metrics));
                    }
                }
                self.published();
                publish(&self.machines, &self.shared);
                tracing::info!(
                    index,
                    machines = self.machines.status().len(),
                    seconds = started.elapsed().as_secs_f64(),
                    "snapshot installed"
                );
                serve_reads(&mut self.machines, &mut self.reads);
            }
        }
    }

    fn apply(&mut self, entries: &[Entry]) {
        let started = Instant::now();
        let answers = self.machines.apply(entries);
        let shared = &self.shared;
        shared
            .metrics
            .apply_seconds
            .observe(started.elapsed().as_secs_f64());
        self.published();
        // Before anyone hears of a deploy: a caller's next request on this
        // node must translate its JSON with the new code.
        if self.machines.take_code_changed() {
            publish(&self.machines, shared);
        }
        let mut answers = answers.into_iter().peekable();
        for e in entries {
            let answer = answers.next_if(|a| a.index == e.index);
            let Some((term, reply)) = self.waiters.remove(&e.index) else {
                continue;
            };
            let outcome = match answer {
                Some(a) if a.term == term => a.reply,
                // Another leader's entry took the slot.
                _ => lost(&shared.metrics),
            };
            let _ = reply.send(outcome);
        }
    }

    /// Publishes the applied index, sessions and addresses.
    fn published(&self) {
        let (machines, shared) = (&self.machines, &self.shared);
        shared.applied.store(machines.applied(), Ordering::Release);
        shared
            .log_time_ms
            .fetch_max(machines.last_timestamp_ms(), Ordering::Release);
        shared.metrics.applied_index.set(machines.applied());
        shared
            .sessions
            .store(machines.sessions() as u64, Ordering::Relaxed);
        shared.metrics.sessions.set(machines.sessions() as u64);
        shared.addresses.send_if_modified(|book| {
            let changed = book != machines.addresses();
            if changed {
                *book = machines.addresses().clone();
            }
            changed
        });
    }
}

/// Reads the snapshot at `index` and rebuilds the state it holds.
fn load_snapshot(
    reader: SnapshotReader,
    index: u64,
    current: &Machines,
    shared: &Shared,
) -> Result<Machines, String> {
    let image = decode_image(reader)?;
    if image.applied != index {
        return Err(format!(
            "the latest snapshot holds the state at index {}, not {index}",
            image.applied
        ));
    }
    Machines::from_image(image, current.engines().clone(), shared.metrics.clone())
}

/// Reads and decodes the latest snapshot's state; its checksum is verified
/// on the way.
pub fn read_image(store: &SnapshotStore) -> Result<Image, String> {
    let reader = store
        .open_latest()
        .map_err(|e| e.to_string())?
        .ok_or("there is no snapshot")?;
    decode_image(reader)
}

/// Reads and decodes a snapshot's state, verifying its checksum.
fn decode_image(mut reader: SnapshotReader) -> Result<Image, String> {
    use std::io::Read as _;
    let mut data = Vec::with_capacity(usize::try_from(reader.info().data_len).unwrap_or(0));
    reader
        .read_to_end(&mut data)
        .map_err(|e| format!("reading the snapshot: {e}"))?;
    Image::decode(&data).map_err(|e| e.to_string())
}

/// What the applier publishes for status and for the edge.
#[derive(Default)]
pub struct Shared {
    /// Highest applied index.
    pub applied: AtomicU64,
    /// Open sessions.
    pub sessions: AtomicU64,
    /// Deployed machines.
    pub machines: Mutex<Vec<MachineStatus>>,
    /// Their code, for JSON translation.
    pub plugins: Mutex<BTreeMap<String, PluginInfo>>,
    /// The node's metrics, which the applier and the machines update too.
    pub metrics: Arc<Metrics>,
    /// The members' addresses as applied; the event loop watches it to
    /// reach new members and to learn that this node was removed.
    pub addresses: tokio::sync::watch::Sender<AddressBook>,
    /// Log time of the last entry applied: a leader never stamps an entry
    /// earlier, even right after installing a snapshot whose entries it
    /// never saw.
    pub log_time_ms: AtomicU64,
}

/// Sends work to the applier thread.
#[derive(Clone)]
pub struct Applier {
    work: mpsc::Sender<Work>,
}

struct Read {
    index: u64,
    machine: String,
    query: Bytes,
    reply: oneshot::Sender<Result<Bytes, ApiError>>,
}

impl Applier {
    /// Starts the applier thread over `machines`. The receiver completes
    /// when the thread ends, however it ends (a panic included), so that the
    /// node stops instead of voting on without a state machine. Whenever
    /// `snapshots.policy` says a snapshot is due, the state's image goes to
    /// `snapshots.images`.
    pub fn start(
        machines: Machines,
        shared: Arc<Shared>,
        snapshots: Snapshots,
    ) -> std::io::Result<(Self, oneshot::Receiver<()>)> {
        let (work, queue) = mpsc::channel::<Work>();
        let (alive, gone) = oneshot::channel::<()>();
        let mut state = State {
            machines,
            shared,
            snapshots,
            waiters: HashMap::new(),
            reads: Vec::new(),
        };
        // A node restarted from a snapshot holds machines, sessions and
        // addresses that no entry will announce: publish them before the
        // event loop and the edge look.
        state.published();
        publish(&state.machines, &state.shared);
        thread::Builder::new()
            .name("kythira-apply".into())
            .spawn(move || {
                // Dropped when the thread ends, unwinding included.
                let _alive = alive;
                for w in queue {
                    if matches!(w, Work::Stop) {
                        break;
                    }
                    state.handle(w);
                }
            })?;
        Ok((Self { work }, gone))
    }

    /// Queues work. Fails only if the applier stopped.
    pub fn send(&self, w: Work) -> Result<(), crate::NodeError> {
        self.work
            .send(w)
            .map_err(|_| crate::NodeError::Stopped("the applier stopped"))
    }
}

/// Stops the applier thread when dropped. The event loop owns it, so the
/// thread ends with the loop however the loop ends (an error, a stop, its
/// task aborted).
pub struct StopOnDrop(pub Applier);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(Work::Stop);
    }
}

/// The answer to a proposal whose fate this node cannot know.
fn lost(metrics: &Metrics) -> Reply {
    metrics.proposal_failed(ProposalFailure::Lost);
    Err(ApiError::Outcome)
}

fn publish(machines: &Machines, shared: &Shared) {
    *shared.machines.lock().expect("lock") = machines.status();
    let mut plugins = shared.plugins.lock().expect("lock");
    plugins.clear();
    for m in machines.status() {
        if let Some(info) = machines.plugin(&m.name) {
            plugins.insert(m.name, info);
        }
    }
}

fn serve_reads(machines: &mut Machines, reads: &mut Vec<Read>) {
    let applied = machines.applied();
    let mut i = 0;
    while i < reads.len() {
        if reads[i].index <= applied {
            let r = reads.swap_remove(i);
            // No machine is named "": such a read is a barrier, answered
            // once everything up to its index is applied.
            let answer = if r.machine.is_empty() {
                Ok(Bytes::new())
            } else {
                machines.query(&r.machine, &r.query)
            };
            let _ = r.reply.send(answer);
        } else {
            i += 1;
        }
    }
}
