//! Run the cluster simulator over many seeds:
//! `sim --seeds N [--nodes 1..7|mixed] [--first S] [--threads T]`, or replay
//! one: `sim --seed S [--nodes N]`. `mixed` draws each seed's cluster size
//! from 1 to 7 (see [`kythira_sim::mixed_size`]).

use std::time::Instant;

use anyhow::{Context, bail};
use kythira_sim::{Options, SeedReport, mixed_size, replay_command, run_seeds};

struct Args {
    first: u64,
    count: u64,
    /// `None`: mixed sizes.
    nodes: Option<usize>,
    threads: usize,
}

impl Args {
    fn size(&self, seed: u64) -> usize {
        self.nodes.unwrap_or_else(|| mixed_size(seed))
    }
}

const USAGE: &str = "usage: sim --seeds N [--nodes 1..7|mixed] [--first S] [--threads T] | sim --seed S [--nodes N]";

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        first: 0,
        count: 100,
        nodes: Some(3),
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<String> {
            it.next()
                .with_context(|| format!("{name} needs a value; {USAGE}"))
        };
        let number = |name: &str, v: String| -> anyhow::Result<u64> {
            v.parse()
                .with_context(|| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--seeds" => args.count = number("--seeds", value("--seeds")?)?,
            "--seed" => {
                args.first = number("--seed", value("--seed")?)?;
                args.count = 1;
            }
            "--first" => args.first = number("--first", value("--first")?)?,
            "--nodes" => {
                args.nodes = match value("--nodes")?.as_str() {
                    "mixed" => None,
                    v => {
                        let n = number("--nodes", v.to_string())? as usize;
                        if !(1..=7).contains(&n) {
                            bail!("--nodes must be between 1 and 7, or mixed");
                        }
                        Some(n)
                    }
                }
            }
            "--threads" => args.threads = number("--threads", value("--threads")?)? as usize,
            other => bail!("unknown argument {other}; {USAGE}"),
        }
    }
    Ok(args)
}

fn report_failure(f: &SeedReport, nodes: usize) {
    eprintln!(
        "FAIL seed={} nodes={nodes}: {}\n  profile: {}\n  replay: {}",
        f.seed,
        f.failure.as_ref().expect("failures only"),
        f.profile,
        replay_command(f.seed, nodes)
    );
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let started = Instant::now();
    if args.count == 1 {
        // One seed: say what it was, for replaying and tuning
        // (`SIM_DEBUG=1` also prints every node's state at a failure).
        let nodes = args.size(args.first);
        let r = kythira_sim::run_seed(Options::checked(nodes, args.first));
        eprintln!(
            "seed={} nodes={nodes} steps={} operations={} virtual={:.1}s trace={:016x} {:?}\n  profile: {}",
            r.seed,
            r.steps,
            r.operations,
            r.virtual_micros as f64 / 1e6,
            r.trace,
            r.depth,
            r.profile
        );
        if r.failure.is_some() {
            report_failure(&r, nodes);
            std::process::exit(1);
        }
        return Ok(());
    }
    let summary = run_seeds(args.first, args.count, args.threads, false, |seed| {
        Options::checked(args.size(seed), seed)
    });
    for f in &summary.failures {
        report_failure(f, args.size(f.seed));
    }
    let nodes = args
        .nodes
        .map_or_else(|| "mixed".to_string(), |n| n.to_string());
    eprintln!(
        "nodes={nodes} seeds {}..{} in {:.1} s; linearizability undecided (budget exhausted): {}",
        args.first,
        args.first + args.count,
        started.elapsed().as_secs_f64(),
        summary.undecided
    );
    let d = summary.depth;
    eprintln!(
        "depth: highest term {}, longest replaced suffix {} entries (seeds replacing 1,000+: {}), \
         largest catch-up lag {} entries, tightest liveness deadline {:.1} % used, \
         membership entries committed {}, handovers {}, compactions {}, snapshots installed {}",
        d.max_term,
        d.longest_truncation,
        summary.long_truncations,
        d.largest_lag,
        d.tightest_deadline_permille as f64 / 10.0,
        summary.membership_changes,
        summary.transfers,
        summary.compactions,
        summary.installs
    );
    println!(
        "SIM nodes={nodes} seeds={} steps={} violations={} nonlinearizable={}",
        summary.seeds, summary.steps, summary.violations, summary.nonlinearizable
    );
    // A history the checker could not decide is not a pass.
    if summary.violations + summary.nonlinearizable + summary.undecided > 0 {
        std::process::exit(1);
    }
    Ok(())
}
