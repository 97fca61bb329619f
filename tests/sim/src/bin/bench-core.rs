//! Throughput of the consensus core: proposals committed and applied per
//! second of CPU, driven through the simulator with a perfect network and
//! instant disks. A single-node cluster (no replication) is the baseline.
//!
//! Then the same three nodes with a slow disk (2 ms a write), in entries per
//! second of virtual time: what a leader and followers that keep
//! replicating and answering during each fsync achieve, against the bound
//! of one write of the whole window per fsync (the fast disk's figure at the
//! same window is the baseline). Three ways to write: one write outstanding
//! at a time (each batch waits for the last), several outstanding on a disk
//! that serves one at a time (the daemon's writer thread, which syncs the
//! writes queued behind a busy disk together), and several outstanding on a
//! disk that has them in flight together.

use kythira_sim::{Cluster, DiskQueue, Options, Workload};

const RUNS: usize = 5;
const TOTAL: u64 = 200_000;
const WINDOW: usize = 256;

/// CPU time of this thread in seconds, from the scheduler's accounting.
fn thread_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// How the nodes write: writes outstanding at once, and the disk's queue.
type Writes = (usize, DiskQueue);

/// The daemon's way: several writes outstanding, one disk operation at a time.
const OVERLAPPING_SERIAL: Writes = (64, DiskQueue::Serial);
const ONE_AT_A_TIME: Writes = (1, DiskQueue::Serial);
const OVERLAPPING_PIPELINED: Writes = (64, DiskQueue::Pipelined);

/// What one run measured.
struct Measured {
    per_cpu_s: f64,
    per_virtual_s: f64,
    /// Median from proposal to apply, virtual µs.
    latency_us: f64,
}

/// One run: `pace` proposals every 100 µs (open loop), or a closed loop of
/// `WINDOW`.
fn one_run(
    nodes: usize,
    seed: u64,
    disk: u64,
    writes: Writes,
    pace: Option<usize>,
    total: u64,
) -> Measured {
    let opts = Options {
        workload: Workload::Throughput {
            window: if pace.is_some() { 8 * WINDOW } else { WINDOW },
            pace,
            total,
            disk,
            outstanding: writes.0,
            queue: writes.1,
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
    assert!(!result.saturated, "the open loop could not keep its pace");
    assert!(
        result.applied >= total,
        "only {} of {total} applied",
        result.applied
    );
    // From the first entry applied: before it, the run is mostly the first
    // election, which no disk or write pipeline changes.
    let virtual_secs = (result.end - result.first_applied) as f64 / 1e6;
    Measured {
        per_cpu_s: result.applied as f64 / secs,
        per_virtual_s: (result.applied - 1) as f64 / virtual_secs,
        latency_us: result.median_latency as f64,
    }
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
            .map(|i| one_run(nodes, i as u64, FAST_DISK, OVERLAPPING_SERIAL, None, TOTAL).per_cpu_s)
            .collect();
        println!(
            "BENCH name={name} value={:.0} unit=entries_per_s",
            median(rates)
        );
    }
    let runs = |disk, writes, pace| -> Vec<Measured> {
        (0..RUNS)
            .map(|i| one_run(3, i as u64, disk, writes, pace, TOTAL / 10))
            .collect()
    };
    let rate = |ms: &[Measured]| median(ms.iter().map(|m| m.per_virtual_s).collect());
    let latency = |ms: &[Measured]| median(ms.iter().map(|m| m.latency_us).collect());
    let fast = rate(&runs(FAST_DISK, OVERLAPPING_SERIAL, None));
    println!("BENCH name=core.commit.3nodes.disk_100us value={fast:.0} unit=entries_per_virtual_s");
    // Closed loop: the whole window arrives together, after each commit,
    // so there is never a second write to overlap; one write of the whole
    // window per fsync is the bound.
    let bound = WINDOW as f64 / (SLOW_DISK as f64 / 1e6);
    let closed = rate(&runs(SLOW_DISK, ONE_AT_A_TIME, None));
    println!("BENCH name=core.commit.3nodes.disk_2ms value={closed:.0} unit=entries_per_virtual_s");
    println!(
        "BENCH name=core.commit.3nodes.disk_2ms_vs_window_per_fsync value={:.2} unit=ratio",
        closed / bound
    );
    // Open loop: proposals arrive throughout each write, which is where
    // handing out the next write early pays.
    let mut base = 0.0;
    for (name, writes) in [
        ("one_write", ONE_AT_A_TIME),
        ("overlapping_8_serial_disk", (8, DiskQueue::Serial)),
        ("overlapping_serial_disk", OVERLAPPING_SERIAL),
        ("overlapping_pipelined_disk", OVERLAPPING_PIPELINED),
    ] {
        let p50 = latency(&runs(SLOW_DISK, writes, Some(PACE)));
        let prefix = format!("core.latency.3nodes.disk_2ms.{name}");
        println!("BENCH name={prefix}.p50 value={p50:.0} unit=virtual_us");
        if writes == ONE_AT_A_TIME {
            base = p50;
        } else {
            println!(
                "BENCH name={prefix}.p50_vs_one_write value={:.2} unit=ratio",
                p50 / base
            );
        }
    }
}

/// Open-loop proposals per 100 µs: 80,000 a second, well within what either
/// way of writing sustains, so the latency shows the wait for the disk.
const PACE: usize = 8;

/// Time of one write, µs.
const FAST_DISK: u64 = 100;
const SLOW_DISK: u64 = 2_000;
