//! Snapshots in the event loop: writing the applier's images, compacting
//! the log behind them, sending them to followers too far behind, and
//! installing the ones received.
//!
//! Writing runs on a blocking thread, so taking a snapshot costs the event
//! loop and the applier no more than the copy of the state the applier
//! makes. The leader keeps the log behind its newest snapshot until every
//! follower has it, or until a newer snapshot comes, so that a follower a
//! little behind at the moment of a snapshot catches up from the log rather
//! than from a whole snapshot; the log thus holds at most about two snapshot
//! intervals.

use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use kythira_raft::{CompactError, Message, MessageBody, NodeId, Role, SnapshotMeta};
use kythira_storage::{SnapshotInfo, SnapshotStore};
use tokio::sync::mpsc;

use super::{EventLoop, Network, SnapshotSent};
use crate::NodeError;
use crate::disk;
use crate::image::Image;

/// What finished off the event loop.
pub enum SnapshotEvent {
    /// A snapshot was written (or failed to be).
    Written(Result<Written, String>),
    /// A snapshot transfer to `to` ended.
    Sent {
        /// The follower.
        to: NodeId,
        /// Its outcome.
        result: Result<SnapshotSent, String>,
    },
}

/// A snapshot made durable.
pub struct Written {
    meta: SnapshotMeta,
    info: SnapshotInfo,
    took: Duration,
}

/// The event loop's snapshot bookkeeping.
pub struct SnapshotState {
    pub(super) store: SnapshotStore,
    /// Finished work comes back here.
    pub(super) events: mpsc::UnboundedSender<SnapshotEvent>,
    /// A snapshot is being written.
    writing: bool,
    /// The newest image that waits for the write in progress (older ones
    /// are superseded and dropped).
    next: Option<Image>,
    /// Durable snapshots the log is not yet compacted behind, oldest first.
    durable: VecDeque<SnapshotMeta>,
    /// Followers a transfer is under way to.
    sending: BTreeSet<NodeId>,
}

impl SnapshotState {
    pub fn new(store: SnapshotStore, events: mpsc::UnboundedSender<SnapshotEvent>) -> Self {
        Self {
            store,
            events,
            writing: false,
            next: None,
            durable: VecDeque::new(),
            sending: BTreeSet::new(),
        }
    }
}

impl<N: Network> EventLoop<N> {
    /// The applier made the image of a due snapshot.
    pub(super) fn image_ready(&mut self, image: Image) {
        let s = &mut self.snaps;
        if s.writing {
            s.next = Some(image);
            return;
        }
        self.write_snapshot(image);
    }

    fn write_snapshot(&mut self, image: Image) {
        let index = image.applied;
        let meta = match self.driver.snapshot_meta(index) {
            Ok(meta) => meta,
            Err(e @ CompactError::UnknownMembership { .. }) => {
                tracing::debug!(index, "no snapshot: {e}");
                return;
            }
            // Compacted past it already (a snapshot was installed
            // meanwhile): nothing to do.
            Err(e) => {
                tracing::debug!(index, "no snapshot: {e}");
                return;
            }
        };
        self.snaps.writing = true;
        let store = self.snaps.store.clone();
        let events = self.snaps.events.clone();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let result = write(&store, &meta, &image).map(|info| Written {
                meta,
                info,
                took: started.elapsed(),
            });
            let _ = events.send(SnapshotEvent::Written(result));
        });
    }

    pub(super) fn snapshot_event(&mut self, event: SnapshotEvent) -> Result<(), NodeError> {
        match event {
            SnapshotEvent::Written(result) => {
                self.snaps.writing = false;
                match result {
                    Ok(w) => {
                        let metrics = self.metrics();
                        metrics.snapshots.inc();
                        metrics.snapshot_seconds.observe(w.took.as_secs_f64());
                        metrics.snapshot_bytes.observe(w.info.data_len as f64);
                        tracing::info!(
                            index = w.meta.index,
                            term = w.meta.term,
                            bytes = w.info.data_len,
                            seconds = w.took.as_secs_f64(),
                            "snapshot taken"
                        );
                        self.snaps.durable.push_back(w.meta);
                        self.compact_if_due()?;
                    }
                    // A newer snapshot (installed from the leader) won, or
                    // the disk refused: the log stays as it is.
                    Err(e) => tracing::warn!("snapshot not taken: {e}"),
                }
                if let Some(image) = self.snaps.next.take() {
                    self.write_snapshot(image);
                }
            }
            SnapshotEvent::Sent { to, result } => {
                self.snaps.sending.remove(&to);
                let metrics = self.metrics();
                metrics.snapshot_transfer(result.is_ok());
                match &result {
                    Ok(sent) => {
                        metrics.snapshot_sent_bytes.inc_by(sent.bytes_sent);
                        metrics.snapshot_resumed_bytes.inc_by(sent.resumed_from);
                        tracing::info!(
                            to,
                            bytes_sent = sent.bytes_sent,
                            resumed_from = sent.resumed_from,
                            "snapshot sent"
                        );
                    }
                    Err(e) => tracing::warn!(to, "snapshot not sent: {e}"),
                }
                self.driver.report_snapshot(to, result.is_ok());
            }
        }
        Ok(())
    }

    /// Compacts the log behind the newest durable snapshot every follower
    /// has, or behind any snapshot a newer one superseded.
    pub(super) fn compact_if_due(&mut self) -> Result<(), NodeError> {
        let raft = self.driver.raft();
        let leads = raft.role() == Role::Leader;
        let members = raft.membership().members();
        let caught_up = |index: u64| {
            !leads
                || members
                    .iter()
                    .filter(|&&id| id != raft.id())
                    .all(|&id| raft.progress(id).is_some_and(|p| p.matched >= index))
        };
        let newest = self.snaps.durable.len();
        let target = self
            .snaps
            .durable
            .iter()
            .enumerate()
            .rev()
            .find(|(i, meta)| i + 1 < newest || caught_up(meta.index))
            .map(|(i, _)| i);
        let Some(target) = target else {
            return Ok(());
        };
        let meta = self
            .snaps
            .durable
            .drain(..=target)
            .next_back()
            .expect("non-empty");
        let index = meta.index;
        match self.driver.compact(meta) {
            Ok(()) => {
                self.disk.compact(index)?;
                tracing::debug!(index, "log compacted");
            }
            // Compacted past it already, by an installed snapshot.
            Err(e) => tracing::debug!(index, "log not compacted: {e}"),
        }
        Ok(())
    }

    /// Sends a message, streaming a snapshot for a `Snapshot` one.
    pub(super) fn send(&mut self, m: Message) {
        if !matches!(m.body, MessageBody::Snapshot { .. }) {
            self.net.send(m);
            return;
        }
        let to = m.to;
        if !self.snaps.sending.insert(to) {
            // One transfer at a time; the core asks again if it fails.
            return;
        }
        // The newest durable snapshot, which may be newer than the one the
        // core compacted behind: any snapshot of committed state past the
        // follower's log will do.
        let m = match self
            .snaps
            .store
            .latest()
            .map(|info| disk::snapshot_meta(&info))
        {
            Some(Ok(meta)) => Message {
                body: MessageBody::Snapshot { meta },
                ..m
            },
            Some(Err(e)) => return self.sent(to, Err(e.to_string())),
            None => return self.sent(to, Err("this node has no snapshot".into())),
        };
        let events = self.snaps.events.clone();
        tracing::info!(to, "sending a snapshot");
        self.net.send_snapshot(
            m,
            Box::new(move |result| {
                let _ = events.send(SnapshotEvent::Sent { to, result });
            }),
        );
    }

    fn sent(&mut self, to: NodeId, result: Result<SnapshotSent, String>) {
        let _ = self.snaps.events.send(SnapshotEvent::Sent { to, result });
    }
}

/// Writes `image` as the snapshot `meta` stands for; durable on return.
fn write(
    store: &SnapshotStore,
    meta: &SnapshotMeta,
    image: &Image,
) -> Result<SnapshotInfo, String> {
    let mut writer = store
        .begin(disk::storage_meta(meta))
        .map_err(|e| e.to_string())?;
    writer
        .write_chunk(&image.encode())
        .map_err(|e| e.to_string())?;
    // Durability: finish syncs the file and its directory entry before the
    // log behind it may be compacted.
    writer.finish().map_err(|e| e.to_string())
}
