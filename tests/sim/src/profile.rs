//! What varies from seed to seed: the cores' configuration, the disks, the
//! clocks, the fault schedule and the load. Everything is drawn from the
//! run's generator, so a seed names one profile.

use crate::rng::Rng;

/// Virtual microseconds.
pub type Micros = u64;

/// Nominal tick of every core.
pub const TICK: Micros = 10_000;

/// Bound on how far a node's tick interval strays from [`TICK`], in parts
/// per thousand either way. Lease reads, when they come, must hold with
/// clocks this far apart.
pub const MAX_TICK_SKEW_PERMILLE: u64 = 50;

/// An open-loop proposer: keeps up to `window` puts in flight at whatever it
/// believes is the leader, retrying each until it is applied.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Proposals kept in flight.
    pub window: usize,
    /// Proposals it makes in the whole run (retries not counted).
    pub total: u64,
}

/// How a node's disk serves writes handed to it while it is busy. Either
/// way writes complete in the order handed out, and a crash loses every one
/// not yet complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskQueue {
    /// One write at a time, and the writes queued behind a busy disk are
    /// made durable together by the next one: a writer thread that syncs
    /// one journal, as the daemon's does.
    Serial,
    /// Writes in flight together, each taking its own latency but
    /// completing in order: a network volume whose latency is mostly the
    /// round trip, or a device with a deep queue behind a writer that keeps
    /// completions in order (a log needs that order; devices alone do not
    /// promise it). The daemon's writer does not do this.
    Pipelined,
}

/// The per-seed parameters of a run.
#[derive(Clone, Debug)]
pub struct Profile {
    /// Cores run pre-vote.
    pub pre_vote: bool,
    /// Cores run check-quorum (and the leader lease on votes).
    pub check_quorum: bool,
    /// Minimum election timeout in ticks.
    pub election_ticks: u32,
    /// Heartbeat interval in ticks.
    pub heartbeat_ticks: u32,
    /// Most entries per append.
    pub max_entries: usize,
    /// Most payload bytes per append.
    pub max_bytes: usize,
    /// Inflight window per follower.
    pub max_inflight: usize,
    /// Disk write latency range, µs.
    pub disk: (Micros, Micros),
    /// How the disk serves overlapping writes.
    pub disk_queue: DiskQueue,
    /// Writes a core's driver may have outstanding at once.
    pub max_outstanding_writes: usize,
    /// One-way network delay range, µs.
    pub net_delay: (Micros, Micros),
    /// Time between faults, µs.
    pub fault_gap: (Micros, Micros),
    /// Time from a crash to its restart, µs.
    pub restart_gap: (Micros, Micros),
    /// Tick interval of each node, µs.
    pub tick_interval: Vec<Micros>,
    /// The state machine checkpoints every this many applied entries, and a
    /// restarted node resumes from its checkpoint; `None`: it replays the log.
    pub checkpoint_every: Option<u64>,
    /// Fault phases, each followed by a quiet phase with a liveness check.
    pub phases: u32,
    /// Chance that a node crashes right after sending a vote, an
    /// acknowledgement or an append (during fault phases).
    pub crash_after_send: f64,
    /// Open-loop proposers.
    pub load: Vec<LoadSpec>,
    /// Checkpoints are snapshots: the log is compacted behind half of them,
    /// and followers too far behind are sent one.
    pub compaction: bool,
    /// Cores serve lease reads (with check-quorum only), and clients use
    /// them for half their reads.
    pub lease_reads: bool,
    /// Membership changes and leadership transfers among the fault phases'
    /// faults, with this many spare nodes to add (they start outside the
    /// cluster, knowing no members).
    pub reconfigure: Option<usize>,
}

impl Profile {
    /// A profile for a checked run of `nodes` nodes.
    pub fn draw(rng: &mut Rng, nodes: usize) -> Self {
        let election_ticks = rng.range(5, 31) as u32;
        let heartbeat_ticks = rng.range(1, u64::from(election_ticks / 3).max(1) + 1) as u32;
        let disk = if rng.chance(0.5) {
            (50, 1_000)
        } else {
            (1_000, 20_000)
        };
        // A third of the runs are storms: many faults and quick restarts,
        // which is what it takes for histories like figure 8 of the paper.
        let storm = rng.chance(0.35);
        let (fault_gap, restart_gap) = if storm {
            ((10_000, 80_000), (5_000, 100_000))
        } else {
            ((50_000, 300_000), (20_000, 1_000_000))
        };
        let tick_interval = (0..nodes)
            .map(|_| {
                let skew = rng.range(0, 2 * MAX_TICK_SKEW_PERMILLE + 1);
                TICK * (1_000 - MAX_TICK_SKEW_PERMILLE + skew) / 1_000
            })
            .collect();
        let load = if rng.chance(0.6) {
            (0..rng.range(1, 3))
                .map(|_| LoadSpec {
                    window: rng.pick(&[8, 32, 128, 512, 2_048]),
                    total: rng.range(300, 4_000),
                })
                .collect()
        } else {
            Vec::new()
        };
        Self {
            pre_vote: rng.chance(0.7),
            check_quorum: rng.chance(0.7),
            election_ticks,
            heartbeat_ticks,
            max_entries: rng.pick(&[1, 2, 3, 8, 64, 256]),
            max_bytes: if rng.chance(0.5) {
                rng.range(1, 4_096) as usize
            } else {
                1 << 20
            },
            max_inflight: rng.pick(&[1, 2, 4, 16, 64]),
            disk,
            net_delay: (200, 3_000),
            fault_gap,
            restart_gap,
            tick_interval,
            checkpoint_every: rng.chance(0.5).then(|| rng.range(1, 300)),
            phases: rng.range(1, 5) as u32,
            crash_after_send: rng.pick(&[0.0, 0.0, 0.002, 0.02]),
            load,
            lease_reads: false,
            reconfigure: None,
            compaction: false,
            disk_queue: DiskQueue::Serial,
            max_outstanding_writes: 1,
        }
        .with_reconfiguration(rng)
        .with_lease_reads(rng)
        .with_compaction(rng)
        .with_overlapping_writes(rng)
    }

    /// Draws how many writes overlap and how the disk serves them. Drawn
    /// last, so the rest of a profile does not depend on it.
    fn with_overlapping_writes(mut self, rng: &mut Rng) -> Self {
        self.max_outstanding_writes = rng.pick(&[1, 2, 8, 64]);
        self.disk_queue = if rng.chance(0.5) {
            DiskQueue::Serial
        } else {
            DiskQueue::Pipelined
        };
        self
    }

    /// Compaction in half the runs that checkpoint.
    fn with_compaction(mut self, rng: &mut Rng) -> Self {
        self.compaction = rng.chance(0.5) && self.checkpoint_every.is_some();
        self
    }

    /// Lease reads in half the runs with check-quorum.
    fn with_lease_reads(mut self, rng: &mut Rng) -> Self {
        self.lease_reads = rng.chance(0.5) && self.check_quorum;
        self
    }

    /// The lease's margin for clock drift. A lease of `E - d` ticks of the
    /// slowest-ticking leader (1 + s of the nominal tick) must end before
    /// `E - 1` ticks of the fastest-ticking follower (1 - s; one tick is lost
    /// to phase): `d >= E * 2s / (1 + s) + 1`, rounded up, plus one.
    pub fn lease_drift_ticks(&self) -> u32 {
        let e = u64::from(self.election_ticks);
        let skew = 2 * MAX_TICK_SKEW_PERMILLE;
        (e * skew).div_ceil(1_000 + MAX_TICK_SKEW_PERMILLE) as u32 + 2
    }

    /// Draws whether the run reconfigures (half of them do), and the spare
    /// nodes' clocks. Drawn after everything else, so the rest of a profile
    /// does not depend on it.
    /// Only with pre-vote or check-quorum on: without either, a removed
    /// server can disrupt the cluster (see the core's `in_lease`).
    fn with_reconfiguration(mut self, rng: &mut Rng) -> Self {
        if rng.chance(0.5) && (self.pre_vote || self.check_quorum) {
            let spares = rng.range(1, 3) as usize;
            for _ in 0..spares {
                let skew = rng.range(0, 2 * MAX_TICK_SKEW_PERMILLE + 1);
                self.tick_interval
                    .push(TICK * (1_000 - MAX_TICK_SKEW_PERMILLE + skew) / 1_000);
            }
            self.reconfigure = Some(spares);
        }
        self
    }

    /// Nodes the run starts, spares included.
    pub fn total_nodes(&self, voters: usize) -> usize {
        voters + self.reconfigure.unwrap_or(0)
    }

    /// A fault-free profile with a fast network and writes of `disk` µs,
    /// up to `outstanding` at once on a disk that serves them as `queue`
    /// says, for benchmarks.
    pub fn throughput(nodes: usize, disk: Micros, outstanding: usize, queue: DiskQueue) -> Self {
        Self {
            pre_vote: true,
            check_quorum: true,
            election_ticks: 10,
            heartbeat_ticks: 2,
            max_entries: 256,
            max_bytes: 1 << 20,
            max_inflight: 64,
            disk: (disk, disk + 1),
            net_delay: (100, 101),
            fault_gap: (1, 2),
            restart_gap: (1, 2),
            tick_interval: vec![TICK; nodes],
            checkpoint_every: None,
            phases: 0,
            crash_after_send: 0.0,
            load: Vec::new(),
            lease_reads: false,
            reconfigure: None,
            compaction: false,
            disk_queue: queue,
            max_outstanding_writes: outstanding,
        }
    }

    /// Entries one append carries at most, given both limits (a put is 24
    /// payload bytes plus the core's fixed per-entry charge).
    pub fn entries_per_append(&self) -> u64 {
        const PUT_SIZE: usize = 24 + 24;
        self.max_entries.min((self.max_bytes / PUT_SIZE).max(1)) as u64
    }

    /// The longest tick interval of any node.
    pub fn slowest_tick(&self) -> Micros {
        self.tick_interval.iter().copied().max().unwrap_or(TICK)
    }

    /// How long a healed cluster may take to elect a leader: many election
    /// timeouts, since split votes (without pre-vote) and disruption by a
    /// returning node with a higher term are legitimate.
    pub fn leader_deadline(&self) -> Micros {
        40 * u64::from(self.election_ticks) * self.slowest_tick()
    }

    /// One replication round trip at worst on a healthy network: there and
    /// back, a follower's write, and a tick for the sender to notice.
    pub fn round_trip(&self) -> Micros {
        2 * self.net_delay.1 + self.longest_write() + self.slowest_tick()
    }

    /// The longest a write can take from hand-out to durable on a healthy
    /// disk: a serial disk may first finish the write it is busy with.
    pub fn longest_write(&self) -> Micros {
        match self.disk_queue {
            DiskQueue::Serial => 2 * self.disk.1,
            DiskQueue::Pipelined => self.disk.1,
        }
    }

    /// Line for failure reports.
    pub fn describe(&self) -> String {
        format!(
            "pre_vote={} check_quorum={} election={} heartbeat={} entries/msg={} bytes/msg={} \
             inflight={} disk={:?}us {:?}x{} checkpoint={:?} phases={} crash_after_send={} load={:?} \
             spares={:?} lease_reads={} compaction={}",
            self.pre_vote,
            self.check_quorum,
            self.election_ticks,
            self.heartbeat_ticks,
            self.max_entries,
            self.max_bytes,
            self.max_inflight,
            self.disk,
            self.disk_queue,
            self.max_outstanding_writes,
            self.checkpoint_every,
            self.phases,
            self.crash_after_send,
            self.load.iter().map(|l| l.window).collect::<Vec<_>>(),
            self.reconfigure,
            self.lease_reads,
            self.compaction,
        )
    }
}
