//! The async client for Kythira clusters, used by the CLI, the benchmark and
//! applications.
//!
//! A [`Client`] holds one QUIC connection per node it has talked to, with
//! every request multiplexed on it. It finds the leader by following
//! `NotLeader` answers, retries what is safe to retry until its deadline,
//! and reports the rest as typed [`ClientError`]s. A plain
//! [`Client::apply`] is retried only when the command surely did not
//! commit; a [`Session`] numbers its commands, so it retries every failure
//! and the cluster applies each command exactly once.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use kythira_api::{
    ApiError, Consistency, DeployLimits, DryRunReport, Members, NodeStatus, Payload, PluginReport,
    Reply, Request, Response, SessionSeq,
};
use kythira_transport::rpc::{RpcClient, RpcError};
use kythira_transport::tls::Tls;
use tokio::time::Instant;

/// How a client reaches the cluster.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Nodes to try, in order, until one names the leader.
    pub endpoints: Vec<SocketAddr>,
    /// The client's certificate and the cluster CA.
    pub tls: Tls,
    /// How long one attempt may wait for its answer.
    pub attempt_timeout: Duration,
    /// How long a request may keep retrying (leader changes, restarts).
    pub deadline: Duration,
}

impl ClientConfig {
    /// Defaults: 5 s per attempt, 30 s in all.
    pub fn new(endpoints: Vec<SocketAddr>, tls: Tls) -> Self {
        Self {
            endpoints,
            tls,
            attempt_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(30),
        }
    }
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The configuration names no node.
    #[error("no endpoints given")]
    NoEndpoints,
    /// The cluster answered with an error that retrying will not fix.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// No node could serve the request before the deadline.
    #[error("the cluster did not answer within {waited:?}; last error: {last}")]
    Unavailable {
        /// How long the client tried.
        waited: Duration,
        /// The last failure seen.
        last: String,
    },
    /// The command may or may not have been applied (the connection or the
    /// leadership was lost after it was sent). Use a [`Session`] to retry safely.
    #[error("the command's outcome is unknown: {0}")]
    Ambiguous(String),
    /// Our own certificate was refused.
    #[error("refused by the cluster: {0}")]
    Refused(String),
    /// The node answered something this client does not expect.
    #[error("unexpected answer: {0}")]
    Protocol(String),
}

/// Whether a failed attempt may be retried, and whether the request may
/// have been carried out.
enum Failure {
    /// Not carried out; try again (possibly at `next`).
    Retry {
        next: Option<SocketAddr>,
        why: String,
    },
    /// Maybe carried out.
    Ambiguous(String),
    /// Final.
    Fatal(ClientError),
}

/// A connection pool and leader tracker for one cluster.
pub struct Client {
    cfg: ClientConfig,
    conns: Mutex<HashMap<SocketAddr, RpcClient>>,
    /// The node believed to lead, or the next endpoint to try.
    target: Mutex<SocketAddr>,
}

impl Client {
    /// A client for the cluster at `cfg.endpoints`; connects on first use.
    pub fn new(cfg: ClientConfig) -> Result<Self, ClientError> {
        let first = *cfg.endpoints.first().ok_or(ClientError::NoEndpoints)?;
        Ok(Self {
            cfg,
            conns: Mutex::new(HashMap::new()),
            target: Mutex::new(first),
        })
    }

    /// Applies `command` to machine `machine` once, at most: returns its log
    /// index and answer. Not retried once it may have been sent to the leader.
    pub async fn apply(
        &self,
        machine: &str,
        command: Payload,
    ) -> Result<(u64, Payload), ClientError> {
        let req = Request::Apply {
            machine: machine.into(),
            command,
            session: None,
        };
        applied(self.request(&req, false).await?)
    }

    /// Runs a query. Any node serves `Linearizable` (a follower confirms
    /// with the leader first) and `Stale` reads; `Lease` reads go to the
    /// leader.
    pub async fn query(
        &self,
        machine: &str,
        query: Payload,
        consistency: Consistency,
    ) -> Result<Payload, ClientError> {
        let req = Request::Query {
            machine: machine.into(),
            query,
            consistency,
        };
        match self.request(&req, true).await? {
            Response::Queried { output } => Ok(output),
            other => Err(unexpected(&other)),
        }
    }

    /// Deploys (or upgrades) machine `machine`; needs an admin certificate.
    /// Returns the deploy's log index and the code's sha256.
    pub async fn deploy(
        &self,
        machine: &str,
        component: Bytes,
        limits: DeployLimits,
    ) -> Result<(u64, String), ClientError> {
        self.code(Request::Deploy {
            machine: machine.into(),
            component,
            limits,
        })
        .await
    }

    /// Upgrades existing machine `machine` to `component`; needs an admin
    /// certificate. Returns the index at which the new code took over and
    /// its sha256; if the new code could not take the state over, the error
    /// is [`ApiError::UpgradeFailed`] and the old code keeps running.
    pub async fn upgrade(
        &self,
        machine: &str,
        component: Bytes,
        limits: DeployLimits,
    ) -> Result<(u64, String), ClientError> {
        self.code(Request::Upgrade {
            machine: machine.into(),
            component,
            limits,
        })
        .await
    }

    /// A deploy or an upgrade. Deploying the code and limits a machine runs
    /// changes nothing: safe to retry.
    async fn code(&self, req: Request) -> Result<(u64, String), ClientError> {
        match self.request(&req, true).await? {
            Response::Deployed { index, sha256 } => Ok((index, sha256)),
            other => Err(unexpected(&other)),
        }
    }

    /// Rehearses an upgrade of `machine` to `component` on one node against
    /// a copy of its current state, then runs `commands` and `queries` on the
    /// migrated copy; needs an admin certificate. Changes nothing.
    pub async fn dry_run_upgrade(
        &self,
        machine: &str,
        component: Bytes,
        commands: Vec<Payload>,
        queries: Vec<Payload>,
    ) -> Result<DryRunReport, ClientError> {
        let req = Request::DryRunUpgrade {
            machine: machine.into(),
            component,
            commands,
            queries,
        };
        // Not sent again after an attempt timed out: that rehearsal may be
        // running still, and the node runs one at a time.
        match self.request(&req, false).await? {
            Response::DryRun(report) => Ok(report),
            other => Err(unexpected(&other)),
        }
    }

    /// Moves `machine` to other limits (those left out stay); needs an admin
    /// certificate. Returns the index of the change.
    pub async fn set_limits(
        &self,
        machine: &str,
        limits: DeployLimits,
    ) -> Result<u64, ClientError> {
        let req = Request::SetLimits {
            machine: machine.into(),
            limits,
        };
        match self.request(&req, true).await? {
            Response::Deployed { index, .. } => Ok(index),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes `machine` and its state; needs an admin certificate. Returns
    /// the index of the removal. Not retried once it may have been carried
    /// out: the machine could have been deployed again since.
    pub async fn undeploy(&self, machine: &str) -> Result<u64, ClientError> {
        let req = Request::Undeploy {
            machine: machine.into(),
        };
        match self.request(&req, false).await? {
            Response::Undeployed { index } => Ok(index),
            other => Err(unexpected(&other)),
        }
    }

    /// The deployed machines as the node at `endpoint` runs them.
    pub async fn plugins_of(&self, endpoint: SocketAddr) -> Result<Vec<PluginReport>, ClientError> {
        match self.ask(endpoint, &Request::Plugins).await? {
            Response::Plugins(p) => Ok(p),
            other => Err(unexpected(&other)),
        }
    }

    /// The cluster's members as the leader sees them.
    pub async fn members(&self) -> Result<Members, ClientError> {
        members(self.request(&Request::Members, true).await?)
    }

    /// Adds node `id`, listening at `peer` (Raft) and `client`, as a
    /// learner; needs an admin certificate. Answers once its configuration
    /// entry is committed. Not retried once it may have been carried out
    /// (asking again would be refused: the node is a member already).
    pub async fn add_learner(
        &self,
        id: u64,
        peer: SocketAddr,
        client: SocketAddr,
    ) -> Result<Members, ClientError> {
        let req = Request::AddLearner {
            id,
            peer: peer.to_string(),
            client: client.to_string(),
        };
        members(self.request(&req, false).await?)
    }

    /// Makes learner `id` a voter once it has caught up with the leader;
    /// needs an admin certificate. Answers once the final configuration is
    /// committed, or refuses with the learner's lag.
    pub async fn promote(&self, id: u64) -> Result<Members, ClientError> {
        members(self.request(&Request::Promote { id }, false).await?)
    }

    /// Removes member `id`, which stops serving; needs an admin
    /// certificate. Removing the leader moves leadership first.
    pub async fn remove_member(&self, id: u64) -> Result<Members, ClientError> {
        members(self.request(&Request::RemoveMember { id }, false).await?)
    }

    /// Hands leadership to voter `to`; answers once it leads, with its
    /// term. Needs an admin certificate. Asking again is harmless, so it is
    /// retried like a read.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(u64, u64), ClientError> {
        match self
            .request(&Request::TransferLeadership { to }, true)
            .await?
        {
            Response::Transferred { leader, term } => Ok((leader, term)),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens a session for exactly-once commands.
    pub async fn session(&self) -> Result<Session<'_>, ClientError> {
        // A lost registration only leaves an idle session to expire.
        match self.request(&Request::RegisterSession, true).await? {
            Response::Session { id } => Ok(Session {
                client: self,
                id,
                next: 1,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// One round trip of the client protocol to `endpoint`, answered by its
    /// connection handler without involving the node.
    pub async fn ping(&self, endpoint: SocketAddr) -> Result<(), ClientError> {
        match self.attempt_fresh(endpoint, &Request::Ping).await {
            Ok(Response::Pong) => Ok(()),
            Ok(other) => Err(unexpected(&other)),
            Err(Failure::Fatal(e)) => Err(e),
            Err(Failure::Retry { why, .. } | Failure::Ambiguous(why)) => {
                Err(ClientError::Unavailable {
                    waited: self.cfg.attempt_timeout,
                    last: why,
                })
            }
        }
    }

    /// The status of the node at `endpoint` (not necessarily the leader).
    pub async fn status_of(&self, endpoint: SocketAddr) -> Result<NodeStatus, ClientError> {
        match self.ask(endpoint, &Request::Status).await? {
            Response::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Sends `req` to `endpoint` alone, once.
    async fn ask(&self, endpoint: SocketAddr, req: &Request) -> Result<Response, ClientError> {
        self.attempt_fresh(endpoint, req)
            .await
            .map_err(|f| match f {
                Failure::Retry { why, .. } | Failure::Ambiguous(why) => ClientError::Unavailable {
                    waited: self.cfg.attempt_timeout,
                    last: why,
                },
                Failure::Fatal(e) => e,
            })
    }

    /// Sends `req` to the leader, following redirects and retrying until the
    /// deadline. `idempotent`: an ambiguous failure may be retried too.
    pub async fn request(&self, req: &Request, idempotent: bool) -> Result<Response, ClientError> {
        let started = Instant::now();
        let mut rotation = 0usize;
        let mut pause = Duration::from_millis(20);
        // Redirects followed since the last pause; two nodes with stale
        // hints could otherwise bounce a request between them.
        let mut redirects = 0;
        // Whether an attempt may have been carried out.
        let mut ambiguous = false;
        loop {
            let target = *self.target.lock().expect("lock");
            let why = match self.attempt(target, req).await {
                Ok(resp) => return Ok(resp),
                // An earlier attempt may have been carried out: whatever
                // this one says, the caller cannot know.
                Err(Failure::Fatal(e)) if ambiguous => {
                    return Err(ClientError::Ambiguous(format!(
                        "an earlier attempt may have applied; the last one failed: {e}"
                    )));
                }
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Ambiguous(why)) if !idempotent => {
                    return Err(ClientError::Ambiguous(why));
                }
                Err(Failure::Ambiguous(why)) => {
                    ambiguous = true;
                    self.rotate(&mut rotation, target);
                    why
                }
                Err(Failure::Retry {
                    next: Some(leader),
                    why,
                }) if leader != target && redirects < 3 => {
                    // A redirect costs no wait: go straight to the leader.
                    redirects += 1;
                    *self.target.lock().expect("lock") = leader;
                    if started.elapsed() < self.cfg.deadline {
                        continue;
                    }
                    why
                }
                Err(Failure::Retry { next, why }) => {
                    match next {
                        Some(leader) => *self.target.lock().expect("lock") = leader,
                        None => self.rotate(&mut rotation, target),
                    }
                    why
                }
            };
            redirects = 0;
            if started.elapsed() + pause > self.cfg.deadline {
                if ambiguous {
                    return Err(ClientError::Ambiguous(format!(
                        "gave up after {:?}: {why}",
                        started.elapsed()
                    )));
                }
                return Err(ClientError::Unavailable {
                    waited: started.elapsed(),
                    last: why,
                });
            }
            tracing::debug!(%target, "retrying: {why}");
            // Back off between rounds so a cluster without a leader is not
            // flooded while it elects one.
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    /// Moves on to the next endpoint after `failed`.
    fn rotate(&self, rotation: &mut usize, failed: SocketAddr) {
        *rotation += 1;
        let eps = &self.cfg.endpoints;
        let mut next = eps[*rotation % eps.len()];
        if next == failed && eps.len() > 1 {
            *rotation += 1;
            next = eps[*rotation % eps.len()];
        }
        *self.target.lock().expect("lock") = next;
    }

    async fn connection(&self, addr: SocketAddr) -> Result<RpcClient, Failure> {
        {
            let mut conns = self.conns.lock().expect("lock");
            if let Some(c) = conns.get(&addr) {
                if c.lost().is_none() {
                    return Ok(c.clone());
                }
                conns.remove(&addr);
            }
        }
        // Not under the lock: a handshake with a dead node must not hold up
        // requests to the live ones. Two tasks may both connect; the second
        // connection simply replaces the first.
        let connect = RpcClient::connect(addr, &self.cfg.tls);
        let retry = |why: String| Failure::Retry { next: None, why };
        let c = match tokio::time::timeout(self.cfg.attempt_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(RpcError::Refused { reason })) => {
                return Err(Failure::Fatal(ClientError::Refused(reason)));
            }
            Ok(Err(e)) => return Err(retry(format!("{addr}: {e}"))),
            Err(_) => {
                let after = self.cfg.attempt_timeout;
                return Err(retry(format!("{addr}: no handshake within {after:?}")));
            }
        };
        self.conns.lock().expect("lock").insert(addr, c.clone());
        Ok(c)
    }

    /// [`Self::attempt`] for a read-only request to one node: a failure on
    /// a connection opened earlier (the node may have restarted since, and
    /// a dead connection only shows as silence) gets one more attempt on a
    /// new connection.
    async fn attempt_fresh(&self, addr: SocketAddr, req: &Request) -> Result<Response, Failure> {
        debug_assert!(!req.is_write());
        let cached = self.conns.lock().expect("lock").contains_key(&addr);
        match self.attempt(addr, req).await {
            // A failed attempt dropped the connection: this one is new.
            Err(Failure::Retry { .. }) if cached => self.attempt(addr, req).await,
            other => other,
        }
    }

    async fn attempt(&self, addr: SocketAddr, req: &Request) -> Result<Response, Failure> {
        let conn = self.connection(addr).await?;
        let reply: Reply = match conn.call(req, self.cfg.attempt_timeout).await {
            Ok(reply) => reply,
            Err(RpcError::Refused { reason }) => {
                return Err(Failure::Fatal(ClientError::Refused(reason)));
            }
            Err(
                e @ (RpcError::Timeout { .. }
                | RpcError::ConnectionLost { .. }
                | RpcError::Decode(_)),
            ) => {
                // The request may have been sent and carried out.
                self.conns.lock().expect("lock").remove(&addr);
                return Err(if req.is_write() {
                    Failure::Ambiguous(format!("{addr}: {e}"))
                } else {
                    Failure::Retry {
                        next: None,
                        why: format!("{addr}: {e}"),
                    }
                });
            }
            // Our own request cannot be sent: trying again will not help.
            Err(e @ (RpcError::Encode(_) | RpcError::FrameTooLarge { .. } | RpcError::Tls(_))) => {
                return Err(Failure::Fatal(ClientError::Protocol(e.to_string())));
            }
            Err(e) => {
                self.conns.lock().expect("lock").remove(&addr);
                return Err(Failure::Retry {
                    next: None,
                    why: format!("{addr}: {e}"),
                });
            }
        };
        match reply {
            Ok(resp) => Ok(resp),
            Err(ApiError::NotLeader { leader, addr: hint }) => Err(Failure::Retry {
                next: hint.and_then(|a| a.parse().ok()),
                why: format!("{addr} is not the leader (leader: {leader:?})"),
            }),
            Err(e @ ApiError::Outcome) | Err(e @ ApiError::Timeout) if req.is_write() => {
                Err(Failure::Ambiguous(format!("{addr}: {e}")))
            }
            // A read that gave up changed nothing: try again.
            Err(e @ ApiError::Outcome) | Err(e @ ApiError::Timeout) => Err(Failure::Retry {
                next: None,
                why: format!("{addr}: {e}"),
            }),
            Err(e @ ApiError::Unavailable(_)) => Err(Failure::Retry {
                next: None,
                why: format!("{addr}: {e}"),
            }),
            Err(e) => Err(Failure::Fatal(ClientError::Api(e))),
        }
    }
}

/// A client session: commands numbered so that retries apply once.
///
/// Commands of one session go one at a time (`&mut self`); open several
/// sessions for concurrency.
pub struct Session<'a> {
    client: &'a Client,
    id: u64,
    next: u64,
}

impl Session<'_> {
    /// The session's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Applies `command` exactly once, retrying through leader changes and
    /// lost connections until the client's deadline.
    pub async fn apply(
        &mut self,
        machine: &str,
        command: Payload,
    ) -> Result<(u64, Payload), ClientError> {
        let serial = self.next;
        let req = Request::Apply {
            machine: machine.into(),
            command,
            session: Some(SessionSeq {
                id: self.id,
                serial,
                // Commands go one at a time: every earlier one was answered.
                acked: serial,
            }),
        };
        let result = self.client.request(&req, true).await;
        // Whatever the outcome, the serial is spent: reusing it for another
        // command would return this one's cached answer.
        self.next += 1;
        applied(result?)
    }
}

fn members(resp: Response) -> Result<Members, ClientError> {
    match resp {
        Response::Members(m) => Ok(m),
        other => Err(unexpected(&other)),
    }
}

fn applied(resp: Response) -> Result<(u64, Payload), ClientError> {
    match resp {
        Response::Applied { index, output } => Ok((index, output)),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(resp: &Response) -> ClientError {
    ClientError::Protocol(format!("{resp:?}"))
}
