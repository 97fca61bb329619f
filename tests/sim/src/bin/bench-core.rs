//! Throughput of the consensus core: proposals committed and applied per
//! second of CPU, driven through the simulator with a perfect network and
//! instant disks. A single-node cluster (no replication) is the baseline.

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

fn one_run(nodes: usize, seed: u64) -> f64 {
    let opts = Options {
        workload: Workload::Throughput {
            window: WINDOW,
            total: TOTAL,
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
        result.applied >= TOTAL,
        "only {} of {TOTAL} applied",
        result.applied
    );
    result.applied as f64 / secs
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
        let rates: Vec<f64> = (0..RUNS).map(|i| one_run(nodes, i as u64)).collect();
        println!(
            "BENCH name={name} value={:.0} unit=entries_per_s",
            median(rates)
        );
    }
}
