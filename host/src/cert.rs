//! `kythira cert`: the cluster's certificate authority and the certificates
//! it issues to nodes and clients.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use kythira_transport::pki::{Ca, Identity, Role};

#[derive(Debug, Subcommand)]
pub enum CertCommand {
    /// Create a new cluster CA (ca.pem, ca-key.pem) in --dir.
    Init {
        /// Directory for the certificates.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
    /// Issue a node certificate (node-ID.pem, node-ID-key.pem) binding its id.
    Node {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The node's id (from 1).
        #[arg(long)]
        id: u64,
        /// IP addresses the node is reached at (repeatable).
        #[arg(long = "addr", required = true)]
        addrs: Vec<IpAddr>,
    },
    /// Issue a client certificate (NAME.pem, NAME-key.pem).
    Client {
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// The client's name.
        #[arg(long)]
        name: String,
        /// `admin` may also deploy code; `client` may read and write.
        #[arg(long, default_value = "client")]
        role: Role,
    },
}

/// Runs a `cert` subcommand; returns the files written.
pub fn run(cmd: CertCommand) -> anyhow::Result<Vec<PathBuf>> {
    match cmd {
        CertCommand::Init { dir } => init(&dir),
        CertCommand::Node { dir, id, addrs } => {
            issue(&dir, &Identity::Node(id), &addrs, &format!("node-{id}"))
        }
        CertCommand::Client { dir, name, role } => {
            let identity = Identity::client(name.clone(), role)?;
            issue(&dir, &identity, &[], &name)
        }
    }
}

/// Creates the CA in `dir`, refusing to replace one.
pub fn init(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    if cert.exists() || key.exists() {
        bail!(
            "{} already holds a CA; remove it first to start a new cluster",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ca::generate()?.write(&cert, &key)?;
    Ok(vec![cert, key])
}

/// Issues a certificate for `identity` with the CA in `dir`.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    ips: &[IpAddr],
    stem: &str,
) -> anyhow::Result<Vec<PathBuf>> {
    let ca = Ca::read(&dir.join("ca.pem"), &dir.join("ca-key.pem")).with_context(|| {
        format!(
            "no usable CA in {} (create one with `kythira cert init --dir {}`)",
            dir.display(),
            dir.display()
        )
    })?;
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    );
    ca.issue(identity, ips)?.write(&cert, &key)?;
    Ok(vec![cert, key])
}
