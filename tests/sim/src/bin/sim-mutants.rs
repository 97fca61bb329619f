//! Inject each classic Raft bug in turn and measure the simulator's power
//! against it: the share of a fixed sample of seeds that catch it, and the
//! first seed that does within the budget `just test` runs (the seeds
//! `0..budget` at 3 and at 5 nodes). Exits non-zero if any mutant survives.
//!
//! `sim-mutants [--budget N] [--sample N] [--only NAME]`, or
//! `sim-mutants --only NAME --seed S --nodes N` to replay one catch.

use anyhow::{Context, bail};
use kythira_raft::Mutation;
use kythira_sim::{Options, hunt_mutant, run_seeds};

/// Seeds per cluster size a mutant must be caught within (`--budget`).
const DEFAULT_BUDGET: u64 = 2_000;
/// Seeds per cluster size run in full to measure each catch rate (`--sample`).
const DEFAULT_SAMPLE: u64 = 50;

fn main() -> anyhow::Result<()> {
    let mut budget = DEFAULT_BUDGET;
    let mut sample = DEFAULT_SAMPLE;
    let mut only = None;
    let mut replay_seed = None;
    let mut replay_nodes = 3;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = args
                .next()
                .with_context(|| format!("{name} needs a value"))?;
            v.parse()
                .with_context(|| format!("{name}: not a number: {v}"))
        };
        match flag.as_str() {
            "--budget" => budget = value("--budget")?,
            "--sample" => sample = value("--sample")?,
            "--only" => only = Some(args.next().context("--only needs a mutant name")?),
            "--seed" => replay_seed = Some(value("--seed")?),
            "--nodes" => replay_nodes = value("--nodes")? as usize,
            other => bail!(
                "unknown argument {other}; usage: sim-mutants [--budget N] [--sample N] [--only NAME]"
            ),
        }
    }
    if let Some(seed) = replay_seed {
        let name = only.context("--seed replays one mutant: give --only NAME")?;
        let m = Mutation::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .with_context(|| format!("no mutant named {name}"))?;
        let r = kythira_sim::run_seed(Options {
            mutation: Some(m),
            ..Options::checked(replay_nodes, seed)
        });
        eprintln!("profile: {}", r.profile);
        match r.failure {
            Some(f) => println!("caught: {f}"),
            None => println!("not caught by seed {seed} at {replay_nodes} nodes"),
        }
        return Ok(());
    }
    let mut missed = 0;
    for m in Mutation::ALL {
        if only.as_deref().is_some_and(|o| o != m.name()) {
            continue;
        }
        let mut caught = 0;
        for nodes in [3, 5] {
            let s = run_seeds(0, sample, 2, false, |seed| Options {
                mutation: Some(m),
                ..Options::checked(nodes, seed)
            });
            caught += s.failures.len() as u64;
        }
        let rate = caught as f64 / (2 * sample) as f64;
        match hunt_mutant(m, budget, 2) {
            Some((seed, nodes, failure)) => {
                eprintln!(
                    "{} caught on seed {seed} ({nodes} nodes): {}\n  replay: just sim-mutants --only {} --seed {seed} --nodes {nodes}",
                    m.name(),
                    failure.lines().next().unwrap_or(""),
                    m.name(),
                );
                println!(
                    "MUTANT name={} caught=yes first_seed={seed} nodes={nodes} rate={rate:.3} sample={}",
                    m.name(),
                    2 * sample
                );
            }
            None => {
                missed += 1;
                println!(
                    "MUTANT name={} caught=no budget={budget} rate={rate:.3} sample={}",
                    m.name(),
                    2 * sample
                );
            }
        }
    }
    if missed > 0 {
        bail!("{missed} mutant(s) survived {budget} seeds at 3 and at 5 nodes");
    }
    Ok(())
}
