//! `kythira-plugin`: turns plugin crates' build output into deployable components.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kythira-plugin", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Wrap a wasm32-unknown-unknown core module built with the kythira-guest
    /// SDK into a validated component.
    Componentize {
        /// The core module (`target/wasm32-unknown-unknown/<profile>/<crate>.wasm`).
        core: PathBuf,
        /// Where to write the component.
        #[arg(short, long)]
        output: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Componentize { core, output } => {
            let module =
                std::fs::read(&core).with_context(|| format!("reading {}", core.display()))?;
            let component = kythira_plugin_tool::componentize(&module)
                .with_context(|| format!("componentizing {}", core.display()))?;
            std::fs::write(&output, component)
                .with_context(|| format!("writing {}", output.display()))?;
        }
    }
    Ok(())
}
