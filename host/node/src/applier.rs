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
use kythira_api::{ApiError, MachineStatus, Reply};
use kythira_raft::Entry;
use tokio::sync::oneshot;

use crate::addresses::AddressBook;
use crate::machines::{Machines, PluginInfo};
use crate::metrics::{Metrics, ProposalFailure};

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
    /// This node stopped leading: fail every waiter, their outcome is unknown.
    Abandon,
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
    /// node stops instead of voting on without a state machine.
    pub fn start(
        mut machines: Machines,
        shared: Arc<Shared>,
    ) -> std::io::Result<(Self, oneshot::Receiver<()>)> {
        let (work, queue) = mpsc::channel::<Work>();
        let (alive, gone) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("kythira-apply".into())
            .spawn(move || {
                // Dropped when the thread ends, unwinding included.
                let _alive = alive;
                let mut waiters: HashMap<u64, (u64, oneshot::Sender<Reply>)> = HashMap::new();
                let mut reads: Vec<Read> = Vec::new();
                for w in queue {
                    match w {
                        Work::Apply(entries) => {
                            let started = Instant::now();
                            let answers = machines.apply(&entries);
                            let metrics = &shared.metrics;
                            metrics
                                .apply_seconds
                                .observe(started.elapsed().as_secs_f64());
                            shared.applied.store(machines.applied(), Ordering::Release);
                            metrics.applied_index.set(machines.applied());
                            shared
                                .sessions
                                .store(machines.sessions() as u64, Ordering::Relaxed);
                            metrics.sessions.set(machines.sessions() as u64);
                            let mut answers = answers.into_iter().peekable();
                            let mut changed_code = false;
                            for e in &entries {
                                let answer = answers.next_if(|a| a.index == e.index);
                                if matches!(
                                    answer.as_ref().map(|a| &a.reply),
                                    Some(Ok(kythira_api::Response::Deployed { .. }))
                                ) {
                                    changed_code = true;
                                }
                                let Some((term, reply)) = waiters.remove(&e.index) else {
                                    continue;
                                };
                                let outcome = match answer {
                                    Some(a) if a.term == term => a.reply,
                                    // Another leader's entry took the slot.
                                    _ => lost(metrics),
                                };
                                let _ = reply.send(outcome);
                            }
                            if changed_code {
                                publish(&machines, &shared);
                            }
                            shared.addresses.send_if_modified(|book| {
                                let changed = book != machines.addresses();
                                if changed {
                                    *book = machines.addresses().clone();
                                }
                                changed
                            });
                            serve_reads(&mut machines, &mut reads);
                        }
                        Work::Wait { index, term, reply } => {
                            if index <= machines.applied() {
                                let _ = reply.send(lost(&shared.metrics));
                            } else {
                                waiters.insert(index, (term, reply));
                            }
                        }
                        Work::Read {
                            index,
                            machine,
                            query,
                            reply,
                        } => {
                            reads.push(Read {
                                index,
                                machine,
                                query,
                                reply,
                            });
                            serve_reads(&mut machines, &mut reads);
                        }
                        Work::Abandon => {
                            for (_, (_, reply)) in waiters.drain() {
                                let _ = reply.send(lost(&shared.metrics));
                            }
                        }
                    }
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
