//! Inject each classic Raft bug in turn and check that the simulator catches
//! it within a bounded number of seeds.

use anyhow::{Context, bail};
use kythira_raft::Mutation;
use kythira_sim::{Options, run_seeds};

/// Seeds tried per mutant before declaring it missed (`--max-seeds N`).
const DEFAULT_MAX_SEEDS: u64 = 3_000;

/// Cluster size used to hunt each mutant.
fn nodes_for(m: Mutation) -> usize {
    match m {
        // Figure 8 of the paper needs a leader change with entries of an
        // older term spread over a bare majority: easiest with five nodes.
        Mutation::CommitPreviousTermByCount => 5,
        _ => 3,
    }
}

fn main() -> anyhow::Result<()> {
    let mut max_seeds = DEFAULT_MAX_SEEDS;
    let mut first = 0;
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        match flag.as_str() {
            "--max-seeds" => {
                max_seeds = args.next().context("--max-seeds needs a value")?.parse()?
            }
            "--first" => first = args.next().context("--first needs a value")?.parse()?,
            "--only" => only = Some(args.next().context("--only needs a mutant name")?),
            other => {
                bail!(
                    "unknown argument {other}; usage: sim-mutants [--max-seeds N] [--first S] [--only NAME]"
                )
            }
        }
    }
    let mut missed = 0;
    for m in Mutation::ALL {
        if only.as_deref().is_some_and(|o| o != m.name()) {
            continue;
        }
        let nodes = nodes_for(m);
        let summary = run_seeds(first, max_seeds, 2, true, |seed| Options {
            mutation: Some(m),
            ..Options::checked(nodes, seed)
        });
        match summary.failures.first() {
            Some(f) => {
                eprintln!(
                    "{} caught on seed {} ({} nodes): {}\n  replay: cargo run --release -p kythira-sim \
                     --features mutants --bin sim-mutants -- --only {} --first {} --max-seeds 1",
                    m.name(),
                    f.seed,
                    nodes,
                    f.failure
                        .as_ref()
                        .expect("failures only")
                        .to_string()
                        .lines()
                        .next()
                        .unwrap_or(""),
                    m.name(),
                    f.seed
                );
                println!("MUTANT name={} caught=yes seed={}", m.name(), f.seed);
            }
            None => {
                missed += 1;
                println!("MUTANT name={} caught=no seed=none", m.name());
            }
        }
    }
    if missed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
