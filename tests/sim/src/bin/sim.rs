//! Run the cluster simulator over many seeds:
//! `sim --seeds N [--nodes 3|5] [--first S] [--threads T]` or `sim --seed S [--nodes N]`.

use std::time::Instant;

use anyhow::{Context, bail};
use kythira_sim::{Options, replay_command, run_seeds};

struct Args {
    first: u64,
    count: u64,
    nodes: usize,
    threads: usize,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        first: 0,
        count: 100,
        nodes: 3,
        threads: 2,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = it.next().with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--seeds" => args.count = value("--seeds")?,
            "--seed" => {
                args.first = value("--seed")?;
                args.count = 1;
            }
            "--first" => args.first = value("--first")?,
            "--nodes" => args.nodes = value("--nodes")? as usize,
            "--threads" => args.threads = value("--threads")? as usize,
            other => bail!(
                "unknown argument {other}; usage: sim --seeds N [--nodes 3|5] [--first S] [--threads T] | --seed S"
            ),
        }
    }
    if !(3..=7).contains(&args.nodes) {
        bail!("--nodes must be between 3 and 7");
    }
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let started = Instant::now();
    if args.count == 1 {
        // One seed: say what it was, for replaying and tuning.
        let r = kythira_sim::run_seed(Options::checked(args.nodes, args.first));
        eprintln!(
            "seed={} steps={} operations={} virtual={:.1}s trace={:016x}\n  profile: {}",
            r.seed,
            r.steps,
            r.operations,
            r.virtual_micros as f64 / 1e6,
            r.trace,
            r.profile
        );
    }
    let summary = run_seeds(args.first, args.count, args.threads, false, |seed| {
        Options::checked(args.nodes, seed)
    });
    for f in &summary.failures {
        eprintln!(
            "FAIL seed={} nodes={}: {}\n  profile: {}\n  replay: {}",
            f.seed,
            args.nodes,
            f.failure.as_ref().expect("failures only"),
            f.profile,
            replay_command(f.seed, args.nodes)
        );
    }
    eprintln!(
        "nodes={} seeds {}..{} in {:.1} s; linearizability undecided (budget exhausted): {}",
        args.nodes,
        args.first,
        args.first + args.count,
        started.elapsed().as_secs_f64(),
        summary.undecided
    );
    println!(
        "SIM seeds={} steps={} violations={} nonlinearizable={}",
        summary.seeds, summary.steps, summary.violations, summary.nonlinearizable
    );
    if summary.violations + summary.nonlinearizable > 0 {
        std::process::exit(1);
    }
    Ok(())
}
