//! The `kythira` command.

mod demo;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kythira",
    version,
    about = "Replicated WebAssembly state machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the kv plugin, apply, query, snapshot and restore it, and show a
    /// misbehaving plugin being contained.
    Demo {
        /// Directory holding the built components (`just plugins`).
        #[arg(long, default_value = "target/plugins")]
        plugins: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo { plugins } => demo::run(&plugins),
    }
}
