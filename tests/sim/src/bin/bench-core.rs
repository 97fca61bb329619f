//! Throughput of the consensus core: proposals committed and applied per
//! second of CPU, driven through the simulator with a perfect network and
//! instant disks. A single-node cluster (no replication) is the baseline.
//!
//! Then the same three nodes with a slow disk (2 ms a write), in entries per
//! second of virtual time: what a leader and followers that keep
//! replicating and answering during each fsync achieve, against the bound
//! of one write of the whole window per fsync (the fast disk's figure at the
//! same window is the baseline).

use kythira_sim::{Cluster, Options, Workload};

const RUNS: usize = 5;
const TOTAL: u64 = 200_000;
const WINDOW: usize = 256;

/// CPU time of this thread in seconds, from the scheduler's accounting.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// (entries per CPU second, entries per virtual second).
fn one_run(nodes: usize, seed: u64, disk: u64, total: u64) -> (f64, f64) {
    let opts = Options {
        workload: Workload::Throughput {
            window: WINDOW,
            total,
            disk,
        },
        ..Options::checked(nodes, seed)
    };
    let wall = std::time::Instant::now();
    let cpu = thread_cpu_seconds();
    let result = Cluster::new(opts).run();
    let secs = match (cpu, thread_cpu_seconds()) {
        (Some(a), Some(b)) => b - a,
        _ => wall.elapsed().as_secs_f64(),
    };
    assert!(
        result.violation.is_none(),
        "benchmark run failed: {:?}",
        result.violation
    );
    assert!(
        result.applied >= total,
        "only {} of {total} applied",
        result.applied
    );
    let virtual_secs = result.end as f64 / 1e6;
    (
        result.applied as f64 / secs,
        result.applied as f64 / virtual_secs,
    )
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() {
    for (name, nodes) in [
        ("core.commit.1node", 1),
        ("core.commit.3nodes", 3),
        ("core.commit.5nodes", 5),
    ] {
        let rates: Vec<f64> = (0..RUNS)
            .map(|i| one_run(nodes, i as u64, FAST_DISK, TOTAL).0)
            .collect();
        println!(
            "BENCH name={name} value={:.0} unit=entries_per_s",
            median(rates)
        );
    }
    let virtual_rate = |disk| {
        median(
            (0..RUNS)
                .map(|i| one_run(3, i as u64, disk, TOTAL / 10).1)
                .collect(),
        )
    };
    let fast = virtual_rate(FAST_DISK);
    let slow = virtual_rate(SLOW_DISK);
    println!("BENCH name=core.commit.3nodes.disk_100us value={fast:.0} unit=entries_per_virtual_s");
    println!("BENCH name=core.commit.3nodes.disk_2ms value={slow:.0} unit=entries_per_virtual_s");
    // One write of a whole window per fsync is the most a core that waits
    // for each write before the next batch could commit.
    let bound = WINDOW as f64 / (SLOW_DISK as f64 / 1e6);
    println!(
        "BENCH name=core.commit.3nodes.disk_2ms_vs_window_per_fsync value={:.2} unit=ratio",
        slow / bound
    );
}

/// Time of one write, µs.
const FAST_DISK: u64 = 100;
const SLOW_DISK: u64 = 2_000;
