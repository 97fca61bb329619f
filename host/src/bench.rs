//! `kythira bench`: a load generator over the client library.
//!
//! Every simulated client is a task with its own [`Client`], so its own QUIC
//! connection, as separate application processes would have; one shared
//! connection would multiplex them all on one stream window and measure
//! something no deployment sees. Writes are kv puts in the plugin's binary
//! encoding (postcard, `Payload::Bytes`), so the figures are those of the
//! log path, not of the JSON translation at the edge; reads are
//! linearizable `Get` queries.
//!
//! `--local` starts a 3-node cluster of this binary in a temporary directory
//! first and measures the two costs a write cannot avoid on this machine, as
//! a baseline in the same run: one fdatasync of a 4 KiB append, and one
//! loopback round trip of the client protocol (`Ping`, answered without the
//! node's event loop).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use kythira::local::{LocalCluster, Options};
use kythira_api::{Consistency, DeployLimits, Payload};
use kythira_client::{Client, ClientConfig};
use kythira_plugin_kv::{Command, Query};
use kythira_transport::tls::{Tls, TlsFiles};
use tokio::time::Instant;

/// The state machine the benchmark drives.
const MACHINE: &str = "kv";

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Concurrent clients, each with its own connection; a list (`1,16,64`)
    /// runs one measurement per entry, one after the other.
    #[arg(long, value_delimiter = ',', default_value = "16")]
    clients: Vec<usize>,
    /// How long each measurement lasts, after the warmup.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Load before measuring (connections, leader discovery, caches), not counted.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Bytes in each value written.
    #[arg(long, default_value_t = 100)]
    value_size: usize,
    /// Distinct keys, chosen uniformly.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Fraction of operations that are reads (linearizable gets), 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    read_ratio: f64,
    /// Total operations per second to offer, spread over the clients
    /// (open loop: latency counts from when an operation was due); 0 sends
    /// as fast as answers come back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Which nodes the clients talk to: `leader` (every request follows the
    /// leader; reads are linearizable) or `all` (clients spread over every
    /// endpoint; writes are still redirected to the leader, reads are stale
    /// reads served by the node asked).
    #[arg(long, value_enum, default_value_t = Nodes::Leader)]
    target: Nodes,
    /// Start a local 3-node cluster of this binary in a temporary directory,
    /// deploy kv into it, measure the disk and loopback baselines, then run.
    #[arg(long)]
    local: bool,
    /// With `--local`: where the built components are (`just plugins`).
    #[arg(long, default_value = "target/plugins")]
    plugins: PathBuf,
}

/// `--target`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Nodes {
    Leader,
    All,
}

/// How to make the clients: endpoints, certificate and timeouts.
struct Target {
    endpoints: Vec<SocketAddr>,
    tls: Tls,
    timeout: Duration,
}

impl Target {
    fn client(&self) -> anyhow::Result<Client> {
        self.client_from(0)
    }

    /// A client of the `i`-th endpoint alone.
    fn pinned(&self, i: usize) -> anyhow::Result<Client> {
        let ep = self.endpoints[i % self.endpoints.len().max(1)];
        let mut cfg = ClientConfig::new(vec![ep], self.tls.clone());
        cfg.deadline = self.timeout;
        cfg.attempt_timeout = self.timeout.min(Duration::from_secs(5));
        Ok(Client::new(cfg)?)
    }

    /// A client that tries the endpoints starting with the `first`-th.
    fn client_from(&self, first: usize) -> anyhow::Result<Client> {
        let mut endpoints = self.endpoints.clone();
        let n = endpoints.len().max(1);
        endpoints.rotate_left(first % n);
        let mut cfg = ClientConfig::new(endpoints, self.tls.clone());
        cfg.deadline = self.timeout;
        cfg.attempt_timeout = self.timeout.min(Duration::from_secs(5));
        Ok(Client::new(cfg)?)
    }
}

pub async fn run(conn: &crate::cli::Connection, args: BenchArgs) -> anyhow::Result<()> {
    validate(&args)?;
    if args.local {
        return run_local(conn, &args).await;
    }
    let target = Target {
        endpoints: conn.endpoints.clone(),
        tls: Tls::load(&TlsFiles {
            ca: conn.cacert.clone(),
            cert: conn.cert.clone(),
            key: conn.key.clone(),
        })?,
        timeout: conn.timeout,
    };
    check_deployed(&target).await?;
    let cpu = CpuProbe::new(Vec::new());
    for &clients in &args.clients {
        let before = cpu.sample();
        let report = measure(&target, &args, clients).await?;
        report.print();
        cpu.print(&before, report.elapsed);
    }
    Ok(())
}

fn validate(args: &BenchArgs) -> anyhow::Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        bail!(
            "--read-ratio must be between 0 and 1, not {}",
            args.read_ratio
        );
    }
    if args.keys == 0 {
        bail!("--keys must be at least 1");
    }
    if args.rate < 0.0 || !args.rate.is_finite() {
        bail!("--rate must be 0 or more operations per second");
    }
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    Ok(())
}

/// Refuses to run against a cluster without kv, naming the fix.
async fn check_deployed(target: &Target) -> anyhow::Result<()> {
    let client = target.client()?;
    let mut last = None;
    for ep in &target.endpoints {
        match client.status_of(*ep).await {
            Ok(s) if s.machines.iter().any(|m| m.name == MACHINE) => return Ok(()),
            Ok(_) => {
                bail!(
                    "no `{MACHINE}` state machine is deployed on {ep}; deploy it first: \
                     kythira deploy {MACHINE} target/plugins/{MACHINE}.wasm"
                )
            }
            Err(e) => last = Some(format!("{ep}: {e}")),
        }
    }
    bail!(
        "no endpoint answered: {}",
        last.unwrap_or_else(|| "no endpoints".into())
    )
}

/// What one measurement found.
struct Report {
    name: String,
    clients: usize,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency: Histogram<u64>,
}

impl Report {
    fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    fn p(&self, quantile: f64) -> u64 {
        self.latency.value_at_quantile(quantile)
    }

    fn print(&self) {
        println!(
            "{} clients={}: {} ops in {:.1} s = {:.0} ops/s, {} errors; latency p50 {} p99 {} p999 {} max {}",
            self.name,
            self.clients,
            self.ops,
            self.elapsed.as_secs_f64(),
            self.ops_per_sec(),
            self.errors,
            human_us(self.p(0.5)),
            human_us(self.p(0.99)),
            human_us(self.p(0.999)),
            human_us(self.latency.max()),
        );
        if let Some(e) = &self.first_error {
            println!("  first error: {e}");
        }
        let prefix = format!("{}.c{}", self.name, self.clients);
        println!(
            "BENCH name={prefix}.ops value={:.0} unit=ops/s",
            self.ops_per_sec()
        );
        for (label, q) in [("p50", 0.5), ("p99", 0.99), ("p999", 0.999)] {
            println!("BENCH name={prefix}.{label} value={} unit=us", self.p(q));
        }
        println!(
            "BENCH name={prefix}.errors value={} unit=count",
            self.errors
        );
    }
}

fn human_us(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} µs")
    }
}

/// The benchmark's name for this mix of reads and writes.
fn workload(read_ratio: f64) -> &'static str {
    if read_ratio <= 0.0 {
        "cluster.write"
    } else if read_ratio >= 1.0 {
        "cluster.read"
    } else {
        "cluster.mixed"
    }
}

/// What one client task counted.
struct Tally {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    latency: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits; larger values are clamped, not lost.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn measure(target: &Target, args: &BenchArgs, clients: usize) -> anyhow::Result<Report> {
    // Connect every client (and let each find the leader) before the clock
    // starts, so that the warmup measures load rather than handshakes.
    let consistency = match args.target {
        Nodes::Leader => Consistency::Linearizable,
        Nodes::All => Consistency::Stale,
    };
    let mut conns = Vec::with_capacity(clients);
    for i in 0..clients {
        let client = match args.target {
            Nodes::Leader => target.client()?,
            Nodes::All => target.client_from(i)?,
        };
        client
            .query(MACHINE, get_query(0), consistency)
            .await
            .context("the first query failed")?;
        conns.push(client);
    }
    let value = Bytes::from(
        (0..args.value_size)
            .map(|i| b'a' + (i % 26) as u8)
            .collect::<Vec<u8>>(),
    );
    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    // Each client's share of the offered rate, as the gap between its operations.
    let gap = (args.rate > 0.0).then(|| Duration::from_secs_f64(clients as f64 / args.rate));
    let mut tasks = Vec::with_capacity(clients);
    for (i, client) in conns.into_iter().enumerate() {
        let job = Job {
            client,
            seed: 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1),
            keys: args.keys,
            read_ratio: args.read_ratio,
            value: value.clone(),
            // Spread the clients' schedules over one gap, so they do not fire together.
            start: start + gap.map_or(Duration::ZERO, |g| g.mul_f64(i as f64 / clients as f64)),
            measure_from,
            end,
            gap,
            consistency,
            reader: match args.target {
                Nodes::Leader => None,
                Nodes::All => Some(target.pinned(i)?),
            },
        };
        tasks.push(tokio::spawn(job.run()));
    }
    let mut report = Report {
        name: workload(args.read_ratio).to_string(),
        clients,
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: args.duration,
        latency: histogram(),
    };
    for task in tasks {
        let tally = task.await.context("a bench client failed")?;
        report.ops += tally.ops;
        report.errors += tally.errors;
        if report.first_error.is_none() {
            report.first_error = tally.first_error;
        }
        report.latency.add(&tally.latency)?;
    }
    // Operations still in flight at `end` finish late; the measured span
    // ends with the last of them.
    report.elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .max(args.duration);
    Ok(report)
}

struct Job {
    client: Client,
    seed: u64,
    keys: u64,
    read_ratio: f64,
    value: Bytes,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    gap: Option<Duration>,
    consistency: Consistency,
    /// With `--target all`: a client that knows only this client's own
    /// node, so that its stale reads stay there while writes follow the leader.
    reader: Option<Client>,
}

impl Job {
    async fn run(self) -> Tally {
        let mut rng = SplitMix(self.seed);
        let mut tally = Tally {
            ops: 0,
            errors: 0,
            first_error: None,
            latency: histogram(),
        };
        tokio::time::sleep_until(self.start).await;
        let mut due = self.start;
        loop {
            if let Some(gap) = self.gap {
                // Open loop: an operation is due at its slot whether or not
                // the previous one was slow, and its latency counts from the
                // slot, so a stall shows in the percentiles instead of
                // silently lowering the offered load.
                tokio::time::sleep_until(due).await;
                due += gap;
            } else {
                due = Instant::now();
            }
            if due >= self.end {
                break;
            }
            let key = rng.next() % self.keys;
            let read = self.read_ratio > 0.0 && rng.unit() < self.read_ratio;
            let result = if read {
                self.reader
                    .as_ref()
                    .unwrap_or(&self.client)
                    .query(MACHINE, get_query(key), self.consistency)
                    .await
                    .map(drop)
            } else {
                self.client
                    .apply(MACHINE, put_command(key, &self.value))
                    .await
                    .map(drop)
            };
            let done = Instant::now();
            if due < self.measure_from {
                continue;
            }
            match result {
                Ok(()) => {
                    tally.ops += 1;
                    let us = done.saturating_duration_since(due).as_micros() as u64;
                    tally.latency.saturating_record(us.max(1));
                }
                Err(e) => {
                    tally.errors += 1;
                    if tally.first_error.is_none() {
                        tally.first_error = Some(e.to_string());
                    }
                }
            }
        }
        tally
    }
}

fn key_bytes(key: u64) -> Vec<u8> {
    format!("bench/{key:012}").into_bytes()
}

fn put_command(key: u64, value: &Bytes) -> Payload {
    let cmd = Command::Put {
        key: key_bytes(key),
        value: value.to_vec(),
    };
    Payload::Bytes(
        kythira_guest::codec::encode(&cmd)
            .expect("a put encodes")
            .into(),
    )
}

fn get_query(key: u64) -> Payload {
    let query = Query::Get {
        key: key_bytes(key),
    };
    Payload::Bytes(
        kythira_guest::codec::encode(&query)
            .expect("a get encodes")
            .into(),
    )
}

/// A small fast generator: the keys need spread, not unpredictability.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `--local`: a fresh cluster of this binary, the baselines, then the runs.
async fn run_local(conn: &crate::cli::Connection, args: &BenchArgs) -> anyhow::Result<()> {
    let kv = args.plugins.join(format!("{MACHINE}.wasm"));
    let component = std::fs::read(&kv).with_context(|| {
        format!(
            "cannot read {}: build the plugins with `just plugins`",
            kv.display()
        )
    })?;
    let exe = std::env::current_exe()?;
    let dir = tempfile::Builder::new()
        .prefix("kythira-bench-")
        .tempdir()?;
    let mut cluster = LocalCluster::create(&exe, dir.path(), &Options::default())?;
    // Starting processes and waiting for their ready lines blocks.
    tokio::task::block_in_place(|| cluster.start_all())?;
    println!(
        "local cluster: {} nodes of {} under {}",
        cluster.ids().len(),
        exe.display(),
        dir.path().display()
    );
    let target = Target {
        endpoints: cluster.endpoints(),
        tls: Tls::load(&cluster.client_files("admin"))?,
        timeout: conn.timeout,
    };
    let admin = target.client()?;
    let (index, _) = admin
        .deploy(MACHINE, Bytes::from(component), DeployLimits::default())
        .await
        .context("cannot deploy kv")?;
    println!("deployed {MACHINE} at index {index}");

    let fsync = fdatasync_median(dir.path(), 200)?;
    let rtt = rtt_median(&cluster, &admin, 200).await?;
    println!(
        "baseline: fdatasync of a 4 KiB append {} (median of 200), loopback round trip of the client protocol (Ping) {} (median of 200)",
        human_us(fsync),
        human_us(rtt)
    );
    println!("BENCH name=baseline.fdatasync_4k.p50 value={fsync} unit=us");
    println!("BENCH name=baseline.quic_rtt.p50 value={rtt} unit=us");

    let cpu = CpuProbe::new(
        cluster
            .ids()
            .into_iter()
            .filter_map(|id| Some((format!("node {id}"), cluster.pid(id)?)))
            .collect(),
    );
    let mut one_client_p50 = None;
    for &clients in &args.clients {
        let before = cpu.sample();
        let report = measure(&target, args, clients).await?;
        report.print();
        cpu.print(&before, report.elapsed);
        if clients == 1 {
            one_client_p50 = Some((report.name.clone(), report.p(0.5)));
        }
    }
    if let Some((name, p50)) = one_client_p50 {
        let ratio = p50 as f64 / (fsync + rtt).max(1) as f64;
        println!(
            "1-client p50 / (fdatasync + round trip) = {p50} / ({fsync} + {rtt}) = {ratio:.2}"
        );
        println!("BENCH name={name}.c1.p50_over_fsync_rtt value={ratio:.2} unit=ratio");
    }
    drop(cluster);
    Ok(())
}

/// Median latency, in µs, of appending 4 KiB to a file and fdatasync'ing it,
/// in `dir` (so on the disk the nodes write to).
fn fdatasync_median(dir: &Path, rounds: usize) -> anyhow::Result<u64> {
    let path = dir.join("fdatasync-probe");
    let mut file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let block = [0x5au8; 4096];
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = std::time::Instant::now();
        file.write_all(&block)?;
        // An append grows the file, so this also persists its size, as a log append must.
        file.sync_data()?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(median(samples))
}

/// Median latency, in µs, of a `Ping` to the leader over an open connection:
/// the client protocol's round trip, without the node's event loop.
async fn rtt_median(cluster: &LocalCluster, client: &Client, rounds: usize) -> anyhow::Result<u64> {
    let mut leader = None;
    for id in cluster.ids() {
        let s = client.status_of(cluster.addr(id)).await?;
        if s.role == "leader" {
            leader = Some(cluster.addr(id));
        }
    }
    let addr = leader.context("no node leads right after a deploy committed")?;
    // The first call may open the connection; it is not a round trip.
    client.ping(addr).await?;
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        client.ping(addr).await?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    Ok(median(samples))
}

/// CPU time of this process and of the nodes, from `/proc`: on one machine
/// the load generator competes with the cluster for the same cores, so a
/// figure means little without knowing who used them.
struct CpuProbe {
    procs: Vec<(String, String)>,
}

impl CpuProbe {
    fn new(nodes: Vec<(String, u32)>) -> Self {
        let mut procs = vec![("bench".to_string(), "/proc/self/stat".to_string())];
        procs.extend(
            nodes
                .into_iter()
                .map(|(label, pid)| (label, format!("/proc/{pid}/stat"))),
        );
        Self { procs }
    }

    /// Seconds of user and system time so far, per process; `None` where
    /// `/proc` cannot tell (not Linux, process gone).
    fn sample(&self) -> Vec<Option<f64>> {
        self.procs
            .iter()
            .map(|(_, path)| cpu_seconds(&std::fs::read_to_string(path).ok()?))
            .collect()
    }

    fn print(&self, before: &[Option<f64>], elapsed: Duration) {
        let after = self.sample();
        let parts: Vec<String> = self
            .procs
            .iter()
            .zip(before.iter().zip(&after))
            .filter_map(|((label, _), (b, a))| {
                let cores = (a.as_ref()? - b.as_ref()?) / elapsed.as_secs_f64();
                Some(format!("{label} {cores:.2}"))
            })
            .collect();
        if !parts.is_empty() {
            let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
            println!("  cpu (cores busy, of {cores}): {}", parts.join(", "));
        }
    }
}

/// utime + stime of a `/proc/PID/stat` line, in seconds. The fields are
/// counted after the command name's closing parenthesis, since the name
/// itself may contain spaces; the kernel's clock tick is 100 Hz on every
/// platform Linux runs this on (`USER_HZ`).
fn cpu_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn median(mut samples: Vec<u64>) -> u64 {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_mix() {
        assert_eq!(workload(0.0), "cluster.write");
        assert_eq!(workload(0.5), "cluster.mixed");
        assert_eq!(workload(1.0), "cluster.read");
    }

    #[test]
    fn commands_are_the_plugins_binary_encoding() {
        let value = Bytes::from_static(b"v");
        let Payload::Bytes(bytes) = put_command(7, &value) else {
            panic!("binary payload expected");
        };
        let decoded: Command = kythira_guest::codec::decode(&bytes).unwrap();
        assert_eq!(
            decoded,
            Command::Put {
                key: b"bench/000000000007".to_vec(),
                value: b"v".to_vec(),
            }
        );
    }

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0";
        assert_eq!(cpu_seconds(stat), Some(3.0));
        assert_eq!(cpu_seconds("garbage"), None);
    }

    #[test]
    fn unit_is_in_range() {
        let mut rng = SplitMix(1);
        for _ in 0..1000 {
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
