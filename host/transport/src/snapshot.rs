//! Snapshot transfer between peers: the leader's latest snapshot file goes to
//! a follower on a bidirectional stream of its own, in bounded chunks, and
//! resumes where an earlier attempt stopped.
//!
//! The protocol, every message one frame ([`crate::frame`]):
//!
//! ```text
//! sender                                     receiver
//!   Offer { version, message, configuration,
//!           data_len, checksum }        ──►
//!                                       ◄──  Resume { offset } | Refuse { reason }
//!   data from `offset`, one frame per
//!   chunk of at most CHUNK bytes, then
//!   the end of its send side            ──►
//!                                       ◄──  Done | Failed { reason }
//! ```
//!
//! - `message` is the wire encoding ([`crate::wire`]) of the `Snapshot`
//!   message the consensus core asked to send; `configuration` is the sender's
//!   stored configuration bytes, so that the receiver's file is byte-identical
//!   to the sender's; `checksum` is the CRC-32C of the data.
//! - `Resume { offset }` is how many bytes of exactly this snapshot (index,
//!   term, length, checksum and configuration) the receiver holds already,
//!   whoever sent them: nodes snapshot at the same indexes with deterministic
//!   contents, so another node's copy continues the same bytes.
//! - The receiver verifies the length and checksum and publishes the file
//!   durably, then hands the `Snapshot` message to its core (on the same
//!   channel as every other message), and only then answers `Done`. The
//!   sender's success therefore means the follower's core has the snapshot
//!   queued with its data in place.
//! - A broken transfer leaves the receiver's partial file for the next offer.
//!   A failed checksum deletes it, so the next offer starts from zero.
//! - `version` is the first byte of the offer and checked before anything
//!   else; replies are postcard enums in that version.
//!
//! A node receives one snapshot at a time; a second concurrent offer is
//! refused. A malformed offer or frame fails that stream only (answered with
//! `Failed` where possible and logged), never the peer connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kythira_raft::{Membership, Message, MessageBody};
use kythira_storage::{
    Incoming, SnapshotInfo, SnapshotMeta as StoredMeta, SnapshotReader, SnapshotStore, StorageError,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{info, warn};

use crate::frame::{self, FrameError};
use crate::peer::{Counters, bump};
use crate::wire::{self, WireError};

/// Version of the snapshot stream's protocol, the first byte of an offer.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest data chunk in one frame.
pub const CHUNK: usize = 1 << 20;
/// Largest reply frame; replies are a few bytes plus a short reason.
const MAX_REPLY: usize = 8 << 10;
/// Reasons sent to the other side are cut to this many bytes.
const MAX_REASON: usize = 1 << 10;
/// How long a receiver waits for the offer after the stream opened.
const OFFER_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest silence between two chunks before a receiver gives a transfer up.
/// A bound on silence rather than on the whole transfer: the receiver cannot
/// know how fast the sender is allowed to send, and a stalled sender must
/// not hold the node's one reception slot for long.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest offer read: the message and the header's configuration. An offer
/// is read before the reception slot is taken, so it is kept small.
const MAX_OFFER: usize = 1 << 20;

/// The bound on a whole transfer of `data_len` bytes: generous, since a
/// snapshot competes with the log traffic and the disk, but finite, so that
/// a stalled peer cannot hold a transfer (and the receiver's one slot) forever.
pub fn transfer_timeout(data_len: u64) -> Duration {
    Duration::from_secs(30 + data_len / (4 << 20))
}

/// Why [`PeerNet::send_snapshot`](crate::PeerNet::send_snapshot) failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The message is not a `Snapshot`.
    #[error("not a snapshot message")]
    NotASnapshot,
    /// `from` is not our id.
    #[error("snapshot from {from} cannot be sent by node {us}")]
    NotFromUs {
        /// The message's sender field.
        from: u64,
        /// Our id.
        us: u64,
    },
    /// `to` is not a peer (or was forgotten while we waited).
    #[error("node {to} is not a peer")]
    UnknownPeer {
        /// The recipient.
        to: u64,
    },
    /// This node's peer configuration has no snapshot store.
    #[error("this node keeps no snapshot store")]
    NoStore,
    /// The store holds no snapshot.
    #[error("the snapshot store is empty")]
    NoSnapshot,
    /// The message names another snapshot than the latest one stored.
    #[error(
        "snapshot at index {index} term {term} is not the latest stored one (index {latest_index} term {latest_term})"
    )]
    NotLatest {
        /// Index the message names.
        index: u64,
        /// Term the message names.
        term: u64,
        /// Index of the latest stored snapshot.
        latest_index: u64,
        /// Its term.
        latest_term: u64,
    },
    /// No connection to the peer came up in time.
    #[error("no connection to node {to} within {waited:?}")]
    NotConnected {
        /// The recipient.
        to: u64,
        /// How long we waited.
        waited: Duration,
    },
    /// Reading the local snapshot failed.
    #[error("local snapshot: {0}")]
    Storage(#[from] StorageError),
    /// The message could not be encoded.
    #[error(transparent)]
    Encode(#[from] WireError),
    /// Opening the stream failed: the connection is gone.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing or reading a frame failed (including a broken stream).
    #[error("stream: {0}")]
    Frame(#[from] FrameError),
    /// The receiver answered something the protocol does not allow there.
    #[error("protocol violation by the receiver: {reason}")]
    Protocol {
        /// What was wrong.
        reason: &'static str,
    },
    /// The receiver refused the offer.
    #[error("node {to} refused the snapshot: {reason}")]
    Refused {
        /// The recipient.
        to: u64,
        /// Its reason.
        reason: String,
    },
    /// The receiver failed to take the snapshot (verification, its disk).
    #[error("node {to} failed to take the snapshot: {reason}")]
    Failed {
        /// The recipient.
        to: u64,
        /// Its reason.
        reason: String,
    },
    /// A blocking storage task did not complete (a panic, or the runtime is
    /// shutting down).
    #[error("a storage task was interrupted")]
    Interrupted,
    /// The transfer took longer than [`transfer_timeout`] allows.
    #[error("snapshot transfer to node {to} timed out after {limit:?}")]
    TimedOut {
        /// The recipient.
        to: u64,
        /// The bound in force.
        limit: Duration,
    },
}

/// A completed transfer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotSent {
    /// Data bytes sent by this transfer.
    pub bytes_sent: u64,
    /// Where the data started: what the receiver already held.
    pub resumed_from: u64,
}

/// Snapshot settings and state shared by a node's peer drivers.
pub(crate) struct Snapshots {
    pub(crate) store: Option<SnapshotStore>,
    pub(crate) max_bytes: u64,
    pub(crate) connect_timeout: Duration,
    /// Most bytes per second a transfer sends, if bounded.
    pub(crate) send_rate: Option<u64>,
    /// Largest offer accepted.
    pub(crate) max_frame: usize,
    /// One incoming transfer at a time per node, whoever sends it: the store
    /// receives one snapshot at a time.
    pub(crate) receiving: Semaphore,
}

#[derive(Serialize, Deserialize)]
struct Offer<'a> {
    version: u8,
    #[serde(borrow, with = "serde_bytes")]
    message: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    configuration: &'a [u8],
    data_len: u64,
    checksum: u32,
}

// Variant order is the wire tag: append new variants at the end only.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Resume { offset: u64 },
    Refuse { reason: String },
    Done,
    Failed { reason: String },
}

fn encode_reply(reply: &Reply) -> Vec<u8> {
    postcard::to_stdvec(reply).expect("a reply always encodes")
}

fn decode_reply(bytes: &[u8]) -> Result<Reply, SnapshotError> {
    match postcard::take_from_bytes::<Reply>(bytes) {
        Ok((reply, [])) => Ok(reply),
        _ => Err(SnapshotError::Protocol {
            reason: "malformed reply",
        }),
    }
}

fn cut(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut at = MAX_REASON;
        while !reason.is_char_boundary(at) {
            at -= 1;
        }
        reason.truncate(at);
    }
    reason
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Result<Reply, SnapshotError> {
    match frame::read_frame(recv, MAX_REPLY).await? {
        Some(bytes) => decode_reply(&bytes),
        None => Err(SnapshotError::Protocol {
            reason: "stream ended without an answer",
        }),
    }
}

/// Sends `message`, a `Snapshot` from us to `message.to` for the snapshot at
/// (`index`, `term`), with the latest snapshot of `store`, over the connection
/// `conn` publishes once one is up.
pub(crate) async fn send(
    snapshots: &Snapshots,
    store: SnapshotStore,
    message: Message,
    (index, term): (u64, u64),
    mut conn: watch::Receiver<Option<quinn::Connection>>,
    counters: &Counters,
) -> Result<SnapshotSent, SnapshotError> {
    let to = message.to;
    let reader = tokio::task::spawn_blocking(move || store.open_latest())
        .await
        .map_err(|_| SnapshotError::Interrupted)??
        .ok_or(SnapshotError::NoSnapshot)?;
    let info = reader.info().clone();
    if (info.meta.index, info.meta.term) != (index, term) {
        return Err(SnapshotError::NotLatest {
            index,
            term,
            latest_index: info.meta.index,
            latest_term: info.meta.term,
        });
    }
    let encoded = wire::encode(&message)?;

    let waited = snapshots.connect_timeout;
    let conn = match tokio::time::timeout(waited, conn.wait_for(Option::is_some)).await {
        Ok(Ok(conn)) => conn.clone().expect("waited for a connection"),
        Ok(Err(_)) => return Err(SnapshotError::UnknownPeer { to }),
        Err(_) => return Err(SnapshotError::NotConnected { to, waited }),
    };
    let started = Instant::now();
    // A bounded rate stretches the transfer: the limit leaves it twice the
    // time the rate needs.
    let paced = snapshots.send_rate.map_or(Duration::ZERO, |rate| {
        Duration::from_secs(2 * info.data_len / rate)
    });
    let limit = transfer_timeout(info.data_len).max(Duration::from_secs(30) + paced);
    let mut progress = Progress::default();
    let transfer = Transfer {
        reader: Arc::new(reader),
        encoded: &encoded,
        to,
        max_frame: snapshots.max_frame,
        rate: snapshots.send_rate,
        counters,
    };
    let transfer = transfer.run(&conn, &mut progress);
    match tokio::time::timeout(limit, transfer).await {
        Ok(Ok(())) => {
            info!(
                node = message.from,
                peer = to,
                index,
                term,
                bytes = progress.sent,
                resumed_from = progress.resumed_from,
                duration_ms = started.elapsed().as_millis() as u64,
                "snapshot sent"
            );
            Ok(SnapshotSent {
                bytes_sent: progress.sent,
                resumed_from: progress.resumed_from,
            })
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SnapshotError::TimedOut { to, limit }),
    }
}

#[derive(Default)]
struct Progress {
    resumed_from: u64,
    sent: u64,
}

struct Transfer<'a> {
    reader: Arc<SnapshotReader>,
    encoded: &'a [u8],
    to: u64,
    max_frame: usize,
    /// Most bytes per second, if bounded.
    rate: Option<u64>,
    counters: &'a Counters,
}

impl Transfer<'_> {
    async fn run(
        &self,
        conn: &quinn::Connection,
        progress: &mut Progress,
    ) -> Result<(), SnapshotError> {
        let to = self.to;
        let info = self.reader.info().clone();
        let (mut send, mut recv) = conn.open_bi().await?;
        // Below the message stream (priority 0): heartbeats and appends go
        // first when both have data queued.
        let _ = send.set_priority(-1);
        let offer = Offer {
            version: PROTOCOL_VERSION,
            message: self.encoded,
            configuration: &info.meta.configuration,
            data_len: info.data_len,
            checksum: info.checksum,
        };
        let offer = postcard::to_stdvec(&offer).map_err(WireError::Encode)?;
        frame::write_frame(&mut send, &offer, self.max_frame).await?;
        let offset = match read_reply(&mut recv).await? {
            Reply::Resume { offset } if offset <= info.data_len => offset,
            Reply::Resume { .. } => {
                return Err(SnapshotError::Protocol {
                    reason: "resume offset beyond the snapshot's end",
                });
            }
            Reply::Refuse { reason } => return Err(SnapshotError::Refused { to, reason }),
            Reply::Failed { reason } => return Err(SnapshotError::Failed { to, reason }),
            Reply::Done => {
                return Err(SnapshotError::Protocol {
                    reason: "done before any data",
                });
            }
        };
        progress.resumed_from = offset;

        let failure = match self.stream_data(&mut send, offset, progress).await {
            Ok(()) => None,
            // The receiver stopped reading: its answer says why.
            Err(SnapshotError::Frame(e)) => {
                return Err(match read_reply(&mut recv).await {
                    Ok(Reply::Failed { reason }) => SnapshotError::Failed { to, reason },
                    _ => SnapshotError::Frame(e),
                });
            }
            Err(local) => Some(local),
        };
        // Ends the data cleanly even after a local failure: what was sent is
        // good and stays with the receiver for a resume.
        let _ = send.finish();
        let verdict = read_reply(&mut recv).await;
        if let Some(failure) = failure {
            // The receiver's answer (it reports the early end) also means it
            // has let go of the transfer, so a retry is not refused as
            // concurrent.
            return Err(failure);
        }
        match verdict? {
            Reply::Done => Ok(()),
            Reply::Failed { reason } => Err(SnapshotError::Failed { to, reason }),
            Reply::Resume { .. } | Reply::Refuse { .. } => Err(SnapshotError::Protocol {
                reason: "expected done or failed",
            }),
        }
    }

    /// Writes the data from `offset` in chunks.
    async fn stream_data(
        &self,
        send: &mut quinn::SendStream,
        mut offset: u64,
        progress: &mut Progress,
    ) -> Result<(), SnapshotError> {
        let data_len = self.reader.info().data_len;
        let read = |offset: u64| {
            let reader = self.reader.clone();
            tokio::task::spawn_blocking(move || reader.read_chunk(offset, CHUNK))
        };
        let started = tokio::time::Instant::now();
        let mut paced = 0u64;
        // The next chunk is read from disk while the current one is written.
        let mut next = (offset < data_len).then(|| read(offset));
        while let Some(pending) = next.take() {
            let chunk: Bytes = pending.await.map_err(|_| SnapshotError::Interrupted)??;
            assert!(!chunk.is_empty(), "read_chunk returns data before the end");
            let end = offset + chunk.len() as u64;
            if end < data_len {
                next = Some(read(end));
            }
            if let Some(rate) = self.rate {
                // Pacing, not waiting for anything: the chunk leaves once
                // the bytes sent so far fit the rate.
                let due = Duration::from_secs_f64(paced as f64 / rate as f64);
                tokio::time::sleep_until(started + due).await;
                paced += chunk.len() as u64;
            }
            frame::write_frame(send, &chunk, CHUNK).await?;
            offset = end;
            progress.sent += chunk.len() as u64;
            bump(&self.counters.snapshot_bytes_sent, chunk.len() as u64);
        }
        Ok(())
    }
}

/// Why an incoming transfer did not complete, and what the sender is told.
enum Rejection {
    /// Before any data: answered with `Refuse`.
    Refuse(String),
    /// During the transfer: answered with `Failed`.
    Fail(String),
    /// The stream broke: nobody to answer.
    Broken(String),
}

impl Rejection {
    fn reason(&self) -> &str {
        match self {
            Rejection::Refuse(r) | Rejection::Fail(r) | Rejection::Broken(r) => r,
        }
    }
}

/// A transfer that completed.
struct Received {
    info: SnapshotInfo,
    resumed_from: u64,
}

/// What the receiving side of a peer connection needs.
#[derive(Clone)]
pub(crate) struct Receiver {
    pub(crate) us: u64,
    pub(crate) peer: u64,
    pub(crate) snapshots: Arc<Snapshots>,
    pub(crate) inbound: mpsc::Sender<Message>,
    pub(crate) counters: Arc<Counters>,
}

impl Receiver {
    /// Serves one snapshot stream opened by the peer, to the end.
    pub(crate) async fn serve(self, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let started = Instant::now();
        // Everything the transfer holds (the partial file, the slot) is
        // released before the answer goes out, so a sender that retries at
        // once is not refused as concurrent.
        let outcome = self.take(&mut send, &mut recv).await;
        let reply = match &outcome {
            Ok(received) => {
                bump(&self.counters.snapshots_received, 1);
                info!(
                    node = self.us,
                    peer = self.peer,
                    index = received.info.meta.index,
                    term = received.info.meta.term,
                    bytes = received.info.data_len - received.resumed_from,
                    resumed_from = received.resumed_from,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "snapshot received"
                );
                Some(Reply::Done)
            }
            Err(rejection) => {
                bump(&self.counters.snapshot_receive_failures, 1);
                warn!(
                    node = self.us,
                    peer = self.peer,
                    reason = rejection.reason(),
                    "snapshot transfer from peer failed"
                );
                match rejection {
                    Rejection::Refuse(reason) => Some(Reply::Refuse {
                        reason: cut(reason.clone()),
                    }),
                    Rejection::Fail(reason) => Some(Reply::Failed {
                        reason: cut(reason.clone()),
                    }),
                    Rejection::Broken(_) => None,
                }
            }
        };
        if let Some(reply) = reply {
            // The sender may be gone already; nothing more to do then.
            let _ = frame::write_frame(&mut send, &encode_reply(&reply), MAX_REPLY).await;
            let _ = send.finish();
        }
    }

    async fn take(
        &self,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<Received, Rejection> {
        let offer = match tokio::time::timeout(
            OFFER_TIMEOUT,
            frame::read_frame(recv, MAX_OFFER.min(self.snapshots.max_frame)),
        )
        .await
        {
            Ok(Ok(Some(offer))) => offer,
            Ok(Ok(None)) => return Err(Rejection::Broken("stream ended before an offer".into())),
            Ok(Err(e @ FrameError::Io(_))) => return Err(Rejection::Broken(e.to_string())),
            Ok(Err(e)) => return Err(Rejection::Fail(format!("malformed offer: {e}"))),
            Err(_) => return Err(Rejection::Fail("no offer in time".into())),
        };
        let (message, info, store) = self.check_offer(&offer)?;
        let Ok(_slot) = self.snapshots.receiving.try_acquire() else {
            return Err(Rejection::Refuse(
                "another snapshot transfer is in progress".into(),
            ));
        };
        // Bounded by silence between chunks (see CHUNK_TIMEOUT), not by the
        // sender's pace, which only the sender knows.
        self.take_data(store, message, info, send, recv).await
    }

    /// Checks an offer before any disk work.
    fn check_offer(
        &self,
        offer: &[u8],
    ) -> Result<(Message, SnapshotInfo, SnapshotStore), Rejection> {
        match offer.first() {
            Some(&PROTOCOL_VERSION) => {}
            Some(version) => {
                return Err(Rejection::Refuse(format!(
                    "unsupported snapshot protocol version {version} (expected {PROTOCOL_VERSION})"
                )));
            }
            None => return Err(Rejection::Fail("empty offer".into())),
        }
        let offer: Offer<'_> = match postcard::take_from_bytes(offer) {
            Ok((offer, [])) => offer,
            Ok(_) => return Err(Rejection::Fail("malformed offer: trailing bytes".into())),
            Err(e) => return Err(Rejection::Fail(format!("malformed offer: {e}"))),
        };
        let message = wire::decode(&Bytes::copy_from_slice(offer.message))
            .map_err(|e| Rejection::Fail(format!("offer: {e}")))?;
        let Some(store) = self.snapshots.store.clone() else {
            return Err(Rejection::Refuse(format!(
                "node {} keeps no snapshot store",
                self.us
            )));
        };
        let MessageBody::Snapshot { meta } = &message.body else {
            return Err(Rejection::Fail(
                "the offer's message is not a snapshot".into(),
            ));
        };
        // The header is published with the file and read back at restart:
        // it must say what the message says, or the node would restart with
        // another membership than the one its core installed (or none).
        if Membership::decode(offer.configuration).as_ref() != Ok(&meta.membership) {
            return Err(Rejection::Fail(
                "the offer's configuration does not match its message's membership".into(),
            ));
        }
        if message.from != self.peer || message.to != self.us {
            bump(&self.counters.misaddressed, 1);
            return Err(Rejection::Refuse(format!(
                "misaddressed: from {} to {} on the connection from node {} to node {}",
                message.from, message.to, self.peer, self.us
            )));
        }
        if offer.data_len > self.snapshots.max_bytes {
            return Err(Rejection::Refuse(format!(
                "snapshot of {} bytes exceeds the maximum of {}",
                offer.data_len, self.snapshots.max_bytes
            )));
        }
        let info = SnapshotInfo {
            meta: StoredMeta {
                index: meta.index,
                term: meta.term,
                configuration: Bytes::copy_from_slice(offer.configuration),
            },
            data_len: offer.data_len,
            checksum: offer.checksum,
        };
        Ok((message, info, store))
    }

    async fn take_data(
        &self,
        store: SnapshotStore,
        message: Message,
        info: SnapshotInfo,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<Received, Rejection> {
        if store.latest().as_ref() == Some(&info) {
            // Published already (the sender did not hear our `Done`, or the
            // transfer was cut off while publishing): no data is needed, but
            // the core may not have the message yet.
            let resume = encode_reply(&Reply::Resume {
                offset: info.data_len,
            });
            frame::write_frame(send, &resume, MAX_REPLY)
                .await
                .map_err(|e| Rejection::Broken(e.to_string()))?;
            let resumed_from = info.data_len;
            return self.deliver(message, info, resumed_from).await;
        }
        let opened = {
            let info = info.clone();
            tokio::task::spawn_blocking(move || store.receive(&info)).await
        };
        let mut incoming = match opened {
            Ok(Ok(incoming)) => incoming,
            Ok(Err(e)) => return Err(Rejection::Refuse(e.to_string())),
            Err(_) => return Err(Rejection::Fail("opening the partial file panicked".into())),
        };
        let resumed_from = incoming.received();
        let resume = encode_reply(&Reply::Resume {
            offset: resumed_from,
        });
        frame::write_frame(send, &resume, MAX_REPLY)
            .await
            .map_err(|e| Rejection::Broken(e.to_string()))?;

        while incoming.received() < info.data_len {
            let read = tokio::time::timeout(CHUNK_TIMEOUT, frame::read_frame(recv, CHUNK)).await;
            let Ok(read) = read else {
                return Err(Rejection::Fail(format!(
                    "no data for {CHUNK_TIMEOUT:?} after {} of {} bytes",
                    incoming.received(),
                    info.data_len
                )));
            };
            let chunk = match read {
                Ok(Some(chunk)) => chunk,
                Ok(None) => {
                    return Err(Rejection::Fail(format!(
                        "the data ended after {} of {} bytes",
                        incoming.received(),
                        info.data_len
                    )));
                }
                Err(e @ FrameError::Io(_)) => return Err(Rejection::Broken(e.to_string())),
                Err(e) => return Err(Rejection::Fail(format!("malformed chunk: {e}"))),
            };
            if chunk.is_empty() {
                return Err(Rejection::Fail("empty chunk".into()));
            }
            bump(&self.counters.snapshot_bytes_received, chunk.len() as u64);
            incoming = write(incoming, chunk).await?;
        }

        let finished = tokio::task::spawn_blocking(move || incoming.finish()).await;
        match finished {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(Rejection::Fail(e.to_string())),
            Err(_) => return Err(Rejection::Fail("publishing the snapshot panicked".into())),
        }
        self.deliver(message, info, resumed_from).await
    }

    /// Hands the message to the core, once its snapshot is durable and
    /// published.
    async fn deliver(
        &self,
        message: Message,
        info: SnapshotInfo,
        resumed_from: u64,
    ) -> Result<Received, Rejection> {
        if self.inbound.send(message).await.is_err() {
            return Err(Rejection::Fail("the node is stopping".into()));
        }
        Ok(Received { info, resumed_from })
    }
}

/// Appends `chunk` to `incoming` off the async threads.
async fn write(mut incoming: Incoming, chunk: Bytes) -> Result<Incoming, Rejection> {
    let written = tokio::task::spawn_blocking(move || {
        let offset = incoming.received();
        let outcome = incoming.write_chunk(offset, &chunk);
        (incoming, outcome)
    })
    .await;
    match written {
        Ok((incoming, Ok(()))) => Ok(incoming),
        Ok((_, Err(e))) => Err(Rejection::Fail(e.to_string())),
        Err(_) => Err(Rejection::Fail("writing the snapshot panicked".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_roundtrip_and_garbage_is_refused() {
        for reply in [
            Reply::Resume { offset: 1 << 40 },
            Reply::Refuse {
                reason: "no".into(),
            },
            Reply::Done,
            Reply::Failed {
                reason: "checksum".into(),
            },
        ] {
            let bytes = encode_reply(&reply);
            assert_eq!(
                format!("{:?}", decode_reply(&bytes).unwrap()),
                format!("{reply:?}")
            );
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode_reply(&longer).is_err());
        }
        assert!(decode_reply(&[0xff]).is_err());
        assert!(decode_reply(&[]).is_err());
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_REASON);
        let cut = cut(long);
        assert!(cut.len() <= MAX_REASON && cut.len() >= MAX_REASON - 1);
        assert_eq!(super::cut("short".into()), "short");
    }

    #[test]
    fn the_version_is_the_first_byte_of_an_offer() {
        let offer = Offer {
            version: PROTOCOL_VERSION,
            message: b"m",
            configuration: b"c",
            data_len: 5,
            checksum: 7,
        };
        let bytes = postcard::to_stdvec(&offer).unwrap();
        assert_eq!(bytes[0], PROTOCOL_VERSION);
    }

    #[test]
    fn the_timeout_grows_with_the_size() {
        assert_eq!(transfer_timeout(0), Duration::from_secs(30));
        assert_eq!(transfer_timeout(1 << 30), Duration::from_secs(30 + 256));
    }
}
