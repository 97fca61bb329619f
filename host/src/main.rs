//! The `kythira` command: the daemon, its operator tools and a client.

mod bench;
mod cert;
mod cli;
mod config;
mod demo;
mod http;
mod plugin_demo;
mod serve;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kythira",
    version,
    about = "Replicated WebAssembly state machines"
)]
struct Cli {
    #[command(flatten)]
    conn: cli::Connection,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a new node's data directory, once, before its first `serve`:
    /// `kythira init --config node.toml`. Refuses a directory that holds
    /// anything.
    Init {
        /// The node's configuration file.
        #[arg(long, env = "KYTHIRA_CONFIG")]
        config: PathBuf,
    },
    /// Run a node: `kythira serve --config node.toml`. Its data directory
    /// must have been created by `kythira init`.
    Serve {
        /// The node's configuration file.
        #[arg(long, env = "KYTHIRA_CONFIG")]
        config: PathBuf,
    },
    /// Create the cluster CA and issue certificates.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Start a three-node cluster on this machine, deploy the kv plugin,
    /// write and read through it, kill the leader and read again.
    Demo(demo::DemoArgs),
    /// The runtime alone, in one process: load the kv plugin, apply, query,
    /// snapshot, and contain misbehaving plugins.
    DemoPlugin {
        /// Directory holding the built components (`just plugins`).
        #[arg(long, default_value = "target/plugins")]
        plugins: PathBuf,
    },
    /// Load a cluster and report throughput and latency.
    Bench(bench::BenchArgs),
    #[command(flatten)]
    Client(cli::ClientCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `RUST_LOG` decides (e.g. `RUST_LOG=kythira_node=debug,info`). Without
    // it a daemon logs its state transitions (info) but not the storage
    // engine's housekeeping, while the other commands keep stderr for their
    // one-line errors.
    let default = match cli.command {
        Command::Serve { .. } => "info,fjall=warn,lsm_tree=warn",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: a daemon's stderr usually goes to a file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, the whole chain of causes: what scripts and people read.
            eprintln!("kythira: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match cli.command {
        Command::Init { config } => serve::init(&config::load(&config)?),
        Command::Serve { config } => {
            let cfg = config::load(&config)?;
            runtime()?.block_on(serve::run(cfg))
        }
        Command::Cert(cmd) => {
            let written = cert::run(cmd)?;
            if cli.conn.json {
                let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                println!("{}", serde_json::json!({ "wrote": paths }));
            } else {
                for path in written {
                    println!("wrote {}", path.display());
                }
            }
            Ok(())
        }
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::DemoPlugin { plugins } => plugin_demo::run(&plugins),
        Command::Bench(args) => runtime()?.block_on(bench::run(&cli.conn, args)),
        Command::Client(cmd) => runtime()?.block_on(cli::run(&cli.conn, cmd)),
    }
}
