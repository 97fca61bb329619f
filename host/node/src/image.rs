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

/// Version of the layout below. Images of version 1 (no history, only the
/// index of the code's deploy) are still read; later ones are refused.
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
        let decoded = match found {
            FORMAT => postcard::from_bytes(bytes),
            1 => postcard::from_bytes::<v1::Image>(bytes).map(Image::from),
            found => return Err(ImageError::Format { found }),
        };
        decoded.map_err(|e| ImageError::Decode(e.to_string()))
    }
}

/// Layout 1, read so that a node restarts from a snapshot the build before
/// wrote: a machine's history was only the index of the deploy of the code
/// it runs.
mod v1 {
    use std::collections::BTreeMap;

    use bytes::Bytes;
    use kythira_api::{ChangeKind, CodeChange, Reply};
    use serde::Deserialize;

    use super::{FORMAT, LimitsRecord, MachineRecord, StateRecord};
    use crate::addresses::AddressBook;
    use crate::sessions::Sessions;

    #[derive(Deserialize)]
    pub(super) struct Image {
        _format: u32,
        applied: u64,
        last_timestamp_ms: u64,
        sessions: Sessions<Reply>,
        addresses: AddressBook,
        components: BTreeMap<String, Bytes>,
        machines: BTreeMap<String, Machine>,
    }

    #[derive(Deserialize)]
    struct Machine {
        sha256: String,
        deployed_at: u64,
        limits: LimitsRecord,
        state: StateRecord,
    }

    impl From<Image> for super::Image {
        fn from(i: Image) -> Self {
            let machines = i
                .machines
                .into_iter()
                .map(|(name, m)| {
                    let history = vec![CodeChange {
                        index: m.deployed_at,
                        sha256: m.sha256.clone(),
                        change: ChangeKind::Deploy,
                    }];
                    let record = MachineRecord {
                        sha256: m.sha256,
                        history,
                        limits: m.limits,
                        state: m.state,
                    };
                    (name, record)
                })
                .collect();
            Self {
                format: FORMAT,
                applied: i.applied,
                last_timestamp_ms: i.last_timestamp_ms,
                sessions: i.sessions,
                addresses: i.addresses,
                components: i.components,
                machines,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_api::ChangeKind;

    /// Layout 1 as the build before wrote it.
    #[derive(Serialize)]
    struct V1<'a> {
        format: u32,
        applied: u64,
        last_timestamp_ms: u64,
        sessions: &'a Sessions<Reply>,
        addresses: &'a AddressBook,
        components: &'a BTreeMap<String, Bytes>,
        machines: BTreeMap<String, V1Machine<'a>>,
    }

    #[derive(Serialize)]
    struct V1Machine<'a> {
        sha256: &'a str,
        deployed_at: u64,
        limits: LimitsRecord,
        state: &'a StateRecord,
    }

    #[test]
    fn a_layout_1_image_reads_with_its_deploy_as_history() {
        let state = StateRecord {
            checkpoint_index: 5,
            checkpoint_state: Some(Bytes::from_static(b"state")),
            replay: vec![(6, 1, 1000, Bytes::from_static(b"cmd"))],
            counted_bytes: 3,
            unavailable: None,
        };
        let components = BTreeMap::from([("ab".to_string(), Bytes::from_static(b"\0asm"))]);
        let limits = LimitsRecord::from(Limits::default());
        let old = V1 {
            format: 1,
            applied: 6,
            last_timestamp_ms: 1000,
            sessions: &Sessions::default(),
            addresses: &AddressBook::default(),
            components: &components,
            machines: BTreeMap::from([(
                "kv".to_string(),
                V1Machine {
                    sha256: "ab",
                    deployed_at: 2,
                    limits,
                    state: &state,
                },
            )]),
        };
        let image = Image::decode(&postcard::to_stdvec(&old).unwrap()).unwrap();
        assert_eq!(image.format, FORMAT);
        assert_eq!((image.applied, image.last_timestamp_ms), (6, 1000));
        assert_eq!(image.components, components);
        let kv = &image.machines["kv"];
        assert_eq!(
            kv.history,
            [CodeChange {
                index: 2,
                sha256: "ab".into(),
                change: ChangeKind::Deploy,
            }]
        );
        assert_eq!((&kv.state, kv.limits), (&state, limits));
        // And it writes the current layout.
        assert_eq!(Image::decode(&image.encode()).unwrap(), image);
        assert!(matches!(
            Image::decode(&postcard::to_stdvec(&3u32).unwrap()),
            Err(ImageError::Format { found: 3 })
        ));
    }
}
