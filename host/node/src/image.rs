//! What a snapshot holds: the replicated state above the log at one index,
//! everything a replica needs to continue from there without the entries
//! before it.
//!
//! The encoding is postcard over ordered maps, so equal states give equal
//! bytes: replicas snapshotting at the same index write byte-identical files,
//! which lets a follower resume a transfer from any of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use kythira_api::{CodeChange, Reply};
use kythira_runtime::{ApplyContext, Limits, MachineImage};
use serde::{Deserialize, Serialize};

use crate::addresses::AddressBook;
use crate::sessions::Sessions;

/// Version of the layout below; an image of another version is refused.
pub const FORMAT: u32 = 2;

/// The node's replicated state after applying entry `applied`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Layout version, [`FORMAT`].
    pub format: u32,
    /// Index of the last entry the state includes.
    pub applied: u64,
    /// Log time of the last entry applied: later entries never go back.
    pub last_timestamp_ms: u64,
    /// Client sessions and their cached answers.
    pub sessions: Sessions<Reply>,
    /// Members' addresses and removed ids.
    pub addresses: AddressBook,
    /// Component bytes by sha256 (hex): stored once however many machines
    /// run them.
    pub components: BTreeMap<String, Bytes>,
    /// Deployed machines by name.
    pub machines: BTreeMap<String, MachineRecord>,
}

/// One deployed machine in an [`Image`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// Its code, a key of [`Image::components`].
    pub sha256: String,
    /// Its deploys, upgrades and limit changes, oldest first.
    pub history: Vec<CodeChange>,
    /// The limits its calls run under.
    pub limits: LimitsRecord,
    /// Its latest checkpoint and the commands since.
    pub state: StateRecord,
}

/// [`Limits`], as the image stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRecord {
    apply_fuel: u64,
    query_fuel: u64,
    snapshot_fuel: u64,
    memory_bytes: u64,
    checkpoint_interval: u64,
    checkpoint_bytes: u64,
}

impl From<Limits> for LimitsRecord {
    fn from(l: Limits) -> Self {
        Self {
            apply_fuel: l.apply_fuel,
            query_fuel: l.query_fuel,
            snapshot_fuel: l.snapshot_fuel,
            memory_bytes: l.memory_bytes as u64,
            checkpoint_interval: l.checkpoint_interval,
            checkpoint_bytes: l.checkpoint_bytes,
        }
    }
}

impl TryFrom<LimitsRecord> for Limits {
    type Error = String;

    fn try_from(l: LimitsRecord) -> Result<Self, String> {
        Ok(Limits {
            apply_fuel: l.apply_fuel,
            query_fuel: l.query_fuel,
            snapshot_fuel: l.snapshot_fuel,
            memory_bytes: usize::try_from(l.memory_bytes)
                .map_err(|_| format!("a memory limit of {} bytes", l.memory_bytes))?,
            checkpoint_interval: l.checkpoint_interval,
            checkpoint_bytes: l.checkpoint_bytes,
        })
    }
}

/// A [`MachineImage`], as the image stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRecord {
    checkpoint_index: u64,
    checkpoint_state: Option<Bytes>,
    /// (index, term, timestamp in ms, command) of each command since.
    replay: Vec<(u64, u64, u64, Bytes)>,
    counted_bytes: u64,
    unavailable: Option<String>,
}

impl From<MachineImage> for StateRecord {
    fn from(m: MachineImage) -> Self {
        Self {
            checkpoint_index: m.checkpoint_index,
            // Shares the checkpoint's buffer: no copy of the state here.
            checkpoint_state: m.checkpoint_state.map(Bytes::from_owner),
            replay: m
                .replay
                .into_iter()
                .map(|(ctx, command)| (ctx.index, ctx.term, ctx.timestamp_ms, command))
                .collect(),
            counted_bytes: m.counted_bytes,
            unavailable: m.unavailable,
        }
    }
}

impl From<&StateRecord> for MachineImage {
    fn from(s: &StateRecord) -> Self {
        Self {
            checkpoint_index: s.checkpoint_index,
            checkpoint_state: s.checkpoint_state.as_deref().map(Arc::from),
            replay: s
                .replay
                .iter()
                .map(|(index, term, timestamp_ms, command)| {
                    let ctx = ApplyContext {
                        index: *index,
                        term: *term,
                        timestamp_ms: *timestamp_ms,
                    };
                    (ctx, command.clone())
                })
                .collect(),
            counted_bytes: s.counted_bytes,
            unavailable: s.unavailable.clone(),
        }
    }
}

/// Why an image cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not an image of this layout, or damaged.
    #[error("the snapshot's state does not decode: {0}")]
    Decode(String),
    /// Written by a version with another layout.
    #[error("the snapshot's state has layout {found}; this version reads layout {FORMAT}")]
    Format {
        /// The layout found.
        found: u32,
    },
}

impl Image {
    /// The image's bytes, as a snapshot file's data.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("an image always encodes")
    }

    /// Writes the image's bytes (as [`Image::encode`] gives them) to `out`.
    pub fn encode_into(&self, out: impl std::io::Write) -> std::io::Result<()> {
        postcard::to_io(self, out)
            .map(drop)
            .map_err(std::io::Error::other)
    }

    /// Reads an image written by [`Image::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ImageError> {
        // The layout version comes first, so another layout is named as
        // such rather than reported as damage.
        let (found, _) = postcard::take_from_bytes::<u32>(bytes)
            .map_err(|e| ImageError::Decode(e.to_string()))?;
        if found != FORMAT {
            return Err(ImageError::Format { found });
        }
        postcard::from_bytes(bytes).map_err(|e| ImageError::Decode(e.to_string()))
    }
}
