//! Deterministic cluster simulator of the Kythira consensus core.
//!
//! A run is a single-threaded discrete-event simulation determined by its
//! seed: 1 to 7 real [`kythira_raft::Raft`] cores whose `Ready` batches go
//! through the [`kythira_raft::Driver`] the daemon uses. The seed also draws
//! a [`profile::Profile`]: the cores' configuration (pre-vote, check-quorum,
//! timeouts, message and inflight limits), disk and clock behaviour, and the
//! load. The network delays, drops, duplicates and reorders messages and is
//! cut by partitions and one-way link failures; disks lose unfinished writes
//! on a crash, stall and fail; clocks run at slightly different rates and
//! jump; crashes are placed right after sends that promise durable state.
//! Closed-loop clients put and read (ReadIndex) keys, time out and retry,
//! and record a history; open-loop proposers keep many puts in flight.
//!
//! The Raft safety properties and the durability promises of every message
//! are checked after every event ([`safety`]); the run alternates fault and
//! quiet phases, and each quiet phase ends with a liveness check (see
//! [`cluster`]); at the end the history must be linearizable for a
//! key/value model.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cluster;
pub mod kv;
pub mod network;
pub mod profile;
pub mod rng;
pub mod safety;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use kythira_linearizability::{Verdict, check_history, kv::KvModel};

pub use cluster::{Cluster, Depth, Options, Workload};
pub use profile::DiskQueue;
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
    /// Cluster size.
    pub nodes: usize,
    /// Events processed.
    pub steps: u64,
    /// Operations in the checked history.
    pub operations: usize,
    /// The linearizability search ran out of budget (neither pass nor fail).
    pub undecided: bool,
    /// What went wrong, if anything.
    pub failure: Option<Failure>,
    /// Hash of the whole event trace.
    pub trace: u64,
    /// The seed's drawn profile.
    pub profile: String,
    /// Virtual time the run covered, µs.
    pub virtual_micros: u64,
    /// How deep into unusual states the run went.
    pub depth: Depth,
}

/// The command that replays one seed.
pub fn replay_command(seed: u64, nodes: usize) -> String {
    format!("just sim --seed {seed} --nodes {nodes}")
}

/// The cluster size a mixed-size sweep uses for `seed`: 1 to 7, evenly.
pub fn mixed_size(seed: u64) -> usize {
    let mut z = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z ^= z >> 29;
    (z % 7) as usize + 1
}

/// Run one checked seed, including the linearizability check.
pub fn run_seed(opts: Options) -> SeedReport {
    let (seed, nodes) = (opts.seed, opts.nodes);
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
                nodes,
                steps: 0,
                operations: 0,
                undecided: false,
                failure: Some(Failure::Panic(msg)),
                trace: 0,
                profile: String::new(),
                virtual_micros: 0,
                depth: Depth::default(),
            };
        }
    };
    let mut report = SeedReport {
        seed,
        nodes,
        steps: result.steps,
        operations: result.history.len(),
        undecided: false,
        failure: result.violation.map(Failure::Violation),
        trace: result.trace,
        profile: result.profile,
        virtual_micros: result.end,
        depth: result.depth,
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

/// Hunt `mutation` over the seeds `0..budget` at 3 and at 5 nodes (in
/// that interleaved order): the first (seed, size) that catches it, with
/// what it found, or `None` if it survives them all.
#[cfg(feature = "mutants")]
pub fn hunt_mutant(
    mutation: kythira_raft::Mutation,
    budget: u64,
    threads: usize,
) -> Option<(u64, usize, String)> {
    let size = |k: u64| if k.is_multiple_of(2) { 3 } else { 5 };
    let summary = run_seeds(0, 2 * budget, threads, true, |k| Options {
        mutation: Some(mutation),
        ..Options::checked(size(k), k / 2)
    });
    let f = summary.failures.first()?;
    let failure = f.failure.as_ref().expect("failures only").to_string();
    Some((f.seed, f.nodes, failure))
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
    /// The deepest states reached over all seeds.
    pub depth: Depth,
    /// Seeds in which some node replaced at least 1,000 entries at once.
    pub long_truncations: u64,
    /// Configuration entries committed, over all seeds.
    pub membership_changes: u64,
    /// Leadership handovers (`TimeoutNow` sent), over all seeds.
    pub transfers: u64,
    /// Log compactions and snapshot installs, over all seeds.
    pub compactions: u64,
    /// Snapshots installed by followers, over all seeds.
    pub installs: u64,
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
                    s.depth = s.depth.max(&report.depth);
                    s.long_truncations += u64::from(report.depth.longest_truncation >= 1_000);
                    s.membership_changes += report.depth.membership_changes;
                    s.transfers += report.depth.transfers;
                    s.compactions += report.depth.compactions;
                    s.installs += report.depth.installs;
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
    // Seed, then size: the order in which a hunt over both sizes runs them.
    s.failures.sort_by_key(|r| (r.seed, r.nodes));
    s
}
