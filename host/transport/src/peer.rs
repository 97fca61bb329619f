//! The Raft peer network: one QUIC connection per pair of nodes, one ordered
//! stream per direction, non-blocking sends.
//!
//! Contracts:
//! - **One connection per pair.** The lower id dials, the higher accepts. A
//!   connection from a node with a higher id than ours is refused: it should
//!   be waiting for us to dial. A newer connection from the same lower-id peer
//!   replaces the older one (the peer restarted or lost it first).
//! - **Identity before data.** The peer's node id comes from its certificate
//!   and is checked against the peer set (and, when dialing, against the node
//!   we meant to reach) before any stream is opened or frame read. Refusals
//!   close the connection with [`CloseCode::Refused`] and a reason, are
//!   logged and counted in [`NetStats::refused`].
//! - **Order, not reliability.** Each direction uses one long-lived uni
//!   stream, so messages to a peer arrive in the order sent. Messages may be
//!   lost: [`PeerNet::send`] never blocks; a full per-peer queue drops the
//!   message, and so does a disconnected peer. Raft retransmits.
//! - **Inbound is bounded, not lossy:** a full inbound channel pauses the
//!   reading of that peer's stream, QUIC flow control then pauses the
//!   peer's writer, and its queue drops. Memory stays bounded on both sides.
//! - **Only well-addressed messages come in:** `from` must be the
//!   certificate's node id and `to` ours; others are dropped and counted.
//! - **A malformed frame closes that connection** ([`CloseCode::Protocol`]),
//!   logged; the dialing side reconnects after a backoff. So does a
//!   `Snapshot` message on the message stream, which [`PeerNet::send`]
//!   refuses to queue.
//! - **Snapshots travel on streams of their own** ([`PeerNet::send_snapshot`],
//!   [`crate::snapshot`]): a bidirectional stream per transfer, opened by the
//!   sender on the pair's connection whichever side dialed, so a large
//!   transfer neither delays nor reorders the messages.
//! - Reconnection uses [`Backoff::delay`], a pure function, with jitter from
//!   a per-peer generator seeded by the standard library's random state.
//! - **The peer set changes at run time** ([`PeerNet::set_peer`],
//!   [`PeerNet::remove_peer`], [`PeerNet::set_peers`]), as the cluster's
//!   membership does. Accepting consults the set as it is at that moment; a
//!   forgotten peer's driver ends and closes its connection.
//!
//! One driver task per peer owns the connection, the outbound queue's
//! receiver and the backoff state; [`PeerNet`] handles are clones that only
//! queue. Dropping a peer's handle (forgetting it, or dropping the last
//! [`PeerNet`]) stops its driver.

use std::collections::BTreeMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use kythira_raft::{Message, MessageBody};
use kythira_storage::SnapshotStore;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::endpoint::{CloseCode, peer_identity};
use crate::frame::{self, DEFAULT_MAX_FRAME};
use crate::pki::{Identity, SERVER_NAME};
use crate::snapshot::{self, SnapshotError, SnapshotSent, Snapshots};
use crate::wire;

/// Capped exponential backoff with jitter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay scale of the first retry.
    pub base: Duration,
    /// Upper bound of every delay (a `max` below `base` counts as `base`).
    pub max: Duration,
}

impl Default for Backoff {
    /// 50 ms doubling to 2 s: a restarted peer is reached within a fraction
    /// of a typical election timeout, a dead one costs a dial every ~2 s.
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0 for the first retry):
    /// `d = min(max, base · 2^attempt)`, then "equal jitter", a point in
    /// `[d/2, d]` chosen by `jitter` in `[0, 1)` (values outside are
    /// clamped). Half the delay is kept so that retries never collapse to
    /// zero; the random half spreads peers that failed together.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let max = self.max.max(self.base);
        let capped = match 2u32.checked_pow(attempt) {
            Some(factor) => self.base.saturating_mul(factor).min(max),
            None => max,
        };
        let jitter = if jitter.is_finite() {
            jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let half = capped / 2;
        let delay = half + (capped - half).mul_f64(jitter);
        debug_assert!(delay >= half && delay <= capped && delay <= max);
        delay
    }
}

/// Configuration of a node's peer network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// Our node id (at least 1); must be the id in our certificate.
    pub id: u64,
    /// The other members and their addresses, excluding ourselves, at
    /// start; [`PeerNet::set_peer`] and [`PeerNet::remove_peer`] change them.
    pub peers: BTreeMap<u64, SocketAddr>,
    /// Capacity of each peer's outbound queue. The inbound channel holds
    /// `queue_len` messages per peer of the starting set (at least one).
    pub queue_len: usize,
    /// Largest frame accepted or sent; keep the core's message byte limit
    /// well below it.
    pub max_frame: usize,
    /// Reconnect schedule of the dialing side.
    pub backoff: Backoff,
    /// This node's snapshots: what [`PeerNet::send_snapshot`] sends from and
    /// peers' snapshots are received into. Without a store, sending fails and
    /// offers are refused.
    pub snapshots: Option<SnapshotStore>,
    /// Largest snapshot data accepted from a peer, in bytes.
    pub max_snapshot_bytes: u64,
    /// How long [`PeerNet::send_snapshot`] waits for a connection to the peer.
    pub snapshot_connect_timeout: Duration,
    /// Most bytes per second one snapshot transfer sends (`None`: as fast as
    /// the connection goes), so that catching a follower up leaves room for
    /// the Raft traffic on a shared link.
    pub snapshot_send_rate: Option<u64>,
}

impl PeerConfig {
    /// Defaults: queues of 4096 messages (etcd's), [`DEFAULT_MAX_FRAME`],
    /// [`Backoff::default`], no snapshot store, snapshots up to 16 GiB, 10 s
    /// to wait for a connection to send a snapshot on.
    pub fn new(id: u64, peers: BTreeMap<u64, SocketAddr>) -> Self {
        PeerConfig {
            id,
            peers,
            queue_len: 4096,
            max_frame: DEFAULT_MAX_FRAME,
            backoff: Backoff::default(),
            snapshots: None,
            max_snapshot_bytes: 16 << 30,
            snapshot_connect_timeout: Duration::from_secs(10),
            snapshot_send_rate: None,
        }
    }

    /// The configuration with `store` as this node's snapshot store.
    pub fn with_snapshots(mut self, store: SnapshotStore) -> Self {
        self.snapshots = Some(store);
        self
    }

    fn validate(&self) -> Result<(), PeerError> {
        if self.id == 0 {
            return Err(PeerError::InvalidConfig {
                reason: "node id 0 is reserved",
            });
        }
        if self.peers.contains_key(&0) {
            return Err(PeerError::InvalidConfig {
                reason: "peer id 0 is reserved",
            });
        }
        if self.peers.contains_key(&self.id) {
            return Err(PeerError::InvalidConfig {
                reason: "the peer set must not contain our own id",
            });
        }
        if self.queue_len == 0 {
            return Err(PeerError::InvalidConfig {
                reason: "queue_len must be at least 1",
            });
        }
        if self.max_frame < frame::HEADER_LEN {
            return Err(PeerError::InvalidConfig {
                reason: "max_frame is too small for any message",
            });
        }
        Ok(())
    }
}

/// Errors of starting the peer network.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The configuration is inconsistent.
    #[error("invalid peer configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// Our certificate is not for the configured node id.
    #[error("the configured node id is {configured} but our certificate is for {certificate}")]
    WrongIdentity {
        /// `PeerConfig::id`.
        configured: u64,
        /// What the certificate names.
        certificate: Identity,
    },
    /// The endpoint already runs a peer network.
    #[error("the peer network is already started on this endpoint")]
    AlreadyStarted,
    /// Building the dialing configuration failed.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A peer added at run time has an id that cannot be a peer.
    #[error("node {id} cannot be a peer of node {us}: {reason}")]
    InvalidPeer {
        /// The id given.
        id: u64,
        /// Our id.
        us: u64,
        /// Why not.
        reason: &'static str,
    },
}

/// Why [`PeerNet::send`] did not queue a message. Each case is also counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// `to` is not a member.
    #[error("node {to} is not a peer")]
    UnknownPeer {
        /// The recipient.
        to: u64,
    },
    /// `from` is not our id.
    #[error("message from {from} cannot be sent by node {us}")]
    NotFromUs {
        /// The message's sender field.
        from: u64,
        /// Our id.
        us: u64,
    },
    /// A snapshot message, which [`PeerNet::send_snapshot`] sends.
    #[error("a snapshot to node {to} goes with send_snapshot, not on the message stream")]
    Snapshot {
        /// The recipient.
        to: u64,
    },
    /// The peer's queue is full; the message was dropped.
    #[error("queue to node {to} is full; message dropped")]
    QueueFull {
        /// The recipient.
        to: u64,
    },
    /// The network is shutting down.
    #[error("peer network stopped")]
    Stopped,
}

/// Why a peer connection was refused or ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The certificate names no valid identity.
    NoIdentity(String),
    /// A client certificate on the peer protocol.
    NotANode(Identity),
    /// A node that is not in the peer set.
    NotAMember(u64),
    /// A node presenting our own id.
    OurOwnId(u64),
    /// A higher-id node dialed us; we dial it.
    MustNotDial(u64),
    /// We dialed a node but reached another.
    WrongNode {
        /// Whom we dialed.
        expected: u64,
        /// Whom the certificate names.
        found: Identity,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NoIdentity(e) => write!(f, "certificate has no valid identity: {e}"),
            Refusal::NotANode(id) => write!(f, "{id} is not a node: peer protocol refused"),
            Refusal::NotAMember(id) => write!(f, "node {id} is not a member of the peer set"),
            Refusal::OurOwnId(id) => write!(f, "peer presents our own node id {id}"),
            Refusal::MustNotDial(id) => {
                write!(f, "node {id} has a higher id and must wait to be dialed")
            }
            Refusal::WrongNode { expected, found } => {
                write!(f, "dialed node {expected} but reached {found}")
            }
        }
    }
}

/// Decides whether to accept a peer connection from `identity` at node `us`
/// with the given member set; returns the peer's id. Pure, so the rule is
/// tested without sockets.
pub fn accept_decision(
    us: u64,
    members: impl Fn(u64) -> bool,
    identity: &Identity,
) -> Result<u64, Refusal> {
    let Identity::Node(id) = *identity else {
        return Err(Refusal::NotANode(identity.clone()));
    };
    if id == us {
        return Err(Refusal::OurOwnId(id));
    }
    if !members(id) {
        return Err(Refusal::NotAMember(id));
    }
    if id > us {
        return Err(Refusal::MustNotDial(id));
    }
    Ok(id)
}

/// Checks that a node we dialed is the node we meant.
pub fn dial_decision(expected: u64, identity: &Identity) -> Result<(), Refusal> {
    match identity {
        Identity::Node(id) if *id == expected => Ok(()),
        other => Err(Refusal::WrongNode {
            expected,
            found: other.clone(),
        }),
    }
}

/// Counters of one peer, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Messages written to the peer's stream.
    pub sent: u64,
    /// Messages dropped because the queue was full.
    pub dropped_full: u64,
    /// Messages dropped because there was no connection (including those
    /// lost in a write that failed).
    pub dropped_disconnected: u64,
    /// Messages received and delivered.
    pub received: u64,
    /// Malformed frames or messages received (each closed the connection).
    pub decode_errors: u64,
    /// Messages received whose `from` or `to` was wrong (dropped).
    pub misaddressed: u64,
    /// Messages that could not be encoded or exceeded the frame limit, and
    /// snapshot messages refused by [`PeerNet::send`] (they go with
    /// [`PeerNet::send_snapshot`]).
    pub encode_errors: u64,
    /// Connections established.
    pub connects: u64,
    /// Whether a connection is up now.
    pub connected: bool,
    /// Snapshots sent to the peer and confirmed by it.
    pub snapshots_sent: u64,
    /// Snapshot data bytes written to the peer, by every attempt.
    pub snapshot_bytes_sent: u64,
    /// Snapshot transfers to the peer that failed or were refused.
    pub snapshot_send_failures: u64,
    /// Snapshots received from the peer and published.
    pub snapshots_received: u64,
    /// Snapshot data bytes received from the peer, by every attempt.
    pub snapshot_bytes_received: u64,
    /// Snapshot offers from the peer refused, and transfers that failed.
    pub snapshot_receive_failures: u64,
}

/// Counters of the whole peer network.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Per peer.
    pub peers: BTreeMap<u64, PeerStats>,
    /// Incoming connections refused (unknown node, client certificate, wrong
    /// direction).
    pub refused: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    sent: AtomicU64,
    dropped_full: AtomicU64,
    dropped_disconnected: AtomicU64,
    received: AtomicU64,
    decode_errors: AtomicU64,
    pub(crate) misaddressed: AtomicU64,
    encode_errors: AtomicU64,
    connects: AtomicU64,
    snapshots_sent: AtomicU64,
    pub(crate) snapshot_bytes_sent: AtomicU64,
    snapshot_send_failures: AtomicU64,
    pub(crate) snapshots_received: AtomicU64,
    pub(crate) snapshot_bytes_received: AtomicU64,
    pub(crate) snapshot_receive_failures: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Hand-over of accepted connections to a peer's driver. The newest wins.
#[derive(Default)]
struct Slot {
    conn: Mutex<Option<quinn::Connection>>,
    notify: Notify,
}

impl Slot {
    fn put(&self, conn: quinn::Connection) {
        let old = self
            .conn
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(conn);
        if let Some(old) = old {
            old.close(
                CloseCode::Replaced.into(),
                b"replaced by a newer connection",
            );
        }
        self.notify.notify_one();
    }

    async fn take(&self) -> quinn::Connection {
        loop {
            if let Some(conn) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).take() {
                return conn;
            }
            // `notify_one` stores a permit when nobody waits, so a `put`
            // between the check above and this await is not missed.
            self.notify.notified().await;
        }
    }
}

/// The only sender of a peer's queue: dropping it ends the peer's driver,
/// which closes the connection as a shutdown.
struct PeerHandle {
    addr: SocketAddr,
    queue: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    slot: Arc<Slot>,
    /// The connection the driver serves now, if any: snapshot transfers open
    /// their streams on it.
    conn: Arc<watch::Sender<Option<quinn::Connection>>>,
    task: AbortHandle,
}

/// What starting a peer's driver needs, kept for peers added later.
struct Spawner {
    endpoint: quinn::Endpoint,
    dial_config: quinn::ClientConfig,
    inbound: mpsc::Sender<Message>,
    queue_len: usize,
    max_frame: usize,
    backoff: Backoff,
    seeds: RandomState,
    runtime: tokio::runtime::Handle,
}

pub(crate) struct Shared {
    id: u64,
    /// Read on every send and accept, written only when the membership
    /// changes; never held across an await.
    peers: RwLock<BTreeMap<u64, PeerHandle>>,
    refused: AtomicU64,
    spawner: Mutex<Spawner>,
    snapshots: Arc<Snapshots>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        let peers = self.peers.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, peer) in std::mem::take(peers) {
            peer.task.abort();
        }
    }
}

impl Shared {
    fn peers(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, PeerHandle>> {
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn peers_mut(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u64, PeerHandle>> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// An authenticated connection on the peer ALPN arrived.
    pub(crate) fn accept(&self, identity: &Identity, conn: quinn::Connection) {
        let peers = self.peers();
        match accept_decision(self.id, |id| peers.contains_key(&id), identity) {
            Ok(id) => {
                debug!(peer = id, remote = %conn.remote_address(), "peer connection accepted");
                peers[&id].slot.put(conn);
            }
            Err(refusal) => {
                drop(peers);
                self.refuse(&conn, &refusal)
            }
        }
    }

    /// Starts the driver of peer `peer` at `addr`.
    fn spawn(&self, peer: u64, addr: SocketAddr) -> PeerHandle {
        let s = self.spawner.lock().unwrap_or_else(|e| e.into_inner());
        let (queue_tx, queue_rx) = mpsc::channel(s.queue_len);
        let counters = Arc::new(Counters::default());
        let slot = Arc::new(Slot::default());
        let conn = Arc::new(watch::Sender::new(None));
        let mut hasher = s.seeds.build_hasher();
        hasher.write_u64(peer);
        let driver = Driver {
            us: self.id,
            peer,
            addr,
            dials: self.id < peer,
            endpoint: s.endpoint.clone(),
            dial_config: s.dial_config.clone(),
            queue: queue_rx,
            inbound: s.inbound.clone(),
            counters: counters.clone(),
            slot: slot.clone(),
            conn: conn.clone(),
            backoff: s.backoff,
            rng: SplitMix64(hasher.finish()),
            max_frame: s.max_frame,
            snapshots: self.snapshots.clone(),
        };
        let task = s.runtime.spawn(driver.run()).abort_handle();
        PeerHandle {
            addr,
            queue: queue_tx,
            counters,
            slot,
            conn,
            task,
        }
    }

    pub(crate) fn refuse(&self, conn: &quinn::Connection, refusal: &Refusal) {
        bump(&self.refused, 1);
        warn!(node = self.id, remote = %conn.remote_address(), reason = %refusal, "peer connection refused");
        conn.close(CloseCode::Refused.into(), refusal.to_string().as_bytes());
    }
}

/// Handle to the peer network; cheap to clone.
#[derive(Clone)]
pub struct PeerNet {
    shared: Arc<Shared>,
}

impl fmt::Debug for PeerNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerNet")
            .field("id", &self.shared.id)
            .field("peers", &self.shared.peers().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PeerNet {
    /// Starts the drivers. Called by `Endpoint::start_peers`, which routes
    /// accepted connections to the returned `Shared`.
    pub(crate) fn start(
        config: PeerConfig,
        our_identity: &Identity,
        endpoint: quinn::Endpoint,
        dial_config: quinn::ClientConfig,
    ) -> Result<(PeerNet, mpsc::Receiver<Message>), PeerError> {
        config.validate()?;
        if our_identity != &Identity::Node(config.id) {
            return Err(PeerError::WrongIdentity {
                configured: config.id,
                certificate: our_identity.clone(),
            });
        }
        let inbound_len = config.queue_len.saturating_mul(config.peers.len().max(1));
        let (inbound_tx, inbound_rx) = mpsc::channel(inbound_len);
        let snapshots = Arc::new(Snapshots {
            store: config.snapshots,
            max_bytes: config.max_snapshot_bytes,
            connect_timeout: config.snapshot_connect_timeout,
            send_rate: config.snapshot_send_rate.filter(|&r| r > 0),
            max_frame: config.max_frame,
            receiving: Semaphore::new(1),
        });
        let shared = Arc::new(Shared {
            id: config.id,
            peers: RwLock::new(BTreeMap::new()),
            refused: AtomicU64::new(0),
            snapshots,
            spawner: Mutex::new(Spawner {
                endpoint,
                dial_config,
                inbound: inbound_tx,
                queue_len: config.queue_len,
                max_frame: config.max_frame,
                backoff: config.backoff,
                seeds: RandomState::new(),
                runtime: tokio::runtime::Handle::current(),
            }),
        });
        for (&peer, &addr) in &config.peers {
            let handle = shared.spawn(peer, addr);
            shared.peers_mut().insert(peer, handle);
        }
        Ok((PeerNet { shared }, inbound_rx))
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Our node id.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Queues `message` for `message.to` without waiting. Full queue: the
    /// message is dropped and counted. A `Snapshot` is refused (and counted
    /// as an encode error): it goes with [`send_snapshot`](Self::send_snapshot).
    pub fn send(&self, message: Message) -> Result<(), SendError> {
        if message.from != self.shared.id {
            return Err(SendError::NotFromUs {
                from: message.from,
                us: self.shared.id,
            });
        }
        let to = message.to;
        let peers = self.shared.peers();
        let Some(peer) = peers.get(&to) else {
            return Err(SendError::UnknownPeer { to });
        };
        if matches!(message.body, MessageBody::Snapshot { .. }) {
            bump(&peer.counters.encode_errors, 1);
            return Err(SendError::Snapshot { to });
        }
        match peer.queue.try_send(message) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                bump(&peer.counters.dropped_full, 1);
                Err(SendError::QueueFull { to })
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                bump(&peer.counters.dropped_disconnected, 1);
                Err(SendError::Stopped)
            }
        }
    }

    /// Waits until a connection to `peer` is up; `false` if `peer` is not a
    /// member. Meant for start-up and tests; Raft itself needs no such wait.
    pub async fn wait_connected(&self, peer: u64) -> bool {
        let Some(mut rx) = self.shared.peers().get(&peer).map(|h| h.conn.subscribe()) else {
            return false;
        };
        rx.wait_for(Option::is_some).await.is_ok()
    }

    /// Sends the snapshot `message` (a `Snapshot` from us) names, which must
    /// be the latest one in our store, to `message.to` on a stream of its
    /// own; see [`crate::snapshot`] for the protocol. Waits up to
    /// [`PeerConfig::snapshot_connect_timeout`] for a connection, resumes from
    /// whatever the peer holds of the same snapshot already, and returns once
    /// the peer has verified and published it and handed the message to its
    /// core. The whole transfer is bounded by
    /// [`snapshot::transfer_timeout`]. Every outcome is counted in the peer's
    /// [`PeerStats`].
    pub async fn send_snapshot(&self, message: Message) -> Result<SnapshotSent, SnapshotError> {
        let us = self.shared.id;
        let MessageBody::Snapshot { meta } = &message.body else {
            return Err(SnapshotError::NotASnapshot);
        };
        let snapshot = (meta.index, meta.term);
        if message.from != us {
            return Err(SnapshotError::NotFromUs {
                from: message.from,
                us,
            });
        }
        let to = message.to;
        let Some((counters, conn)) = self
            .shared
            .peers()
            .get(&to)
            .map(|h| (h.counters.clone(), h.conn.subscribe()))
        else {
            return Err(SnapshotError::UnknownPeer { to });
        };
        let snapshots = &self.shared.snapshots;
        let outcome = match snapshots.store.clone() {
            Some(store) => {
                snapshot::send(snapshots, store, message, snapshot, conn, &counters).await
            }
            None => Err(SnapshotError::NoStore),
        };
        match &outcome {
            Ok(_) => bump(&counters.snapshots_sent, 1),
            Err(e) => {
                bump(&counters.snapshot_send_failures, 1);
                warn!(node = us, peer = to, index = snapshot.0, term = snapshot.1, error = %e, "snapshot not sent");
            }
        }
        outcome
    }

    /// Adds peer `id` at `addr`, or moves it there: a moved peer's
    /// connection is closed and made again. Returns whether anything
    /// changed. May be called from any thread: drivers are spawned on the
    /// runtime the network started on.
    pub fn set_peer(&self, id: u64, addr: SocketAddr) -> Result<bool, PeerError> {
        let us = self.shared.id;
        let invalid = |reason| PeerError::InvalidPeer { id, us, reason };
        if id == 0 {
            return Err(invalid("node id 0 is reserved"));
        }
        if id == us {
            return Err(invalid("it is this node"));
        }
        if self.shared.peers().get(&id).is_some_and(|h| h.addr == addr) {
            return Ok(false);
        }
        // Spawned outside the write lock: the driver may start at once and
        // nothing it does needs the set, but holding the lock no longer
        // than an insert keeps sends from waiting.
        let handle = self.shared.spawn(id, addr);
        let old = self.shared.peers_mut().insert(id, handle);
        match old {
            Some(old) => info!(node = us, peer = id, from = %old.addr, to = %addr, "peer moved"),
            None => info!(node = us, peer = id, %addr, "peer added"),
        }
        Ok(true)
    }

    /// Forgets peer `id`: its queue is dropped, its connection closed, and
    /// a connection from it is refused from now on. Returns whether it was
    /// a peer.
    pub fn remove_peer(&self, id: u64) -> bool {
        let removed = self.shared.peers_mut().remove(&id);
        if removed.is_some() {
            info!(node = self.shared.id, peer = id, "peer forgotten");
        }
        // The handle drops here, after the lock: the driver sees its queue
        // closed and ends.
        removed.is_some()
    }

    /// Makes the peer set exactly `peers` (our own id, if present, is
    /// skipped): adds, moves and forgets as needed. Returns whether anything
    /// changed.
    pub fn set_peers(&self, peers: &BTreeMap<u64, SocketAddr>) -> Result<bool, PeerError> {
        let us = self.shared.id;
        let gone: Vec<u64> = self
            .shared
            .peers()
            .keys()
            .copied()
            .filter(|id| !peers.contains_key(id))
            .collect();
        let mut changed = false;
        for id in gone {
            changed |= self.remove_peer(id);
        }
        for (&id, &addr) in peers.iter().filter(|(id, _)| **id != us) {
            changed |= self.set_peer(id, addr)?;
        }
        Ok(changed)
    }

    /// The peers and their addresses.
    pub fn peers(&self) -> BTreeMap<u64, SocketAddr> {
        self.shared
            .peers()
            .iter()
            .map(|(&id, h)| (id, h.addr))
            .collect()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetStats {
            peers: self
                .shared
                .peers()
                .iter()
                .map(|(&id, h)| {
                    let c = &h.counters;
                    let stats = PeerStats {
                        sent: load(&c.sent),
                        dropped_full: load(&c.dropped_full),
                        dropped_disconnected: load(&c.dropped_disconnected),
                        received: load(&c.received),
                        decode_errors: load(&c.decode_errors),
                        misaddressed: load(&c.misaddressed),
                        encode_errors: load(&c.encode_errors),
                        connects: load(&c.connects),
                        connected: h.conn.borrow().is_some(),
                        snapshots_sent: load(&c.snapshots_sent),
                        snapshot_bytes_sent: load(&c.snapshot_bytes_sent),
                        snapshot_send_failures: load(&c.snapshot_send_failures),
                        snapshots_received: load(&c.snapshots_received),
                        snapshot_bytes_received: load(&c.snapshot_bytes_received),
                        snapshot_receive_failures: load(&c.snapshot_receive_failures),
                    };
                    (id, stats)
                })
                .collect(),
            refused: load(&self.shared.refused),
        }
    }
}

/// A small, fast generator for jitter; quality needs are modest.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_f64(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // 53 random bits: uniform in [0, 1).
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Messages gathered into one stream write, at most.
const BATCH_MESSAGES: usize = 256;
/// Bytes gathered into one stream write before it is issued.
const BATCH_BYTES: usize = 1 << 20;

/// How a connection ended.
enum Ended {
    /// The `PeerNet` is gone.
    Stopped,
    /// A newer connection from the peer replaced this one.
    Replaced(quinn::Connection),
    /// The connection failed or was closed; log the reason.
    Failed(String),
}

struct Driver {
    us: u64,
    peer: u64,
    addr: SocketAddr,
    dials: bool,
    endpoint: quinn::Endpoint,
    dial_config: quinn::ClientConfig,
    queue: mpsc::Receiver<Message>,
    inbound: mpsc::Sender<Message>,
    counters: Arc<Counters>,
    slot: Arc<Slot>,
    conn: Arc<watch::Sender<Option<quinn::Connection>>>,
    backoff: Backoff,
    rng: SplitMix64,
    max_frame: usize,
    snapshots: Arc<Snapshots>,
}

impl Driver {
    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut next: Option<quinn::Connection> = None;
        loop {
            let conn = match next.take() {
                Some(conn) => conn,
                None if self.dials => match self.dial().await {
                    Some(Ok(conn)) => conn,
                    Some(Err(reason)) => {
                        debug!(node = self.us, peer = self.peer, %reason, attempt, "dial failed");
                        if !self.pause(attempt).await {
                            return;
                        }
                        attempt = attempt.saturating_add(1);
                        continue;
                    }
                    None => return,
                },
                None => {
                    let slot = self.slot.clone();
                    match drain_while(&mut self.queue, &self.counters, slot.take()).await {
                        Some(conn) => conn,
                        None => return,
                    }
                }
            };
            bump(&self.counters.connects, 1);
            self.conn.send_replace(Some(conn.clone()));
            info!(node = self.us, peer = self.peer, remote = %conn.remote_address(), "peer connected");
            let (ended, heard) = self.serve(&conn).await;
            self.conn.send_replace(None);
            if heard {
                // Only a connection that carried traffic proves the peer
                // healthy; one refused right after the handshake must not
                // reset the schedule into a tight loop.
                attempt = 0;
            }
            match ended {
                Ended::Stopped => {
                    conn.close(CloseCode::Shutdown.into(), b"peer network stopped");
                    return;
                }
                Ended::Replaced(newer) => {
                    debug!(node = self.us, peer = self.peer, "connection replaced");
                    next = Some(newer);
                }
                Ended::Failed(reason) => {
                    warn!(node = self.us, peer = self.peer, %reason, "peer connection lost");
                    if self.dials {
                        if !self.pause(attempt).await {
                            return;
                        }
                        attempt = attempt.saturating_add(1);
                    }
                }
            }
        }
    }

    /// Waits out the backoff, dropping what is queued meanwhile; `false`
    /// when the network stopped.
    async fn pause(&mut self, attempt: u32) -> bool {
        let delay = self.backoff.delay(attempt, self.rng.next_f64());
        drain_while(&mut self.queue, &self.counters, tokio::time::sleep(delay))
            .await
            .is_some()
    }

    /// One dial attempt; `None` when the network stopped meanwhile.
    async fn dial(&mut self) -> Option<Result<quinn::Connection, String>> {
        let connecting =
            match self
                .endpoint
                .connect_with(self.dial_config.clone(), self.addr, SERVER_NAME)
            {
                Ok(connecting) => connecting,
                Err(e) => return Some(Err(format!("cannot start connecting: {e}"))),
            };
        let conn = match drain_while(&mut self.queue, &self.counters, connecting).await? {
            Ok(conn) => conn,
            Err(e) => return Some(Err(format!("handshake with {}: {e}", self.addr))),
        };
        let identity = peer_identity(&conn);
        let decision = match &identity {
            Ok(identity) => dial_decision(self.peer, identity),
            Err(e) => Err(Refusal::NoIdentity(e.to_string())),
        };
        if let Err(refusal) = decision {
            warn!(node = self.us, peer = self.peer, reason = %refusal, "refusing dialed peer");
            conn.close(CloseCode::Refused.into(), refusal.to_string().as_bytes());
            return Some(Err(refusal.to_string()));
        }
        Some(Ok(conn))
    }

    /// Carries traffic until the connection ends; also reports whether
    /// anything was received.
    async fn serve(&mut self, conn: &quinn::Connection) -> (Ended, bool) {
        let heard = AtomicU64::new(0);
        let reader = read_loop(
            conn,
            self.peer,
            self.us,
            &self.inbound,
            &self.counters,
            self.max_frame,
            &heard,
        );
        let writer = write_loop(conn, &mut self.queue, &self.counters, self.max_frame);
        let snapshots = accept_snapshots(
            conn,
            snapshot::Receiver {
                us: self.us,
                peer: self.peer,
                snapshots: self.snapshots.clone(),
                inbound: self.inbound.clone(),
                counters: self.counters.clone(),
            },
        );
        let slot = self.slot.clone();
        let dials = self.dials;
        let replaced = async move {
            if dials {
                // Dialing side: nothing is accepted for this peer.
                std::future::pending::<quinn::Connection>().await
            } else {
                slot.take().await
            }
        };
        let ended = tokio::select! {
            ended = reader => ended,
            ended = writer => ended,
            ended = snapshots => ended,
            newer = replaced => Ended::Replaced(newer),
        };
        if let Ended::Failed(reason) = &ended {
            // Idempotent if the connection is already closed.
            conn.close(CloseCode::Protocol.into(), reason.as_bytes());
        }
        (ended, heard.load(Ordering::Relaxed) > 0)
    }
}

/// Serves the snapshot streams the peer opens, each in a task of its own,
/// until the connection ends; the transfers end with it (dropping the tasks
/// aborts them, which keeps the receivers' partial files for a resume).
async fn accept_snapshots(conn: &quinn::Connection, receiver: snapshot::Receiver) -> Ended {
    let mut transfers = JoinSet::new();
    loop {
        tokio::select! {
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    transfers.spawn(receiver.clone().serve(send, recv));
                }
                Err(e) => return Ended::Failed(format!("connection: {e}")),
            },
            Some(_) = transfers.join_next(), if !transfers.is_empty() => {}
        }
    }
}

/// Runs `fut` while dropping (and counting) whatever is queued meanwhile:
/// without a connection, old Raft messages are worthless. `None` if the
/// queue closed, i.e. the `PeerNet` is gone.
async fn drain_while<F: Future>(
    queue: &mut mpsc::Receiver<Message>,
    counters: &Counters,
    fut: F,
) -> Option<F::Output> {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return Some(out),
            message = queue.recv() => match message {
                Some(_) => bump(&counters.dropped_disconnected, 1),
                None => return None,
            },
        }
    }
}

async fn write_loop(
    conn: &quinn::Connection,
    queue: &mut mpsc::Receiver<Message>,
    counters: &Counters,
    max_frame: usize,
) -> Ended {
    let mut stream = match conn.open_uni().await {
        Ok(stream) => stream,
        Err(e) => return Ended::Failed(format!("cannot open stream: {e}")),
    };
    let mut buf = Vec::new();
    loop {
        let Some(first) = queue.recv().await else {
            return Ended::Stopped;
        };
        buf.clear();
        let mut count = 0u64;
        let mut next = Some(first);
        // Gather what is already queued into one write: fewer wake-ups and
        // stream locks, and the peer's reader sees a burst at once.
        while let Some(message) = next.take() {
            let start = frame::begin_frame(&mut buf);
            let encoded = wire::encode_into(&message, &mut buf)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    frame::end_frame(&mut buf, start, max_frame).map_err(|e| e.to_string())
                });
            match encoded {
                Ok(()) => count += 1,
                Err(reason) => {
                    buf.truncate(start);
                    bump(&counters.encode_errors, 1);
                    warn!(to = message.to, %reason, "message not sent");
                }
            }
            if count < BATCH_MESSAGES as u64 && buf.len() < BATCH_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if buf.is_empty() {
            continue;
        }
        if let Err(e) = stream.write_all(&buf).await {
            bump(&counters.dropped_disconnected, count);
            return Ended::Failed(format!("write: {e}"));
        }
        bump(&counters.sent, count);
    }
}

async fn read_loop(
    conn: &quinn::Connection,
    peer: u64,
    us: u64,
    inbound: &mpsc::Sender<Message>,
    counters: &Counters,
    max_frame: usize,
    heard: &AtomicU64,
) -> Ended {
    loop {
        // The peer opens one stream per connection; should it finish one and
        // open another, read them one after the other to keep the order.
        let mut stream = match conn.accept_uni().await {
            Ok(stream) => stream,
            Err(e) => return Ended::Failed(format!("connection: {e}")),
        };
        loop {
            let bytes: Bytes = match frame::read_frame(&mut stream, max_frame).await {
                Ok(Some(bytes)) => bytes,
                Ok(None) => break,
                // The connection ended (the peer stopped, restarted or
                // forgot us): nothing malformed arrived.
                Err(e @ frame::FrameError::Io(_)) => {
                    return Ended::Failed(format!("connection: {e}"));
                }
                Err(e) => {
                    bump(&counters.decode_errors, 1);
                    warn!(node = us, peer, error = %e, "malformed frame from peer; closing connection");
                    return Ended::Failed(format!("malformed frame: {e}"));
                }
            };
            let message = match wire::decode(&bytes) {
                Ok(message) => message,
                Err(e) => {
                    bump(&counters.decode_errors, 1);
                    warn!(node = us, peer, error = %e, "malformed message from peer; closing connection");
                    return Ended::Failed(format!("malformed message: {e}"));
                }
            };
            heard.fetch_add(1, Ordering::Relaxed);
            if matches!(message.body, MessageBody::Snapshot { .. }) {
                // Its data would be missing: snapshots come on their own
                // stream, and only a broken or hostile peer sends one here.
                bump(&counters.decode_errors, 1);
                warn!(
                    node = us,
                    peer, "snapshot on the message stream; closing connection"
                );
                return Ended::Failed("snapshot message on the message stream".into());
            }
            if message.from != peer || message.to != us {
                bump(&counters.misaddressed, 1);
                debug!(
                    node = us,
                    peer,
                    from = message.from,
                    to = message.to,
                    "misaddressed message dropped"
                );
                continue;
            }
            // Counted before the hand-over so that a consumer that has seen
            // the message also sees it counted.
            bump(&counters.received, 1);
            if inbound.send(message).await.is_err() {
                // The receiver is gone: nobody consumes messages any more.
                return Ended::Stopped;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;

    #[test]
    fn lower_ids_dial_higher_ids_accept() {
        let members = |id| [1, 2, 3].contains(&id);
        assert_eq!(accept_decision(2, members, &Identity::Node(1)), Ok(1));
        assert_eq!(
            accept_decision(2, members, &Identity::Node(3)),
            Err(Refusal::MustNotDial(3))
        );
        assert_eq!(
            accept_decision(2, members, &Identity::Node(2)),
            Err(Refusal::OurOwnId(2))
        );
        assert_eq!(
            accept_decision(2, members, &Identity::Node(9)),
            Err(Refusal::NotAMember(9))
        );
        let client = Identity::client("c", Role::Admin).unwrap();
        assert!(matches!(
            accept_decision(2, members, &client),
            Err(Refusal::NotANode(_))
        ));
        assert_eq!(dial_decision(3, &Identity::Node(3)), Ok(()));
        assert!(dial_decision(3, &Identity::Node(4)).is_err());
    }

    #[test]
    fn jitter_is_uniform_enough_and_in_range() {
        let mut rng = SplitMix64(7);
        let draws: Vec<f64> = (0..10_000).map(|_| rng.next_f64()).collect();
        assert!(draws.iter().all(|x| (0.0..1.0).contains(x)));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }
}
