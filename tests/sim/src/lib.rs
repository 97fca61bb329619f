//! Deterministic cluster simulator of the Kythira consensus core.
//!
//! A run is a single-threaded discrete-event simulation determined by its
//! seed: 3 or 5 real [`kythira_raft::Raft`] cores whose `Ready` batches go
//! through the [`kythira_raft::Driver`] the daemon uses, a network that delays,
//! drops, duplicates and reorders messages and is cut by partitions and
//! one-way link failures, disks whose unfinished writes are lost when a node
//! crashes, and clients that put and read (ReadIndex) keys and record a
//! history. The Raft safety properties are checked after every event
//! ([`safety`]); after the faults stop, a leader must appear within a bounded
//! number of ticks and every acknowledged put must be applied everywhere; at
//! the end the history must be linearizable for a key/value model.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod kv;
pub mod network;
pub mod rng;
pub mod safety;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kythira_linearizability::{Verdict, check_history, kv::KvModel};

pub use cluster::{Cluster, Options, Workload};
pub use safety::Violation;

/// Search budget of the linearizability checker per history.
const LINEARIZABILITY_BUDGET: u64 = 5_000_000;

/// Why a seed failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// An invariant broke.
    Violation(Violation),
    /// The core panicked (an internal assertion).
    Panic(String),
    /// The client history is not linearizable.
    NotLinearizable(String),
}

impl Failure {
    /// Whether the history check failed (as opposed to an invariant).
    pub fn is_nonlinearizable(&self) -> bool {
        matches!(self, Failure::NotLinearizable(_))
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Violation(v) => write!(f, "{}: {}", v.property, v.detail),
            Failure::Panic(msg) => write!(f, "panic: {msg}"),
            Failure::NotLinearizable(cx) => write!(f, "history not linearizable:\n{cx}"),
        }
    }
}

/// Outcome of one seed.
#[derive(Clone, Debug)]
pub struct SeedReport {
    /// The seed.
    pub seed: u64,
    /// Events processed.
    pub steps: u64,
    /// Operations in the checked history.
    pub operations: usize,
    /// The linearizability search ran out of budget (neither pass nor fail).
    pub undecided: bool,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
}

/// The command that replays one seed.
pub fn replay_command(seed: u64, nodes: usize) -> String {
    format!("just sim --seed {seed} --nodes {nodes}")
}

/// Run one checked seed, including the linearizability check.
pub fn run_seed(opts: Options) -> SeedReport {
    let seed = opts.seed;
    let result = match catch_unwind(AssertUnwindSafe(|| Cluster::new(opts).run())) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            return SeedReport {
                seed,
                steps: 0,
                operations: 0,
                undecided: false,
                failure: Some(Failure::Panic(msg)),
            };
        }
    };
    let mut report = SeedReport {
        seed,
        steps: result.steps,
        operations: result.history.len(),
        undecided: false,
        failure: result.violation.map(Failure::Violation),
    };
    if report.failure.is_none() {
        match check_history(&KvModel, &result.history, Some(LINEARIZABILITY_BUDGET)) {
            Ok(Verdict::Linearizable) => {}
            Ok(Verdict::Undecided) => report.undecided = true,
            Ok(Verdict::NotLinearizable(cx)) => {
                report.failure = Some(Failure::NotLinearizable(cx.render(&result.history)));
            }
            Err(e) => {
                report.failure = Some(Failure::Violation(Violation {
                    property: "history",
                    detail: format!("the simulator recorded a malformed history: {e}"),
                }));
            }
        }
    }
    report
}

/// Totals over many seeds.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Seeds run.
    pub seeds: u64,
    /// Events processed over all seeds.
    pub steps: u64,
    /// Seeds with an invariant violation or panic.
    pub violations: u64,
    /// Seeds whose history is not linearizable.
    pub nonlinearizable: u64,
    /// Seeds whose linearizability check ran out of budget.
    pub undecided: u64,
    /// Failed seeds, in seed order.
    pub failures: Vec<SeedReport>,
}

/// Run `count` seeds from `first` on `threads` worker threads. Each seed is
/// deterministic on its own. With `stop_at_first_failure`, seeds above the
/// smallest failing one are skipped, so the reported first failure does not
/// depend on thread timing.
pub fn run_seeds(
    first: u64,
    count: u64,
    threads: usize,
    stop_at_first_failure: bool,
    make: impl Fn(u64) -> Options + Sync,
) -> Summary {
    let next = AtomicU64::new(first);
    let end = first.saturating_add(count);
    let first_failure = AtomicU64::new(u64::MAX);
    let summary = Mutex::new(Summary::default());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::Relaxed);
                    if seed >= end
                        || (stop_at_first_failure && seed > first_failure.load(Ordering::Relaxed))
                    {
                        break;
                    }
                    let report = run_seed(make(seed));
                    if report.failure.is_some() {
                        first_failure.fetch_min(seed, Ordering::Relaxed);
                    }
                    let mut s = summary
                        .lock()
                        .expect("no worker panics while holding the lock");
                    s.seeds += 1;
                    s.steps += report.steps;
                    s.undecided += u64::from(report.undecided);
                    match &report.failure {
                        Some(f) if f.is_nonlinearizable() => s.nonlinearizable += 1,
                        Some(_) => s.violations += 1,
                        None => {}
                    }
                    if report.failure.is_some() {
                        s.failures.push(report);
                    }
                }
            });
        }
    });
    let mut s = summary.into_inner().expect("workers finished");
    s.failures.sort_by_key(|r| r.seed);
    s
}
