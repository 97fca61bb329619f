//! The event loop that owns the core, and the handle clients talk to.

mod code;
mod members;
mod snapshots;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use kythira_api::{
    ApiError, Consistency, DeployLimits, NodeStatus, PROTOCOL_VERSION, Payload, Reply, Request,
    Response,
};
use kythira_raft::{
    Config, Driver, EntryKind, Message, MessageBody, NodeId, ProposeError, Raft, Role,
};
use kythira_storage::{FjallStore, SnapshotStore};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use crate::NodeError;
use crate::access;
use crate::applier::{self, Applier, Shared, Work};
use crate::disk::{self, Disk};
use crate::edge::Translate;
use crate::engines::Engines;
use crate::entry::{self, Envelope, Op};
use crate::health::{HealthInput, HealthReport};
use crate::machines::{self, Machines};
use crate::metrics::{Metrics, ProposalFailure, role_name};
use crate::observer::Observer;
use crate::shutdown::{Leaving, Next};
use crate::snapshots::Policy;

/// Where a node's messages to its peers go. Sending never blocks: a full or
/// broken link drops the message, which Raft tolerates.
pub trait Network: Send + Sync + 'static {
    /// Sends `m` to `m.to`.
    fn send(&self, m: Message);

    /// The peers to keep connections with, as the membership and the
    /// replicated addresses say; called whenever they change. Peers not in
    /// `peers` are to be forgotten (and refused). A network without
    /// addresses (in-process tests) ignores it.
    fn set_peers(&self, _peers: &BTreeMap<NodeId, SocketAddr>) {}

    /// Streams the latest snapshot to `m.to` (`m` is its `Snapshot`
    /// message, delivered to the follower's core once the data is durable
    /// there) and calls `done` with the outcome. A network that carries no
    /// snapshots fails at once; the core then tries again later.
    fn send_snapshot(&self, m: Message, done: SnapshotDone) {
        let _ = m;
        done(Err("this network carries no snapshots".into()));
    }
}

/// Called once with the outcome of a snapshot transfer.
pub type SnapshotDone = Box<dyn FnOnce(Result<SnapshotSent, String>) + Send>;

/// A snapshot transfer that completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSent {
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Bytes the follower already held from a broken transfer of the same
    /// snapshot (from this node or another): where sending started.
    pub resumed_from: u64,
}

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id.
    pub id: NodeId,
    /// The voters the cluster was founded with, this node's included; empty
    /// for a node that joins a running cluster (it learns the membership
    /// from the log). Never changed afterwards: configuration entries in the
    /// log say who the members are now.
    pub voters: Vec<NodeId>,
    /// Client addresses from the configuration file, named in `NotLeader`
    /// answers when the log has none for that node.
    pub client_addrs: BTreeMap<NodeId, String>,
    /// Peer addresses from the configuration file, for the nodes the log
    /// has no address for.
    pub peer_addrs: BTreeMap<NodeId, SocketAddr>,
    /// Serve lease reads from the leader lease (needs every node to agree).
    pub lease_reads: bool,
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// One tick of the core's logical clock.
    pub tick: Duration,
    /// Election timeout, in ticks (randomized up to twice this).
    pub election_ticks: u32,
    /// Heartbeat interval, in ticks.
    pub heartbeat_ticks: u32,
    /// How long a client request may wait for its commit or read.
    pub request_timeout: Duration,
    /// Log time after which an idle client session expires.
    pub session_ttl: Duration,
    /// Largest component a deploy may carry.
    pub max_component_bytes: usize,
    /// Largest log entry this node proposes. An entry must fit, with its
    /// message, in one peer frame, or no follower could ever receive it and
    /// the log would stall behind it.
    pub max_entry_bytes: usize,
    /// Limits of plugins deployed without their own. The node that accepts
    /// a deploy writes the resolved limits into the entry, so replicas with
    /// other defaults still agree.
    pub default_limits: DeployLimits,
    /// Snapshot after every entry whose index is a multiple of this (0: never
    /// by count).
    pub snapshot_entries: u64,
    /// Snapshot once the entries applied since the last snapshot point reach
    /// this many bytes (0: never by size).
    pub snapshot_bytes: u64,
    /// Fingerprint of the cluster (its CA), recorded in the data directory so
    /// that a node never starts on another cluster's log.
    pub cluster_id: String,
    /// Seed of the core's randomness (election timeouts).
    pub seed: u64,
}

/// Who is calling, from the certificate of its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// May deploy code as well as read and write.
    Admin,
    /// May read and write.
    Client,
}

/// Requests from the handle to the event loop.
enum Command {
    Propose {
        op: Op,
        reply: oneshot::Sender<Reply>,
    },
    Read {
        machine: String,
        query: Bytes,
        /// From the leader lease rather than a round of heartbeats.
        lease: bool,
        reply: oneshot::Sender<Result<Bytes, ApiError>>,
    },
    Status {
        reply: oneshot::Sender<RaftStatus>,
    },
    /// Stop taking requests, hand leadership over, flush, then stop the
    /// loop; answered with the voter leadership was handed to, if any.
    Shutdown {
        reply: oneshot::Sender<Option<NodeId>>,
    },
    Members(members::MemberCommand),
}

/// What the event loop last saw of the core's leadership, published so that
/// callers can wait for a change instead of polling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// This node's role.
    pub role: Role,
    /// Its term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<NodeId>,
}

struct RaftStatus {
    role: Role,
    term: u64,
    leader: Option<NodeId>,
    last_index: u64,
    commit: u64,
    apply_stalled: Duration,
    snapshot_index: u64,
    first_index: u64,
}

/// A running node: its handle, and the task of its event loop.
pub struct Node {
    /// Where requests go.
    pub handle: NodeHandle,
    /// Ends with the reason the node stopped.
    pub task: JoinHandle<Result<(), NodeError>>,
}

/// Cheap to clone; every client connection holds one.
#[derive(Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    leadership: watch::Receiver<Leadership>,
    /// Bounds the JSON translations running at once: each takes an
    /// instance from the pool the machines also draw on.
    pub(crate) translations: Arc<tokio::sync::Semaphore>,
    applier: Applier,
    shared: Arc<Shared>,
    cfg: Arc<NodeConfig>,
    /// The membership or leadership change this node is carrying out, and
    /// whether it was removed.
    changes: Arc<members::Operations>,
    /// The plugin runtimes, for validating components before they are proposed.
    engines: Engines,
    /// One dry-run upgrade at a time.
    dry_runs: Arc<tokio::sync::Semaphore>,
    /// One component validated (compiled and started once) at a time.
    trials: Arc<tokio::sync::Semaphore>,
}

/// JSON translations at once, no more than the instance slots the runtime
/// reserves for them.
const TRANSLATIONS: usize = 4;

/// Most client requests queued for the event loop before new ones are refused.
const COMMAND_QUEUE: usize = 4096;

impl Node {
    /// Recovers the log under `cfg.data_dir` and starts the node: messages
    /// from peers arrive on `inbound`, messages to them leave through `net`.
    pub fn start(
        cfg: NodeConfig,
        net: impl Network,
        inbound: mpsc::Receiver<Message>,
    ) -> Result<Node, NodeError> {
        let claim = disk::claim(&cfg.data_dir, cfg.id, &cfg.cluster_id)?;
        let snapshots = SnapshotStore::open(snapshot_dir(&cfg.data_dir))?;
        Self::start_claimed(cfg, claim, snapshots, net, inbound)
    }

    /// [`Node::start`] with the snapshot store of `cfg.data_dir` opened
    /// already, to be shared with the network, which receives snapshots
    /// into it.
    pub fn start_with_snapshots(
        cfg: NodeConfig,
        snapshots: SnapshotStore,
        net: impl Network,
        inbound: mpsc::Receiver<Message>,
    ) -> Result<Node, NodeError> {
        let claim = disk::claim(&cfg.data_dir, cfg.id, &cfg.cluster_id)?;
        Self::start_claimed(cfg, claim, snapshots, net, inbound)
    }

    /// [`Node::start_with_snapshots`] on a data directory this process
    /// claimed already ([`disk::claim`]); the node holds the claim until its
    /// event loop ends.
    pub fn start_claimed(
        cfg: NodeConfig,
        claim: disk::Claim,
        snapshots: SnapshotStore,
        net: impl Network,
        inbound: mpsc::Receiver<Message>,
    ) -> Result<Node, NodeError> {
        validate(&cfg)?;
        let store = Arc::new(FjallStore::open(disk::log_dir(&cfg.data_dir))?);
        let recovered = disk::recover(&store, &snapshots)?;
        let mut core = Config::new(cfg.id, cfg.voters.iter().copied());
        core.election_ticks = cfg.election_ticks;
        core.heartbeat_ticks = cfg.heartbeat_ticks;
        core.seed = cfg.seed;
        core.lease_reads = cfg.lease_reads;
        // Tick rates within ±5 % of each other, plus a tick of phase: the
        // core's documented bound.
        core.lease_drift_ticks = cfg.election_ticks / 10 + 2;
        let raft = Raft::new(core, recovered.persisted)
            .map_err(|e| NodeError::Corrupt(format!("the stored state does not restore: {e}")))?;
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let disk = Disk::new(store, done_tx);
        let shared = Arc::new(Shared::default());
        let engines = Engines::new(Some(cfg.data_dir.join("compiled")));
        let machines = match recovered.image {
            Some(image) => {
                let index = image.applied;
                Machines::from_image(image, engines.clone(), shared.metrics.clone()).map_err(
                    |e| {
                        NodeError::Corrupt(format!(
                            "the snapshot at index {index} does not restore: {e}"
                        ))
                    },
                )?
            }
            None => Machines::new(engines.clone()).with_metrics(shared.metrics.clone()),
        };
        let (images_tx, images) = mpsc::unbounded_channel();
        let (applier, applier_gone) = Applier::start(
            machines,
            shared.clone(),
            applier::Snapshots {
                policy: Policy::new(cfg.snapshot_entries, cfg.snapshot_bytes),
                images: images_tx,
                store: snapshots.clone(),
            },
        )?;
        let (snapshot_events_tx, snapshot_events) = mpsc::unbounded_channel();
        let applier_handle = applier.clone();
        let (commands, command_rx) = mpsc::channel(COMMAND_QUEUE);
        let cfg = Arc::new(cfg);
        let ops = Arc::new(members::Operations::default());
        let (leadership_tx, leadership) = watch::channel(Leadership {
            role: raft.role(),
            term: raft.term(),
            leader: raft.leader(),
        });
        let obs = Observer::new(shared.metrics.clone(), &raft);
        let event_loop = EventLoop {
            obs,
            leaving: None,
            election_timeout: cfg.tick * 2 * cfg.election_ticks,
            request_timeout: cfg.request_timeout,
            shared: shared.clone(),
            leadership: leadership_tx,
            driver: Driver::new(raft),
            net,
            disk,
            _stop_applier: applier::StopOnDrop(applier.clone()),
            applier,
            last_timestamp_ms: recovered.last_timestamp_ms,
            reads: HashMap::new(),
            // Per boot, so that a late answer to a read forwarded before a
            // restart cannot be taken for a new read's.
            next_read: {
                use std::hash::{BuildHasher, Hasher};
                std::collections::hash_map::RandomState::new()
                    .build_hasher()
                    .finish()
            },
            leading_since: None,
            session_ttl_ms: cfg.session_ttl.as_millis() as u64,
            max_entry_bytes: cfg.max_entry_bytes,
            members: members::MemberState::new(&cfg, shared.addresses.subscribe(), ops.clone()),
            snaps: snapshots::SnapshotState::new(
                snapshots,
                snapshot_events_tx,
                cfg.snapshot_entries,
            ),
            heard: HashMap::new(),
            _claim: claim,
            ticks: crate::ticks::TickWindow::new(cfg.election_ticks, cfg.tick),
            engines: engines.clone(),
        };
        let task = tokio::spawn(event_loop.run(
            cfg.tick,
            Inputs {
                inbound,
                commands: command_rx,
                done: done_rx,
                applier_gone,
                images,
                snapshot_events,
            },
        ));
        Ok(Node {
            handle: NodeHandle {
                commands,
                leadership,
                translations: Arc::new(tokio::sync::Semaphore::new(TRANSLATIONS)),
                applier: applier_handle,
                shared,
                cfg,
                changes: ops,
                engines: engines.clone(),
                dry_runs: Arc::new(tokio::sync::Semaphore::new(1)),
                trials: Arc::new(tokio::sync::Semaphore::new(1)),
            },
            task,
        })
    }
}

fn validate(cfg: &NodeConfig) -> Result<(), NodeError> {
    let bad = |why: String| Err(NodeError::Config(why));
    if cfg.id == 0 {
        return bad("node id 0 is reserved".into());
    }
    if !cfg.voters.is_empty() && !cfg.voters.contains(&cfg.id) {
        return bad(format!(
            "node {} is not among the voters {:?} (a node that joins a cluster starts with none)",
            cfg.id, cfg.voters
        ));
    }
    if cfg.tick.is_zero() || cfg.heartbeat_ticks == 0 {
        return bad("tick and heartbeat must be positive".into());
    }
    if cfg.election_ticks <= cfg.heartbeat_ticks {
        return bad(format!(
            "the election timeout ({} ticks) must exceed the heartbeat interval ({} ticks)",
            cfg.election_ticks, cfg.heartbeat_ticks
        ));
    }
    Ok(())
}

struct EventLoop<N> {
    driver: Driver,
    leadership: watch::Sender<Leadership>,
    net: N,
    disk: Disk,
    applier: Applier,
    /// Ends the applier thread when the loop ends.
    _stop_applier: applier::StopOnDrop,
    /// Largest leader timestamp in this node's log: new entries get at least it.
    last_timestamp_ms: u64,
    /// ReadIndex requests in flight, by context.
    reads: HashMap<u64, PendingRead>,
    next_read: u64,
    /// When this node last became leader; `None` while it does not lead.
    leading_since: Option<Instant>,
    session_ttl_ms: u64,
    max_entry_bytes: usize,
    /// What the applier publishes; its applied index gives backpressure.
    shared: Arc<Shared>,
    /// Metrics and logged transitions.
    obs: Observer,
    /// Set once a stop is asked for, with whom to tell when it is done.
    leaving: Option<(Leaving, oneshot::Sender<Option<NodeId>>)>,
    /// One election timeout at most: how long a handover may take.
    election_timeout: Duration,
    request_timeout: Duration,
    /// Membership changes and transfers under way, the peer set.
    members: members::MemberState,
    /// Snapshots being written, sent and compacted behind.
    snaps: snapshots::SnapshotState,
    /// The data directory, held while the loop runs.
    _claim: disk::Claim,
    /// When each peer was last heard from: membership changes need a
    /// majority of every voter set they involve to be alive.
    heard: HashMap<NodeId, std::time::Instant>,
    /// When the last ticks were handled: lease reads need them on time.
    ticks: crate::ticks::TickWindow,
    /// Compiles deployed components as their entries reach the log.
    engines: Engines,
}

/// What the event loop listens to.
struct Inputs {
    inbound: mpsc::Receiver<Message>,
    commands: mpsc::Receiver<Command>,
    done: mpsc::UnboundedReceiver<Result<(), kythira_storage::StorageError>>,
    applier_gone: oneshot::Receiver<()>,
    images: mpsc::UnboundedReceiver<crate::image::Image>,
    snapshot_events: mpsc::UnboundedReceiver<snapshots::SnapshotEvent>,
}

/// Where a node keeps its snapshots, under its data directory.
pub fn snapshot_dir(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("snapshots")
}

/// Most committed entries the applier may be behind before new proposals
/// are refused: a slow plugin must not let the queue to the applier grow
/// without bound.
const MAX_APPLY_LAG: u64 = 50_000;

/// A linearizable query waiting for its ReadIndex round: machine, query, reply.
type PendingRead = (String, Bytes, oneshot::Sender<Result<Bytes, ApiError>>);

/// Most inputs handled between two looks at the core's output, so that a
/// burst of messages or requests turns into one batch.
const BURST: usize = 256;

impl<N: Network> EventLoop<N> {
    /// Starts compiling the component a deploy or upgrade entry carries, as
    /// soon as the entry reaches this node's log, so that applying it finds
    /// the compiled artifact. Whether the entry is valid is decided at apply.
    fn compile_ahead(&self, e: &kythira_raft::Entry) {
        let Ok(env) = Envelope::decode(e.index, &e.data) else {
            return;
        };
        if let Op::Deploy {
            machine,
            component,
            limits,
            ..
        }
        | Op::Upgrade {
            machine,
            component,
            limits,
            ..
        } = env.op
        {
            // The limits it will apply under, as far as this node knows.
            let base = self
                .shared
                .plugins
                .lock()
                .expect("lock")
                .get(&machine)
                .map_or_else(Default::default, |info| *info.runtime.limits());
            self.engines
                .compile_ahead(machines::resolve_against(limits, base), component);
        }
    }

    async fn run(mut self, tick: Duration, inputs: Inputs) -> Result<(), NodeError> {
        let Inputs {
            mut inbound,
            mut commands,
            mut done,
            mut applier_gone,
            mut images,
            mut snapshot_events,
        } = inputs;
        let mut ticker = tokio::time::interval_at(Instant::now() + tick, tick);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        self.drain()?;
        if let Some(index) = self.members.removed_at {
            return self.serve_removed(index, commands).await;
        }
        let mut network_open = true;
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    self.ticked();
                    self.driver.tick();
                    self.obs.tick(self.driver.raft(), self.shared.applied.load(Ordering::Acquire));
                    self.members_tick();
                    self.compact_if_due()?;
                }
                Some(image) = images.recv() => self.image_ready(image),
                Some(event) = snapshot_events.recv() => self.snapshot_event(event)?,
                Ok(()) = self.members.addresses.changed() => self.addresses_changed(),
                _ = &mut applier_gone => {
                    return Err(NodeError::Stopped("the applier stopped (see its error above)"));
                }
                m = inbound.recv(), if network_open => {
                    // A cluster of one has no peers, and so no messages.
                    let Some(m) = m else {
                        network_open = false;
                        continue;
                    };
                    self.step(m);
                    for _ in 0..BURST {
                        match inbound.try_recv() {
                            Ok(m) => self.step(m),
                            Err(_) => break,
                        }
                    }
                }
                c = commands.recv() => {
                    // Every handle dropped: the node is shutting down.
                    let Some(c) = c else { return Ok(()) };
                    self.command(c)?;
                    for _ in 0..BURST {
                        match commands.try_recv() {
                            Ok(c) => self.command(c)?,
                            Err(_) => break,
                        }
                    }
                }
                d = done.recv() => {
                    match d {
                        Some(Ok(())) => {
                            self.obs.write_done();
                            for m in self.driver.persisted() {
                                self.send(m);
                            }
                        }
                        Some(Err(e)) => return Err(e.into()),
                        None => return Err(NodeError::Stopped("the log writer stopped")),
                    }
                }
            }
            self.drain()?;
            if let Some(index) = self.members.removed_at {
                return self.serve_removed(index, commands).await;
            }
            if self.leave()? {
                // Requests queued behind the stop never reached the core:
                // say so, rather than drop them as "may have applied".
                commands.close();
                while let Ok(c) = commands.try_recv() {
                    self.refuse_stopping(c);
                }
                return Ok(());
            }
        }
    }

    /// Carries a stop forward; true once the loop may end.
    fn leave(&mut self) -> Result<bool, NodeError> {
        let Some((leaving, _)) = &mut self.leaving else {
            return Ok(false);
        };
        let applied = self.shared.applied.load(Ordering::Acquire);
        let now = std::time::Instant::now();
        match leaving.next(self.driver.raft(), applied, self.driver.is_writing(), now) {
            Next::Wait => Ok(false),
            Next::Transfer(to) => {
                leaving.transfer = Some((to, now));
                match self.driver.transfer_leadership(to) {
                    Ok(()) => tracing::info!(to, "handing leadership over before stopping"),
                    Err(e) => tracing::warn!(to, "cannot hand leadership over: {e}"),
                }
                self.drain()?;
                Ok(false)
            }
            Next::Stop => {
                let (leaving, reply) = self.leaving.take().expect("checked above");
                let handed_to = leaving
                    .transfer
                    .map(|(to, _)| to)
                    .filter(|_| self.driver.raft().role() != Role::Leader);
                let _ = reply.send(handed_to);
                Ok(true)
            }
        }
    }

    /// While stopping: refuses what would reach the core (before it does,
    /// so a retry elsewhere is safe); hands back what may still be served.
    fn refuse_stopping(&mut self, c: Command) -> Option<Command> {
        match c {
            Command::Propose { reply, .. } => drop(reply.send(Err(stopped()))),
            Command::Read { reply, .. } => drop(reply.send(Err(stopped()))),
            Command::Members(m) => m.refuse(stopped()),
            Command::Status { .. } | Command::Shutdown { .. } => return Some(c),
        }
        None
    }

    /// A tick is handled; see `crate::ticks` for why its time matters.
    fn ticked(&mut self) {
        self.ticks.ticked(std::time::Instant::now());
    }

    /// Whether a lease read may be served from the lease now.
    fn lease_trusted(&self) -> bool {
        self.ticks.on_time(std::time::Instant::now())
    }

    /// Whether peer `id` answered this leader within an election timeout
    /// and holds the log up to near the commit index.
    fn heard_recently(&self, id: NodeId) -> bool {
        let raft = self.driver.raft();
        let keeps_up = raft
            .progress(id)
            .is_some_and(|p| p.matched + members::CAUGHT_UP_LAG >= raft.log().committed());
        id == raft.id() || (keeps_up && self.answered_recently(id))
    }

    /// Whether peer `id` answered this leader within an election timeout.
    fn answered_recently(&self, id: NodeId) -> bool {
        self.heard
            .get(&id)
            .is_some_and(|t| t.elapsed() <= self.election_timeout)
    }

    fn step(&mut self, m: Message) {
        let from = m.from;
        // Only answers to this leader's appends and heartbeats show that a
        // voter hears the leader and keeps up (a cut-off voter still sends
        // pre-votes; etcd's `RecentActive` is the same).
        if matches!(
            m.body,
            MessageBody::AppendResponse(_) | MessageBody::HeartbeatResponse { .. }
        ) && m.term == self.driver.raft().term()
        {
            self.heard.insert(from, std::time::Instant::now());
        }
        if let Err(e) = self.driver.step(m) {
            tracing::debug!(from, "dropped a message: {e}");
        }
    }

    fn command(&mut self, c: Command) -> Result<(), NodeError> {
        let c = if self.leaving.is_some() {
            match self.refuse_stopping(c) {
                Some(c) => c,
                None => return Ok(()),
            }
        } else {
            c
        };
        match c {
            Command::Propose { op, reply } => {
                // Leader time never goes back along the log, even if this
                // node's clock is behind the previous leader's.
                let ts = now_ms()
                    .max(self.last_timestamp_ms)
                    .max(self.shared.log_time_ms.load(Ordering::Acquire));
                let op = match op {
                    Op::RegisterSession { .. } => Op::RegisterSession {
                        ttl_ms: self.session_ttl_ms,
                    },
                    op => op,
                };
                let committed = self.driver.raft().log().committed();
                let applied = self.shared.applied.load(Ordering::Acquire);
                // Only a leader refuses for lag: a follower answers NotLeader.
                let leads = self.driver.raft().role() == Role::Leader;
                if leads && committed.saturating_sub(applied) > MAX_APPLY_LAG {
                    self.metrics()
                        .proposal_failed(ProposalFailure::Backpressure);
                    let _ = reply.send(Err(ApiError::Unavailable(format!(
                        "the state machines are {} entries behind the log; retry shortly",
                        committed - applied
                    ))));
                    return Ok(());
                }
                let data = Envelope::encode(ts, &op);
                if data.len() > self.max_entry_bytes {
                    self.metrics().proposal_failed(ProposalFailure::TooLarge);
                    let _ = reply.send(Err(ApiError::BadRequest(format!(
                        "the entry would be {} bytes, more than the {} a log entry may hold",
                        data.len(),
                        self.max_entry_bytes
                    ))));
                    return Ok(());
                }
                match self.driver.propose(data) {
                    Ok(p) => {
                        self.metrics().proposals.inc();
                        self.last_timestamp_ms = ts;
                        self.applier.send(Work::Wait {
                            index: p.index,
                            term: p.term,
                            reply,
                        })?;
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        self.metrics().proposal_failed(ProposalFailure::NotLeader);
                        let _ = reply.send(Err(not_leader(leader)));
                    }
                    // A leadership transfer under way: the client retries.
                    Err(e @ ProposeError::Transferring { .. }) => {
                        self.metrics()
                            .proposal_failed(ProposalFailure::Transferring);
                        let _ = reply.send(Err(ApiError::Unavailable(e.to_string())));
                    }
                }
            }
            Command::Read {
                machine,
                query,
                lease,
                reply,
            } => {
                let ctx = self.next_read;
                self.next_read = self.next_read.wrapping_add(1);
                let raft = self.driver.raft();
                let started = match (lease, raft.role()) {
                    (false, _) => self.driver.read_index(ctx),
                    (true, Role::Leader) if self.lease_trusted() => self.driver.lease_read(ctx),
                    // Ticks came late: the lease cannot be trusted, but a
                    // round of heartbeats can.
                    (true, Role::Leader) => self.driver.read_index(ctx),
                    // A follower's core would forward it as a ReadIndex:
                    // lease reads are the leader's, send the client there.
                    (true, _) => Err(ProposeError::NotLeader {
                        leader: raft.leader(),
                    }),
                };
                match started {
                    Ok(()) => {
                        self.reads.insert(ctx, (machine, query, reply));
                    }
                    Err(ProposeError::NotLeader { leader }) => {
                        let _ = reply.send(Err(not_leader(leader)));
                    }
                    // A leadership transfer under way: the client retries.
                    Err(e @ ProposeError::Transferring { .. }) => {
                        let _ = reply.send(Err(ApiError::Unavailable(e.to_string())));
                    }
                }
            }
            Command::Shutdown { reply } => {
                if self.leaving.is_none() {
                    tracing::info!("stopping: no new requests; handing over and flushing");
                    self.leaving = Some((
                        Leaving {
                            since: std::time::Instant::now(),
                            transfer: None,
                            drain_for: self.request_timeout,
                            transfer_for: self.election_timeout,
                        },
                        reply,
                    ));
                }
            }
            Command::Status { reply } => {
                let raft = self.driver.raft();
                let _ = reply.send(RaftStatus {
                    role: raft.role(),
                    term: raft.term(),
                    leader: raft.leader(),
                    last_index: raft.log().last_index(),
                    commit: raft.log().committed(),
                    apply_stalled: self.obs.apply_stalled(),
                    snapshot_index: self.snaps.store.latest().map_or(0, |i| i.meta.index),
                    first_index: raft.log().snapshot_index() + 1,
                });
            }
            Command::Members(c) => self.member_command(c),
        }
        Ok(())
    }

    /// Carries out every batch the core has.
    fn drain(&mut self) -> Result<(), NodeError> {
        while let Some(b) = self.driver.poll() {
            for m in b.send {
                self.send(m);
            }
            if !b.apply.is_empty() {
                self.applier.send(Work::Apply(b.apply))?;
            }
            for rs in b.read_states {
                if let Some((machine, query, reply)) = self.reads.remove(&rs.ctx) {
                    self.applier.send(Work::Read {
                        index: rs.index,
                        machine,
                        query,
                        reply,
                    })?;
                }
            }
            for ctx in b.dropped_reads {
                if let Some((_, _, reply)) = self.reads.remove(&ctx) {
                    let _ = reply.send(Err(not_leader(self.driver.raft().leader())));
                }
            }
            if let Some(w) = b.write {
                for e in w.entries.iter().filter(|e| e.kind == EntryKind::Normal) {
                    if let Ok(ts) = entry::timestamp(e.index, &e.data) {
                        self.last_timestamp_ms = self.last_timestamp_ms.max(ts);
                    }
                    if entry::carries_code(&e.data) {
                        self.compile_ahead(e);
                    }
                }
                if let Some(meta) = &w.snapshot {
                    // The state machines restart from it before any entry
                    // after it reaches the applier. Opened here, while it
                    // is surely the store's latest: the network published
                    // it just before the core saw its message.
                    tracing::info!(
                        index = meta.index,
                        term = meta.term,
                        "installing a snapshot"
                    );
                    let reader = self.snaps.open_installed(meta)?;
                    self.applier.send(Work::Install {
                        index: meta.index,
                        reader,
                    })?;
                }
                // The writer thread makes writes durable in the order
                // handed out; the driver bounds how many are outstanding.
                self.obs.write_started(&w);
                self.disk.write(w)?;
            }
        }
        let leader = self.driver.raft().role() == Role::Leader;
        if self.leading_since.is_some() && !leader {
            // Whatever was proposed may still commit under the next leader,
            // or be overwritten: the callers cannot be told which.
            self.applier.send(Work::Abandon)?;
            let hint = self.driver.raft().leader();
            for (_, (_, _, reply)) in self.reads.drain() {
                let _ = reply.send(Err(not_leader(hint)));
            }
        }
        self.leading_since = match (leader, self.leading_since) {
            (false, _) => None,
            (true, since) => Some(since.unwrap_or_else(Instant::now)),
        };
        let raft = self.driver.raft();
        let now = Leadership {
            role: raft.role(),
            term: raft.term(),
            leader: raft.leader(),
        };
        self.leadership.send_if_modified(|seen| {
            let changed = *seen != now;
            *seen = now;
            changed
        });
        self.obs.after_pass(self.driver.raft());
        self.advance_members();
        Ok(())
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }
}

fn not_leader(leader: Option<NodeId>) -> ApiError {
    ApiError::NotLeader { leader, addr: None }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NodeHandle {
    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Stops the node cleanly: no new requests, what a leader accepted is
    /// answered, leadership goes to the voter furthest along, outstanding
    /// log writes finish; then the event loop ends. Returns the voter
    /// leadership was handed to, if it was.
    pub async fn shutdown(&self) -> Result<Option<NodeId>, ApiError> {
        let (reply, rx) = oneshot::channel();
        // Past a full queue: a stop must not be refused as an overload.
        self.commands
            .send(Command::Shutdown { reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// This node's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Whether this node is fit to serve, and why not (see [`crate::health`]).
    /// A node whose event loop does not answer within the request timeout
    /// is not.
    pub async fn health(&self) -> Result<HealthReport, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply })?;
        let raft = match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(answer) => answer.map_err(|_| stopped())?,
            Err(_) => {
                return Err(ApiError::Unavailable(format!(
                    "the event loop did not answer within {:?}",
                    self.cfg.request_timeout
                )));
            }
        };
        let applied = self.shared.applied.load(Ordering::Acquire);
        let problem = match self.removed_at() {
            // It refuses every request: no load balancer should send any.
            Some(index) => Some(format!(
                "this node was removed from the cluster at log index {index}"
            )),
            None => crate::health::problem(&HealthInput {
                leader: raft.leader,
                commit: raft.commit,
                applied,
                apply_stalled: raft.apply_stalled,
                max_apply_stall: self.cfg.request_timeout,
            }),
        };
        Ok(HealthReport {
            id: self.cfg.id,
            role: role_name(raft.role),
            term: raft.term,
            leader: raft.leader,
            commit: raft.commit,
            applied,
            problem,
        })
    }

    /// Leadership as this node sees it; `changed()` wakes on every change.
    pub fn leadership(&self) -> watch::Receiver<Leadership> {
        self.leadership.clone()
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    /// Answers one client request.
    pub async fn call(&self, caller: Caller, request: Request) -> Reply {
        access::authorize(caller, &request)?;
        if let Some(index) = self.removed_at()
            && !matches!(request, Request::Status)
        {
            return Err(members::removed_error(self.cfg.id, index));
        }
        // Followers serve linearizable and stale reads themselves, so read
        // load spreads over every node.
        if request.needs_leader() {
            // Answer at once rather than translate JSON a follower may not
            // even have the plugin for; the event loop checks again.
            let seen = *self.leadership.borrow();
            if seen.role != Role::Leader {
                if request.is_write() {
                    self.metrics().proposal_failed(ProposalFailure::NotLeader);
                }
                return Err(self.with_leader_addr(not_leader(seen.leader)));
            }
        }
        let reply = match request {
            Request::Apply {
                machine,
                command,
                session,
            } => {
                if let Some(seq) = session
                    && (seq.acked > seq.serial || seq.serial == 0)
                {
                    return Err(ApiError::BadRequest(format!(
                        "session serial {} with acked {}: serials start at 1 and acked \
                         (every serial below it answered) cannot pass the serial",
                        seq.serial, seq.acked
                    )));
                }
                let json = command.is_json();
                let command = match self
                    .to_bytes(&machine, command.clone(), Translate::Command)
                    .await
                {
                    // A leader that has not applied a deploy or an upgrade it
                    // committed (new, or behind its log) does not know the
                    // machine or translates with the old code: once it has
                    // applied what it committed, try again.
                    Err(ApiError::BadRequest(_) | ApiError::UnknownMachine(_)) if json => {
                        self.query(String::new(), Bytes::new(), Consistency::Linearizable)
                            .await?;
                        self.to_bytes(&machine, command, Translate::Command).await?
                    }
                    other => other?,
                };
                let reply = self
                    .propose(Op::Apply {
                        machine: machine.clone(),
                        session,
                        command,
                    })
                    .await;
                match reply {
                    Ok(Response::Applied { index, output }) if json => {
                        // The command is applied whatever happens now: a failed
                        // translation must not read as a failed command (a
                        // retry by hand would apply it twice), so the answer
                        // then stays in the plugin's encoding.
                        let output = match self
                            .to_json(&machine, output.clone(), Translate::Response)
                            .await
                        {
                            Ok(json) => json,
                            Err(e) => {
                                tracing::warn!(index, "answer not translated to JSON: {e}");
                                output
                            }
                        };
                        Ok(Response::Applied { index, output })
                    }
                    other => other,
                }
            }
            Request::Query {
                machine,
                query,
                consistency,
            } => {
                let json = query.is_json();
                let unknown = || {
                    !self
                        .shared
                        .plugins
                        .lock()
                        .expect("lock")
                        .contains_key(&machine)
                };
                let fresh = json && consistency != Consistency::Stale;
                let mut barrier_done = false;
                if fresh && unknown() {
                    // A lagging node may not have applied the deploy yet:
                    // once it has applied up to a read index, it knows
                    // whether the machine exists.
                    self.query(String::new(), Bytes::new(), consistency).await?;
                    barrier_done = true;
                }
                let query = match self
                    .to_bytes(&machine, query.clone(), Translate::Query)
                    .await
                {
                    // Nor an upgrade that taught the machine this query:
                    // translate again once this node is as fresh as the read.
                    Err(ApiError::BadRequest(_)) if fresh && !barrier_done => {
                        self.query(String::new(), Bytes::new(), consistency).await?;
                        self.to_bytes(&machine, query, Translate::Query).await?
                    }
                    other => other?,
                };
                let output = self.query(machine.clone(), query, consistency).await?;
                let output = if json {
                    self.to_json(&machine, Payload::Bytes(output), Translate::QueryResponse)
                        .await?
                } else {
                    Payload::Bytes(output)
                };
                Ok(Response::Queried { output })
            }
            Request::Deploy {
                machine,
                component,
                limits,
            } => {
                self.deploy(code::CodeRequest::Deploy, machine, component, limits)
                    .await
            }
            Request::Upgrade {
                machine,
                component,
                limits,
            } => {
                self.deploy(code::CodeRequest::Upgrade, machine, component, limits)
                    .await
            }
            Request::DryRunUpgrade {
                machine,
                component,
                commands,
                queries,
            } => self.dry_run(machine, component, commands, queries).await,
            Request::SetLimits { machine, limits } => self.set_limits(machine, limits).await,
            Request::Undeploy { machine } => self.undeploy(machine).await,
            Request::Plugins => self.plugins().await.map(Response::Plugins),
            Request::RegisterSession => self.propose(Op::RegisterSession { ttl_ms: 0 }).await,
            Request::Status => self.status().await.map(Response::Status),
            Request::Ping => Ok(Response::Pong),
            Request::Members
            | Request::AddLearner { .. }
            | Request::Promote { .. }
            | Request::RemoveMember { .. }
            | Request::TransferLeadership { .. } => self.operate(request).await,
        };
        reply.map_err(|e| self.with_leader_addr(e))
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Status { reply })?;
        let raft = rx.await.map_err(|_| stopped())?;
        let leader_addr = raft.leader.and_then(|id| self.client_addr(id));
        let role = match self.removed_at() {
            Some(_) => "removed",
            None => role_name(raft.role),
        };
        Ok(NodeStatus {
            id: self.cfg.id,
            role: role.to_string(),
            term: raft.term,
            leader: raft.leader,
            leader_addr,
            last_index: raft.last_index,
            commit: raft.commit,
            applied: self.shared.applied.load(Ordering::Acquire),
            machines: self.shared.machines.lock().expect("lock").clone(),
            sessions: self.shared.sessions.load(Ordering::Relaxed),
            protocol: PROTOCOL_VERSION,
            snapshot_index: raft.snapshot_index,
            first_index: raft.first_index,
        })
    }

    async fn propose(&self, op: Op) -> Reply {
        let (reply, rx) = oneshot::channel();
        if let Err(e) = self.send(Command::Propose { op, reply }) {
            // A closed queue is a node shutting down, not an overload.
            if !self.commands.is_closed() {
                self.metrics().proposal_failed(ProposalFailure::Overloaded);
            }
            return Err(e);
        }
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            // Queued, so perhaps proposed: the node stopped before it could
            // tell. Only a session makes a retry safe.
            Ok(Err(_)) => Err(ApiError::Outcome),
            Err(_) => {
                self.metrics().proposal_failed(ProposalFailure::Timeout);
                Err(ApiError::Timeout)
            }
        }
    }

    /// Runs `query` against `machine`; an empty machine name is a
    /// barrier, answered once this node applied up to a read index.
    async fn query(
        &self,
        machine: String,
        query: Bytes,
        consistency: Consistency,
    ) -> Result<Bytes, ApiError> {
        let (reply, rx) = oneshot::channel();
        match consistency {
            Consistency::Linearizable | Consistency::Lease => self.send(Command::Read {
                machine,
                query,
                lease: consistency == Consistency::Lease,
                reply,
            })?,
            Consistency::Stale => self.shared_read(&machine, query, reply)?,
        }
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(stopped()),
            Err(_) => Err(ApiError::Timeout),
        }
    }

    /// Hands a stale read straight to the applier: what it applied is the answer.
    fn shared_read(
        &self,
        machine: &str,
        query: Bytes,
        reply: oneshot::Sender<Result<Bytes, ApiError>>,
    ) -> Result<(), ApiError> {
        self.applier
            .send(Work::Read {
                index: 0,
                machine: machine.to_string(),
                query,
                reply,
            })
            .map_err(|_| stopped())
    }

    fn send(&self, c: Command) -> Result<(), ApiError> {
        self.commands.try_send(c).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                ApiError::Unavailable("the node has too many requests in flight".into())
            }
            mpsc::error::TrySendError::Closed(_) => stopped(),
        })
    }

    fn with_leader_addr(&self, e: ApiError) -> ApiError {
        match e {
            ApiError::NotLeader {
                leader: Some(id),
                addr: None,
            } => ApiError::NotLeader {
                leader: Some(id),
                addr: self.client_addr(id),
            },
            e => e,
        }
    }
}

fn stopped() -> ApiError {
    ApiError::Unavailable("the node is shutting down".into())
}

/// Machine names appear in URLs and on the command line.
fn validate_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "machine name {name:?} must be 1 to 64 characters of a-z, A-Z, 0-9, '-' and '_'"
        )))
    }
}
