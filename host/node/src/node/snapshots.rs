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

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use kythira_raft::{CompactError, Message, MessageBody, NodeId, Role, SnapshotMeta};
use kythira_storage::{SnapshotInfo, SnapshotReader, SnapshotStore};
use tokio::sync::mpsc;

use super::{EventLoop, Network, SnapshotSent};
use crate::NodeError;
use crate::disk;
use crate::image::Image;

/// How long after a failed transfer the core hears of it (and so sends
/// again): a follower that refuses at once (busy with another sender's
/// transfer, or out of space) is not offered the snapshot at every
/// heartbeat.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long after a delivered snapshot a leader keeps the log after it for
/// the follower to catch up from, if that follower never does (it died).
/// While the transfer runs, the log is kept whatever its length.
const PIN_FOR: Duration = Duration::from_secs(120);

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
    /// The pause after a failed transfer to `to` is over.
    Retry {
        /// The follower.
        to: NodeId,
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
    /// Followers a transfer is under way to (or paused after a failure).
    sending: BTreeSet<NodeId>,
    /// On a leader: followers sent a snapshot, with its index and when,
    /// until their match index passes it. The log after it is kept for
    /// them: compacting it away would send them another snapshot, and
    /// under steady writes they might never catch up.
    pins: BTreeMap<NodeId, (u64, Instant)>,
    /// Most entries a pin keeps in memory after its snapshot: the core
    /// holds its log in memory, and a transfer may run for hours.
    pin_max_entries: u64,
}

impl SnapshotState {
    /// `every_entries` is the snapshot interval (0 when snapshots are taken
    /// by size only).
    pub fn new(
        store: SnapshotStore,
        events: mpsc::UnboundedSender<SnapshotEvent>,
        every_entries: u64,
    ) -> Self {
        Self {
            store,
            events,
            writing: false,
            next: None,
            durable: VecDeque::new(),
            sending: BTreeSet::new(),
            pins: BTreeMap::new(),
            pin_max_entries: 4 * every_entries.max(10_000),
        }
    }

    /// Opens the snapshot the core is installing, which the network
    /// published as the store's latest before the core saw its message.
    pub(super) fn open_installed(&self, meta: &SnapshotMeta) -> Result<SnapshotReader, NodeError> {
        let reader = self.store.open_latest()?;
        match reader {
            Some(r) if (r.info().meta.index, r.info().meta.term) == (meta.index, meta.term) => {
                Ok(r)
            }
            other => Err(NodeError::Corrupt(format!(
                "installing the snapshot at index {} term {}, but the store's latest is {:?}; \
                 a restart recovers from the store",
                meta.index,
                meta.term,
                other.map(|r| (r.info().meta.index, r.info().meta.term))
            ))),
        }
    }
}

/// Reports a transfer's outcome exactly once: through the callback, or, if
/// the network drops the callback uncalled, as a failure, so the follower is
/// never left waiting on a transfer nobody runs.
struct Report {
    events: mpsc::UnboundedSender<SnapshotEvent>,
    to: NodeId,
    done: bool,
}

impl Report {
    fn send(mut self, result: Result<SnapshotSent, String>) {
        self.done = true;
        let _ = self.events.send(SnapshotEvent::Sent {
            to: self.to,
            result,
        });
    }
}

impl Drop for Report {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.events.send(SnapshotEvent::Sent {
                to: self.to,
                result: Err("the transfer ended without an outcome".into()),
            });
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
                if result.is_ok() {
                    self.snaps.sending.remove(&to);
                    // The follower has the snapshot now: the time it gets
                    // to catch up from the log runs from here.
                    if let Some(pin) = self.snaps.pins.get_mut(&to) {
                        pin.1 = Instant::now();
                    }
                    self.driver.report_snapshot(to, true);
                } else {
                    // The log kept for it is free again; the core hears of
                    // the failure (and sends anew) after a pause.
                    self.snaps.pins.remove(&to);
                    let events = self.snaps.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(RETRY_AFTER).await;
                        let _ = events.send(SnapshotEvent::Retry { to });
                    });
                }
            }
            SnapshotEvent::Retry { to } => {
                self.snaps.sending.remove(&to);
                self.driver.report_snapshot(to, false);
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
        // Snapshots sent to followers that have not caught up past them yet
        // bound the compaction.
        let now = Instant::now();
        let sending = &self.snaps.sending;
        let last = raft.log().last_index();
        let max = self.snaps.pin_max_entries;
        self.snaps.pins.retain(|&id, &mut (index, since)| {
            leads
                && raft.progress(id).is_some_and(|p| p.matched < index)
                && last.saturating_sub(index) <= max
                && (sending.contains(&id) || now.duration_since(since) < PIN_FOR)
        });
        let floor = self.snaps.pins.values().map(|&(index, _)| index).min();
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
            .filter(|(_, meta)| floor.is_none_or(|floor| meta.index <= floor))
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
        if let MessageBody::Snapshot { meta } = &m.body {
            self.snaps.pins.insert(to, (meta.index, Instant::now()));
        }
        let report = Report {
            events: self.snaps.events.clone(),
            to,
            done: false,
        };
        tracing::info!(to, "sending a snapshot");
        self.net
            .send_snapshot(m, Box::new(move |result| report.send(result)));
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
    // Streamed into the file: no second copy of the state in memory.
    image.encode_into(&mut writer).map_err(|e| e.to_string())?;
    // Durability: finish syncs the file and its directory entry before the
    // log behind it may be compacted.
    writer.finish().map_err(|e| e.to_string())
}
