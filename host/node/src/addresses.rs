//! The replicated address book: where each member listens.
//!
//! The core's configuration entries name members by id only. Addresses
//! travel in the node's own log envelope ([`crate::entry::Op::SetAddress`],
//! [`crate::entry::Op::RemoveMember`]) and every replica applies them to this
//! book, kept with the session table: a restarted node rebuilds it by replay,
//! and any node can dial a member that joined after it started and name it
//! in a redirect. Every decision here depends only on the log, so every
//! replica accepts and refuses the same entries.
//!
//! The members a node was configured with (`[members]` in its file) are the
//! book's fallback for ids it does not hold: the cluster's founders, and
//! for a joining node the members it was told to reach.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Where one node listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Addresses {
    /// Raft traffic.
    pub peer: SocketAddr,
    /// Client traffic.
    pub client: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Record {
    /// `None` for a founding member removed before the log recorded where
    /// it listens (its file-configured addresses serve meanwhile).
    at: Option<Addresses>,
    /// Index of the entry that removed the node.
    removed_at: Option<u64>,
}

/// Why an address entry was refused (the same on every replica).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Node id 0 means "nobody".
    #[error("node id 0 is reserved")]
    ReservedId,
    /// Ids of removed nodes are not reused: the removed node may still run,
    /// and its log says it is out.
    #[error("node {0} was removed from this cluster; give the new node a new id")]
    Removed(u64),
    /// Another member listens there.
    #[error("{addr} is already the address of node {by}")]
    InUse {
        /// The address asked for.
        addr: SocketAddr,
        /// The member that has it.
        by: u64,
    },
}

/// Replicated addresses of the members, and the ids that were removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AddressBook {
    records: BTreeMap<u64, Record>,
}

impl AddressBook {
    /// Records that `id` listens at `at` (applying `Op::SetAddress`).
    pub fn set(&mut self, id: u64, at: Addresses) -> Result<(), AddressError> {
        if id == 0 {
            return Err(AddressError::ReservedId);
        }
        if self.removed_at(id).is_some() {
            return Err(AddressError::Removed(id));
        }
        if let Some((by, addr)) = self.owner_of(id, at) {
            return Err(AddressError::InUse { addr, by });
        }
        self.records.insert(
            id,
            Record {
                at: Some(at),
                removed_at: None,
            },
        );
        Ok(())
    }

    /// A live member other than `id` already using one of `at`'s addresses.
    fn owner_of(&self, id: u64, at: Addresses) -> Option<(u64, SocketAddr)> {
        self.records
            .iter()
            .filter(|(other, r)| **other != id && r.removed_at.is_none())
            .find_map(|(other, r)| {
                let theirs = r.at?;
                [at.peer, at.client]
                    .into_iter()
                    .find(|a| *a == theirs.peer || *a == theirs.client)
                    .map(|a| (*other, a))
            })
    }

    /// Marks `id` removed at log index `index` (applying
    /// `Op::RemoveMember`). Its addresses are kept: the leader still
    /// replicates to it until the core's configuration drops it. Removing
    /// twice keeps the first index.
    pub fn remove(&mut self, id: u64, index: u64) {
        self.records
            .entry(id)
            .or_insert(Record {
                at: None,
                removed_at: None,
            })
            .removed_at
            .get_or_insert(index);
    }

    /// The index of the entry that removed `id`, if it was removed.
    pub fn removed_at(&self, id: u64) -> Option<u64> {
        self.records.get(&id).and_then(|r| r.removed_at)
    }

    /// The addresses the log recorded for `id` (removed or not).
    pub fn get(&self, id: u64) -> Option<Addresses> {
        self.records.get(&id).and_then(|r| r.at)
    }

    /// Ids the log gave addresses to and that were not removed.
    pub fn live(&self) -> impl Iterator<Item = (u64, Addresses)> + '_ {
        self.records
            .iter()
            .filter(|(_, r)| r.removed_at.is_none())
            .filter_map(|(id, r)| Some((*id, r.at?)))
    }
}

/// The addresses of node `id`: the log's, else the configuration file's.
pub fn lookup(
    id: u64,
    book: &AddressBook,
    configured: &BTreeMap<u64, Addresses>,
) -> Option<Addresses> {
    book.get(id).or_else(|| configured.get(&id).copied())
}

/// The peers node `me` keeps connections with: every member of the core's
/// configuration in effect (`members`, a removed one included until the
/// configuration drops it, so that it still receives the entry that removes
/// it), every node the log gave an address to, and the configured ones,
/// except those the log removed. Members without a known address are left
/// out (they can be neither dialed nor told apart).
pub fn peers(
    me: u64,
    members: &BTreeSet<u64>,
    book: &AddressBook,
    configured: &BTreeMap<u64, Addresses>,
) -> BTreeMap<u64, SocketAddr> {
    let candidates = members
        .iter()
        .copied()
        .chain(book.live().map(|(id, _)| id))
        .chain(
            configured
                .keys()
                .copied()
                .filter(|id| book.removed_at(*id).is_none()),
        );
    let mut out = BTreeMap::new();
    for id in candidates.filter(|id| *id != me) {
        if let Some(at) = lookup(id, book, configured) {
            out.insert(id, at.peer);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> Addresses {
        Addresses {
            peer: SocketAddr::from(([127, 0, 0, 1], 7100 + port)),
            client: SocketAddr::from(([127, 0, 0, 1], 7000 + port)),
        }
    }

    fn configured(ids: &[u64]) -> BTreeMap<u64, Addresses> {
        ids.iter().map(|&id| (id, at(id as u16))).collect()
    }

    #[test]
    fn addresses_are_recorded_moved_and_refused_when_taken() {
        let mut book = AddressBook::default();
        book.set(4, at(4)).unwrap();
        assert_eq!(book.get(4), Some(at(4)));
        // The same node may move.
        book.set(4, at(40)).unwrap();
        assert_eq!(book.get(4), Some(at(40)));
        // Another node may not take its ports, peer or client.
        let clash = Addresses {
            peer: at(9).peer,
            client: at(40).client,
        };
        assert_eq!(
            book.set(5, clash),
            Err(AddressError::InUse {
                addr: at(40).client,
                by: 4
            })
        );
        assert_eq!(book.set(0, at(6)), Err(AddressError::ReservedId));
        assert_eq!(book.get(5), None);
    }

    #[test]
    fn removed_ids_are_never_reused_and_free_their_ports() {
        let mut book = AddressBook::default();
        book.set(4, at(4)).unwrap();
        book.remove(4, 90);
        book.remove(4, 95);
        assert_eq!(book.removed_at(4), Some(90), "the first removal counts");
        assert_eq!(book.get(4), Some(at(4)), "kept to reach it meanwhile");
        assert_eq!(book.set(4, at(4)), Err(AddressError::Removed(4)));
        // A new node may listen where the removed one did.
        book.set(5, at(4)).unwrap();
        // A founding member (configured, not in the log) removed.
        book.remove(2, 100);
        assert_eq!(book.removed_at(2), Some(100));
        assert_eq!(book.get(2), None);
        assert_eq!(lookup(2, &book, &configured(&[2])), Some(at(2)));
        assert_eq!(book.live().map(|(id, _)| id).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn the_peer_set_follows_the_configuration_and_the_log() {
        let conf = configured(&[1, 2, 3]);
        let mut book = AddressBook::default();
        let members: BTreeSet<u64> = [1, 2, 3].into();
        // The founders, from the configuration file.
        assert_eq!(
            peers(1, &members, &book, &conf).keys().collect::<Vec<_>>(),
            [&2, &3]
        );
        // A new node recorded in the log, before and after it is a member.
        book.set(4, at(4)).unwrap();
        let p = peers(1, &members, &book, &conf);
        assert_eq!(p.get(&4), Some(&at(4).peer));
        // Node 3 is being removed: still a peer while the configuration
        // holds it, then forgotten.
        book.remove(3, 50);
        let with_3: BTreeSet<u64> = [1, 2, 3, 4].into();
        assert!(peers(1, &with_3, &book, &conf).contains_key(&3));
        let without_3: BTreeSet<u64> = [1, 2, 4].into();
        assert_eq!(
            peers(1, &without_3, &book, &conf)
                .keys()
                .collect::<Vec<_>>(),
            [&2, &4]
        );
        // The log's address wins over a stale file.
        book.set(2, at(22)).unwrap();
        assert_eq!(
            peers(1, &without_3, &book, &conf).get(&2),
            Some(&at(22).peer)
        );
        assert_eq!(lookup(2, &book, &conf), Some(at(22)));
        // A member nobody has an address for is left out.
        let stranger: BTreeSet<u64> = [1, 9].into();
        assert!(!peers(1, &stranger, &book, &conf).contains_key(&9));
    }

    #[test]
    fn a_joining_node_starts_from_its_file() {
        // Node 4 knows the founders from its file and nothing from the log.
        let conf = configured(&[1, 2, 3, 4]);
        let book = AddressBook::default();
        let p = peers(4, &BTreeSet::new(), &book, &conf);
        assert_eq!(p.keys().collect::<Vec<_>>(), [&1, &2, &3]);
    }
}
