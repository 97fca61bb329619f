//! Operating the cluster from the node: membership changes, leadership
//! transfer, the peer set, and what a removed node does.
//!
//! A change is planned by the event loop from the state it owns (the core's
//! membership, the address book, replication progress) as a list of
//! [`Step`]s, and carried out one step at a time by the [`NodeHandle`] that
//! received the request, each step a command to the event loop that answers
//! once the step has taken effect. A step that fails leaves what earlier
//! steps did in place; asking again plans from there, so a change cut short
//! by a leader change is finished by repeating the command at the new
//! leader (the client library does that for a redirect).
//!
//! - **Adding a learner**: its addresses go into the log first (and those of
//!   founding members the log does not hold yet, so that a node joining
//!   later learns them by replay), then the learner's configuration entry.
//! - **Promoting**: once the learner's log is within [`CAUGHT_UP_LAG`]
//!   entries of the leader's (waiting up to the request timeout), the voters
//!   change through the joint configuration; the answer comes when the final
//!   `C(new)` is committed.
//! - **Removing** a voter demotes it to a learner first (joint change), so
//!   that it keeps receiving the log without voting; then
//!   `Op::RemoveMember` tells it, through the log, that it is out: it stops
//!   once it applies that entry. The leader waits until the member holds the
//!   entry and has been sent a heartbeat (which tells it the entry is
//!   committed) before a last configuration entry drops it; a member that
//!   does not answer is dropped after two election timeouts. A leader asked
//!   to remove itself hands leadership to the most caught-up voter and
//!   redirects the request there.
//! - **One change at a time** per node (the lock below), and the core
//!   refuses a change while the last configuration entry is uncommitted or
//!   joint, which covers changes begun at an earlier leader.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use kythira_api::{ApiError, MemberStatus, Members, Reply, Request, Response};
use kythira_raft::{MembershipChangeError, MembershipError, NodeId, Proposal, Role, TransferError};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Command, EventLoop, Network, NodeHandle, not_leader};
use crate::addresses::{self, AddressBook, Addresses};
use crate::entry::Op;

/// A learner is caught up once it holds every entry committed when its
/// promotion was asked for, and its log is within this many entries of the
/// leader's: under load the leader's log moves on while the learner
/// acknowledges, so equality would be too strict, and a few appends' worth
/// of lag is made up within a round trip or two once it votes.
pub const CAUGHT_UP_LAG: u64 = 256;

/// A change of membership as asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Change {
    /// Add `id`, listening at `at`, as a learner.
    AddLearner { id: NodeId, at: Addresses },
    /// Make learner `id` a voter.
    Promote(NodeId),
    /// Remove member `id`.
    Remove(NodeId),
}

impl Change {
    fn from_request(request: Request) -> Result<Self, ApiError> {
        match request {
            Request::AddLearner { id, peer, client } => {
                let parse = |what: &str, s: &str| {
                    s.parse::<SocketAddr>().map_err(|e| {
                        ApiError::BadRequest(format!(
                            "the {what} address {s:?} is not an ip:port: {e}"
                        ))
                    })
                };
                let at = Addresses {
                    peer: parse("peer", &peer)?,
                    client: parse("client", &client)?,
                };
                if at.peer == at.client {
                    return Err(ApiError::BadRequest(format!(
                        "the peer and client addresses are both {}; they must differ",
                        at.peer
                    )));
                }
                Ok(Change::AddLearner { id, at })
            }
            Request::Promote { id } => Ok(Change::Promote(id)),
            Request::RemoveMember { id } => Ok(Change::Remove(id)),
            other => unreachable!("not a membership change: {other:?}"),
        }
    }

    fn describe(&self) -> String {
        match self {
            Change::AddLearner { id, .. } => format!("adding node {id} as a learner"),
            Change::Promote(id) => format!("promoting node {id}"),
            Change::Remove(id) => format!("removing node {id}"),
        }
    }
}

/// A configuration to propose, computed from the one in effect when it is
/// proposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reconfig {
    AddLearner(NodeId),
    Promote(NodeId),
    /// A voter becomes a learner (through the joint configuration).
    Demote(NodeId),
    Remove(NodeId),
}

/// One step of a change, carried out by the handle in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Propose an entry of the node's own and wait until it is applied here.
    Record(Op),
    /// Propose a configuration and wait until it is committed (for a change
    /// of voters, until the final configuration is).
    Reconfigure(Reconfig),
    /// Wait until learner `id` is caught up, up to the request timeout.
    CatchUp(NodeId),
    /// Wait until member `id` holds the entry of the last `Record` and has
    /// been told it is committed.
    Settle(NodeId),
    /// Hand leadership over to the most caught-up voter, then send the
    /// request there.
    HandOver,
}

fn refuse(why: String) -> ApiError {
    ApiError::Membership(why)
}

fn role_of(m: &kythira_raft::Membership, id: NodeId) -> &'static str {
    if m.voters().contains(id) {
        "voter"
    } else if m.is_voter(id) {
        "outgoing"
    } else {
        "learner"
    }
}

/// What carrying out `change` takes, from the membership in effect
/// (`settled`: committed and not joint), the address book and the
/// addresses this node was configured with. Refuses what cannot be done,
/// naming why, before anything is proposed.
pub(crate) fn plan(
    me: NodeId,
    membership: &kythira_raft::Membership,
    settled: bool,
    book: &AddressBook,
    configured: &BTreeMap<NodeId, Addresses>,
    change: &Change,
) -> Result<Vec<Step>, ApiError> {
    if !settled {
        return Err(refuse(
            "the last change of membership is not finished yet (its configuration is joint or \
             not committed); one change at a time"
                .into(),
        ));
    }
    let members = membership.members();
    match *change {
        Change::AddLearner { id, at } => {
            if id == 0 {
                return Err(refuse("node id 0 is reserved".into()));
            }
            if members.contains(&id) {
                return Err(refuse(format!(
                    "node {id} is already a member ({})",
                    role_of(membership, id)
                )));
            }
            if let Some(index) = book.removed_at(id) {
                return Err(refuse(format!(
                    "node {id} was removed from this cluster (at index {index}); give the new \
                     node a new id"
                )));
            }
            let others: BTreeSet<NodeId> = members
                .iter()
                .copied()
                .chain(book.live().map(|(id, _)| id))
                .filter(|m| *m != id)
                .collect();
            for m in &others {
                if let Some(theirs) = addresses::lookup(*m, book, configured) {
                    for a in [at.peer, at.client] {
                        if a == theirs.peer || a == theirs.client {
                            return Err(refuse(format!("{a} is already the address of node {m}")));
                        }
                    }
                }
            }
            // Founders' addresses are in configuration files only: put them
            // in the log, so that the new node (and any later one) learns
            // them whatever its own file says.
            let mut steps: Vec<Step> = members
                .iter()
                // A founder whose removal the log recorded is out even if
                // its configuration change was cut short.
                .filter(|m| book.get(**m).is_none() && book.removed_at(**m).is_none())
                .filter_map(|m| {
                    configured.get(m).map(|a| {
                        Step::Record(Op::SetAddress {
                            id: *m,
                            peer: a.peer,
                            client: a.client,
                        })
                    })
                })
                .collect();
            steps.push(Step::Record(Op::SetAddress {
                id,
                peer: at.peer,
                client: at.client,
            }));
            steps.push(Step::Reconfigure(Reconfig::AddLearner(id)));
            Ok(steps)
        }
        Change::Promote(id) => {
            if let Some(index) = book.removed_at(id) {
                Err(refuse(format!(
                    "node {id} was removed at log index {index}; finish its removal with \
                     `members remove {id}`"
                )))
            } else if membership.is_voter(id) {
                Err(refuse(format!("node {id} is a voter already")))
            } else if !membership.is_learner(id) {
                Err(refuse(format!(
                    "node {id} is not a member; add it as a learner first"
                )))
            } else {
                Ok(vec![
                    Step::CatchUp(id),
                    Step::Reconfigure(Reconfig::Promote(id)),
                ])
            }
        }
        Change::Remove(id) => {
            if !members.contains(&id) {
                return Err(refuse(format!("node {id} is not a member")));
            }
            let retire = [
                Step::Record(Op::RemoveMember { id }),
                Step::Settle(id),
                Step::Reconfigure(Reconfig::Remove(id)),
            ];
            if !membership.is_voter(id) {
                return Ok(retire.to_vec());
            }
            if membership.voters().ids().all(|v| v == id) {
                return Err(refuse(format!(
                    "node {id} is the last voter; a cluster needs one"
                )));
            }
            if id == me {
                return Ok(vec![Step::HandOver]);
            }
            let mut steps = vec![Step::Reconfigure(Reconfig::Demote(id))];
            steps.extend(retire);
            Ok(steps)
        }
    }
}

/// What the handles and the event loop share about operations: the one
/// change this node carries out at a time, and whether it was removed.
#[derive(Default)]
pub(crate) struct Operations {
    change: Mutex<Option<String>>,
    /// Log index of the entry that removed this node; 0 while a member.
    removed_at: AtomicU64,
}

pub(crate) struct ChangeGuard<'a>(&'a Operations);

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        *self.0.change.lock().expect("lock") = None;
    }
}

impl Operations {
    /// The log index at which this node was removed, if it was.
    pub(crate) fn removed_at(&self) -> Option<u64> {
        Some(self.removed_at.load(Ordering::Acquire)).filter(|i| *i > 0)
    }

    fn begin(
        &self,
        what: String,
        refusal: fn(String) -> ApiError,
    ) -> Result<ChangeGuard<'_>, ApiError> {
        let mut current = self.change.lock().expect("lock");
        if let Some(other) = current.as_ref() {
            return Err(refusal(format!(
                "{other} is under way; one change at a time"
            )));
        }
        *current = Some(what);
        Ok(ChangeGuard(self))
    }
}

/// Requests from the handle to the event loop about the membership.
pub(super) enum MemberCommand {
    List {
        reply: oneshot::Sender<Result<Members, ApiError>>,
    },
    Plan {
        change: Change,
        reply: oneshot::Sender<Result<Vec<Step>, ApiError>>,
    },
    Reconfigure {
        change: Reconfig,
        reply: Done,
    },
    CatchUp {
        id: NodeId,
        deadline: Instant,
        reply: Done,
    },
    Settle {
        id: NodeId,
        index: u64,
        reply: Done,
    },
    /// Transfer leadership to `to`, or to the best voter if `None`; answers
    /// with the new leader and its term.
    Transfer {
        to: Option<NodeId>,
        deadline: Instant,
        reply: oneshot::Sender<Result<(NodeId, u64), ApiError>>,
    },
}

impl MemberCommand {
    /// Answers with `e` without doing anything.
    pub(super) fn refuse(self, e: ApiError) {
        match self {
            MemberCommand::List { reply } => drop(reply.send(Err(e))),
            MemberCommand::Plan { reply, .. } => drop(reply.send(Err(e))),
            MemberCommand::Reconfigure { reply, .. }
            | MemberCommand::CatchUp { reply, .. }
            | MemberCommand::Settle { reply, .. } => drop(reply.send(Err(e))),
            MemberCommand::Transfer { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

/// Where a step's completion is reported.
type Done = oneshot::Sender<Result<(), ApiError>>;

struct CatchingUp {
    id: NodeId,
    /// The commit index when the promotion was asked for.
    committed: u64,
    deadline: Instant,
    reply: Done,
}

struct Settling {
    id: NodeId,
    index: u64,
    started: u64,
    /// Tick at which the member was first seen holding the entry.
    held_since: Option<u64>,
    /// When a member that answers but lags is dropped anyway: well within
    /// the handle's own wait, so the answer reaches it.
    deadline: Instant,
    reply: Done,
}

/// A change waiting for a new leader to hear from its peers.
struct Unconfirmed {
    change: Reconfig,
    reply: Done,
}

struct Transferring {
    to: NodeId,
    deadline: Instant,
    reply: oneshot::Sender<Result<(NodeId, u64), ApiError>>,
}

/// The file in the data directory that records this node's removal. The
/// commit index is not synced on its own, so after a restart the log alone
/// may not say that the entry removing this node is committed, and nobody
/// will tell it any more.
const REMOVED_FILE: &str = "removed";

/// Records durably that this node was removed at log index `index`.
pub(crate) fn record_removal(dir: &Path, index: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = dir.join(format!("{REMOVED_FILE}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{index}")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(REMOVED_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The removal [`record_removal`] recorded under `dir`, if any.
pub(crate) fn recorded_removal(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(REMOVED_FILE)).ok()?;
    text.trim().parse().ok()
}

/// The event loop's part: waiters for steps, the peer set it last gave the
/// network, and whether this node was removed.
pub(super) struct MemberState {
    ops: std::sync::Arc<Operations>,
    data_dir: PathBuf,
    configured: BTreeMap<NodeId, Addresses>,
    heartbeat_ticks: u64,
    election_ticks: u64,
    request_timeout: Duration,
    /// Ticks since start, for the settle waits.
    ticks: u64,
    reconfiguring: Vec<(Proposal, Done)>,
    unconfirmed: Vec<Unconfirmed>,
    catching_up: Vec<CatchingUp>,
    settling: Vec<Settling>,
    transfer: Option<Transferring>,
    /// What the network was last told, and the membership it came from.
    peers: Option<(kythira_raft::Membership, BTreeMap<NodeId, SocketAddr>)>,
    pub(super) addresses: tokio::sync::watch::Receiver<AddressBook>,
    /// The index of the entry that removed this node, once applied.
    pub(super) removed_at: Option<u64>,
}

impl MemberState {
    pub(super) fn new(
        cfg: &super::NodeConfig,
        addresses: tokio::sync::watch::Receiver<AddressBook>,
        ops: std::sync::Arc<Operations>,
    ) -> Self {
        let removed_at = recorded_removal(&cfg.data_dir);
        if let Some(index) = removed_at {
            ops.removed_at.store(index, Ordering::Release);
        }
        Self {
            ops,
            data_dir: cfg.data_dir.clone(),
            configured: configured(cfg),
            heartbeat_ticks: u64::from(cfg.heartbeat_ticks),
            election_ticks: u64::from(cfg.election_ticks),
            request_timeout: cfg.request_timeout,
            ticks: 0,
            reconfiguring: Vec::new(),
            unconfirmed: Vec::new(),
            catching_up: Vec::new(),
            settling: Vec::new(),
            transfer: None,
            peers: None,
            addresses,
            removed_at,
        }
    }
}

/// The addresses in the node's configuration file.
fn configured(cfg: &super::NodeConfig) -> BTreeMap<NodeId, Addresses> {
    cfg.peer_addrs
        .iter()
        .filter_map(|(id, peer)| {
            let client = cfg.client_addrs.get(id)?.parse().ok()?;
            Some((
                *id,
                Addresses {
                    peer: *peer,
                    client,
                },
            ))
        })
        .collect()
}

fn change_error(e: MembershipChangeError) -> ApiError {
    match e {
        MembershipChangeError::NotLeader { leader } => not_leader(leader),
        MembershipChangeError::Transferring { to } => refuse(format!(
            "leadership is being transferred to node {to}; retry there"
        )),
        MembershipChangeError::Pending => {
            refuse("the last change of membership is not finished yet; one change at a time".into())
        }
        MembershipChangeError::Invalid(e) => refuse(e.to_string()),
    }
}

impl<N: Network> EventLoop<N> {
    /// Refuses a configuration change unless a majority of every voter set
    /// it involves (the current voters, the outgoing ones of a joint
    /// configuration, and the target's) was heard from within an election
    /// timeout: the joint entry needs a majority of each to commit, and one
    /// that cannot commit leaves the cluster without a leader until the
    /// missing voters return (etcd's strict reconfiguration check).
    fn alive_enough(
        &self,
        current: &kythira_raft::Membership,
        target: &kythira_raft::Membership,
    ) -> Result<(), ApiError> {
        let now = self.driver.raft().membership();
        let sets = [
            Some(now.voters()),
            now.outgoing(),
            Some(current.voters()),
            Some(target.voters()),
        ];
        for set in sets.into_iter().flatten() {
            let alive = set.ids().filter(|&id| self.heard_recently(id)).count();
            if alive < set.majority() {
                let silent: Vec<NodeId> =
                    set.ids().filter(|&id| !self.heard_recently(id)).collect();
                let all: Vec<NodeId> = set.ids().collect();
                return Err(refuse(format!(
                    "voters {silent:?} have not been heard from within {:?}, and the change \
                     needs a majority of {all:?}: it could not commit and would leave the \
                     cluster without a leader; bring them back first",
                    self.election_timeout
                )));
            }
        }
        Ok(())
    }

    /// Proposes `change` if enough voters are alive. A leader that took
    /// over less than an election timeout ago has not heard from every
    /// peer yet (a transfer or a removal of the old leader asks at once):
    /// it waits until then for answers instead of refusing.
    fn reconfigure(&mut self, change: Reconfig, reply: Done) {
        let m = self.driver.raft().membership().target();
        let target = match change {
            Reconfig::AddLearner(id) => m.with_learner(id),
            Reconfig::Promote(id) => m.with_promoted(id),
            Reconfig::Remove(id) => m.without(id),
            Reconfig::Demote(id) if m.voters().contains(id) => kythira_raft::Membership::new(
                m.voters().ids().filter(|v| *v != id),
                m.learners().chain([id]),
            ),
            Reconfig::Demote(id) => Err(MembershipError::NotAMember(id)),
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => return drop(reply.send(Err(refuse(e.to_string())))),
        };
        if let Err(e) = self.alive_enough(&m, &target) {
            let new_leader = self
                .leading_since
                .is_some_and(|since| since.elapsed() < self.election_timeout);
            if new_leader {
                self.members.unconfirmed.push(Unconfirmed { change, reply });
            } else {
                drop(reply.send(Err(e)));
            }
            return;
        }
        match self.driver.propose_membership(target).map_err(change_error) {
            Ok(p) => {
                tracing::info!(index = p.index, ?change, "membership change proposed");
                self.members.reconfiguring.push((p, reply));
            }
            Err(e) => drop(reply.send(Err(e))),
        }
    }

    pub(super) fn member_command(&mut self, c: MemberCommand) {
        if self.driver.raft().role() != Role::Leader {
            let e = not_leader(self.driver.raft().leader());
            c.refuse(e);
            return;
        }
        match c {
            MemberCommand::List { reply } => {
                let _ = reply.send(Ok(self.members_view()));
            }
            MemberCommand::Plan { change, reply } => {
                let raft = self.driver.raft();
                let m = raft.membership();
                let settled = !m.is_joint() && raft.membership_index() <= raft.log().committed();
                let book = self.members.addresses.borrow().clone();
                let steps = plan(
                    raft.id(),
                    m,
                    settled,
                    &book,
                    &self.members.configured,
                    &change,
                );
                let _ = reply.send(steps);
            }
            MemberCommand::Reconfigure { change, reply } => self.reconfigure(change, reply),
            MemberCommand::CatchUp {
                id,
                deadline,
                reply,
            } => {
                let committed = self.driver.raft().log().committed();
                self.members.catching_up.push(CatchingUp {
                    id,
                    committed,
                    deadline,
                    reply,
                });
            }
            MemberCommand::Settle { id, index, reply } => {
                self.members.settling.push(Settling {
                    id,
                    index,
                    started: self.members.ticks,
                    held_since: None,
                    deadline: Instant::now() + self.members.request_timeout / 2,
                    reply,
                });
            }
            MemberCommand::Transfer {
                to,
                deadline,
                reply,
            } => {
                if let Some(t) = &self.members.transfer {
                    let e = ApiError::Transfer(format!(
                        "a transfer to node {} is under way; one at a time",
                        t.to
                    ));
                    let _ = reply.send(Err(e));
                    return;
                }
                let raft = self.driver.raft();
                let me = raft.id();
                let Some(to) = to.or_else(|| self.successor()) else {
                    let e = ApiError::Transfer("no other voter to hand leadership to".into());
                    let _ = reply.send(Err(e));
                    return;
                };
                if to == me {
                    let _ = reply.send(Ok((me, raft.term())));
                    return;
                }
                match self.driver.transfer_leadership(to) {
                    Ok(()) => {
                        tracing::info!(to, "leadership transfer started");
                        self.members.transfer = Some(Transferring {
                            to,
                            deadline,
                            reply,
                        });
                    }
                    Err(TransferError::NotLeader { leader }) => {
                        let _ = reply.send(Err(not_leader(leader)));
                    }
                    Err(TransferError::NotAVoter(id)) => {
                        let why = if self.driver.raft().membership().contains(id) {
                            format!("node {id} is a learner; promote it first")
                        } else {
                            format!("node {id} is not a member")
                        };
                        let _ = reply.send(Err(ApiError::Transfer(why)));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(ApiError::Transfer(e.to_string())));
                    }
                }
            }
        }
    }

    /// The voter (other than this node) whose log is longest.
    fn successor(&self) -> Option<NodeId> {
        let raft = self.driver.raft();
        let me = raft.id();
        raft.membership()
            .voters()
            .ids()
            .filter(|id| *id != me)
            .max_by_key(|id| raft.progress(*id).map_or(0, |p| p.matched))
    }

    fn members_view(&self) -> Members {
        let raft = self.driver.raft();
        let m = raft.membership();
        let book = self.members.addresses.borrow();
        let last = raft.log().last_index();
        let members = m
            .members()
            .into_iter()
            .map(|id| {
                let at = addresses::lookup(id, &book, &self.members.configured);
                let matched = if id == raft.id() {
                    last
                } else {
                    raft.progress(id).map_or(0, |p| p.matched)
                };
                MemberStatus {
                    id,
                    role: role_of(m, id).to_string(),
                    peer: at.map(|a| a.peer.to_string()),
                    client: at.map(|a| a.client.to_string()),
                    matched,
                    lag: last.saturating_sub(matched),
                }
            })
            .collect();
        Members {
            leader: raft.id(),
            term: raft.term(),
            config_index: raft.membership_index(),
            committed: raft.membership_index() <= raft.log().committed(),
            joint: m.is_joint(),
            members,
        }
    }

    /// One tick passed.
    pub(super) fn members_tick(&mut self) {
        self.members.ticks += 1;
        self.advance_members();
    }

    /// Answers every waiter whose step has taken effect, failed, or run out
    /// of time; keeps the network's peer set in line with the membership.
    pub(super) fn advance_members(&mut self) {
        self.reconcile_peers();
        // Each is checked again; one still short of answers is queued again
        // until its time is up.
        for u in std::mem::take(&mut self.members.unconfirmed) {
            if self.driver.raft().role() == Role::Leader {
                self.reconfigure(u.change, u.reply);
            } else {
                let _ = u.reply.send(Err(not_leader(self.driver.raft().leader())));
            }
        }
        let raft = self.driver.raft();
        let leads = raft.role() == Role::Leader;
        let hint = raft.leader();
        let now = Instant::now();
        let committed = raft.log().committed();
        let settled = !raft.membership().is_joint() && raft.membership_index() <= committed;

        let mut i = 0;
        while i < self.members.reconfiguring.len() {
            let (p, _) = &self.members.reconfiguring[i];
            let kept = raft.log().term(p.index) == Some(p.term);
            let outcome = if !kept || !leads {
                // Committed or not, the next leader decides: the caller
                // cannot be told which.
                Some(Err(ApiError::Outcome))
            } else if committed >= p.index && settled {
                Some(Ok(()))
            } else {
                None
            };
            match outcome {
                Some(o) => {
                    let (p, reply) = self.members.reconfiguring.swap_remove(i);
                    if o.is_ok() {
                        tracing::info!(index = p.index, "membership change committed");
                    }
                    let _ = reply.send(o);
                }
                None => i += 1,
            }
        }

        let mut i = 0;
        while i < self.members.catching_up.len() {
            let CatchingUp {
                id,
                committed,
                deadline,
                ..
            } = self.members.catching_up[i];
            let outcome = if !leads {
                Some(Err(not_leader(hint)))
            } else if !raft.membership().is_learner(id) {
                Some(Err(refuse(format!("node {id} is no longer a learner"))))
            } else {
                let last = raft.log().last_index();
                let matched = raft.progress(id).map_or(0, |p| p.matched);
                let lag = last.saturating_sub(matched);
                if matched >= committed && lag <= CAUGHT_UP_LAG {
                    Some(Ok(()))
                } else if now >= deadline {
                    Some(Err(refuse(format!(
                        "learner {id} is {lag} entries behind the leader (it holds {matched} of \
                         {last}) and did not catch up within {:?}; promote it once it has",
                        self.members.request_timeout
                    ))))
                } else {
                    None
                }
            };
            match outcome {
                Some(o) => {
                    let c = self.members.catching_up.swap_remove(i);
                    let _ = c.reply.send(o);
                }
                None => i += 1,
            }
        }

        let ticks = self.members.ticks;
        let (heartbeat, election) = (self.members.heartbeat_ticks, self.members.election_ticks);
        let now = Instant::now();
        let alive: Vec<NodeId> = self
            .members
            .settling
            .iter()
            .map(|s| s.id)
            .filter(|&id| self.answered_recently(id))
            .collect();
        let mut i = 0;
        while i < self.members.settling.len() {
            let s = &mut self.members.settling[i];
            let outcome = if !leads {
                Some(Err(not_leader(hint)))
            } else {
                match raft.progress(s.id) {
                    None => Some(Ok(())),
                    Some(p) => {
                        if p.matched >= s.index && s.held_since.is_none() {
                            s.held_since = Some(ticks);
                        }
                        // A heartbeat leaves every `heartbeat` ticks and
                        // tells it the entry is committed.
                        let told = s.held_since.is_some_and(|t| ticks > t + heartbeat);
                        // A member that does not answer is dropped after two
                        // election timeouts; one that answers but lags (it
                        // is catching up) is waited for, up to the request
                        // timeout, so that it learns it was removed.
                        let waited = ticks.saturating_sub(s.started);
                        let silent = !alive.contains(&s.id);
                        (told || (silent && waited >= 2 * election) || now >= s.deadline)
                            .then_some(Ok(()))
                    }
                }
            };
            match outcome {
                Some(o) => {
                    let s = self.members.settling.swap_remove(i);
                    if s.held_since.is_none() && o.is_ok() {
                        tracing::warn!(
                            node = s.id,
                            "a member being removed did not acknowledge its removal; dropping it"
                        );
                    }
                    let _ = s.reply.send(o);
                }
                None => i += 1,
            }
        }

        if let Some(t) = &self.members.transfer {
            let outcome = match (raft.role(), raft.leader()) {
                (_, Some(l)) if l == t.to => Some(Ok((t.to, raft.term()))),
                (Role::Leader, _) if raft.transfer_target() != Some(t.to) => {
                    let matched = raft.progress(t.to).map_or(0, |p| p.matched);
                    let lag = raft.log().last_index().saturating_sub(matched);
                    Some(Err(ApiError::Transfer(format!(
                        "node {} did not catch up within an election timeout ({lag} entries \
                         behind); this node still leads",
                        t.to
                    ))))
                }
                (_, Some(other)) if other != raft.id() => Some(Err(ApiError::Transfer(format!(
                    "node {other} leads instead of node {}",
                    t.to
                )))),
                _ if now >= t.deadline => Some(Err(ApiError::Transfer(format!(
                    "node {} did not take over within {:?}",
                    t.to, self.members.request_timeout
                )))),
                _ => None,
            };
            if let Some(o) = outcome {
                let t = self.members.transfer.take().expect("checked");
                match &o {
                    Ok((leader, term)) => tracing::info!(leader, term, "leadership transferred"),
                    Err(e) => tracing::warn!(to = t.to, "leadership transfer failed: {e}"),
                }
                let _ = t.reply.send(o);
            }
        }
    }

    /// Tells the network the peers it should keep: the members of the
    /// configuration in effect and the nodes the log gave addresses to.
    fn reconcile_peers(&mut self) {
        let raft = self.driver.raft();
        if self
            .members
            .peers
            .as_ref()
            .is_some_and(|(m, _)| m == raft.membership())
        {
            return;
        }
        self.refresh_peers();
    }

    fn refresh_peers(&mut self) {
        let raft = self.driver.raft();
        let membership = raft.membership().clone();
        let peers = addresses::peers(
            raft.id(),
            &membership.members(),
            &self.members.addresses.borrow(),
            &self.members.configured,
        );
        if self.members.peers.as_ref().is_none_or(|(_, p)| *p != peers) {
            tracing::debug!(?peers, "peer set");
            self.net.set_peers(&peers);
        }
        self.members.peers = Some((membership, peers));
    }

    /// The address book changed: new peers, and perhaps this node's removal.
    pub(super) fn addresses_changed(&mut self) {
        let removed = self
            .members
            .addresses
            .borrow_and_update()
            .removed_at(self.driver.raft().id());
        self.refresh_peers();
        if let Some(index) = removed {
            if let Err(e) = record_removal(&self.members.data_dir, index) {
                tracing::error!(
                    "cannot record this node's removal in {}: {e}; after a restart it may wait \
                     for a leader forever instead of saying it was removed",
                    self.members.data_dir.display()
                );
            }
            self.members.ops.removed_at.store(index, Ordering::Release);
            self.members.removed_at = Some(index);
        }
    }

    /// This node was removed: it takes no further part in the cluster (no
    /// ticks, no messages, no peers) and answers every request with that,
    /// its status included, until the process stops.
    pub(super) async fn serve_removed(
        mut self,
        index: u64,
        mut commands: tokio::sync::mpsc::Receiver<Command>,
    ) -> Result<(), crate::NodeError> {
        let id = self.driver.raft().id();
        tracing::warn!(
            node = id,
            index,
            "this node was removed from the cluster (log index {index}); it stops taking part \
             and answers every request with that"
        );
        self.net.set_peers(&BTreeMap::new());
        let e = removed_error(id, index);
        for (_, (_, _, reply)) in self.reads.drain() {
            let _ = reply.send(Err(e.clone()));
        }
        self.fail_member_waiters(&e);
        self.applier.send(crate::applier::Work::Abandon)?;
        while let Some(c) = commands.recv().await {
            match c {
                // What it last knew, under the role "removed".
                c @ Command::Status { .. } => self.command(c)?,
                Command::Propose { reply, .. } => drop(reply.send(Err(e.clone()))),
                Command::Read { reply, .. } => drop(reply.send(Err(e.clone()))),
                Command::Members(m) => m.refuse(e.clone()),
                // Nothing to hand over or flush: stop at once.
                Command::Shutdown { reply } => {
                    let _ = reply.send(None);
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn fail_member_waiters(&mut self, e: &ApiError) {
        for (_, reply) in self.members.reconfiguring.drain(..) {
            let _ = reply.send(Err(e.clone()));
        }
        for u in self.members.unconfirmed.drain(..) {
            let _ = u.reply.send(Err(e.clone()));
        }
        for c in self.members.catching_up.drain(..) {
            let _ = c.reply.send(Err(e.clone()));
        }
        for s in self.members.settling.drain(..) {
            let _ = s.reply.send(Err(e.clone()));
        }
        if let Some(t) = self.members.transfer.take() {
            let _ = t.reply.send(Err(e.clone()));
        }
    }
}

/// What a removed node answers. `Unavailable`, which clients retry at
/// another node.
pub(crate) fn removed_error(id: NodeId, index: u64) -> ApiError {
    ApiError::Unavailable(format!(
        "node {id} was removed from the cluster (at log index {index}) and serves nothing; \
         ask another member"
    ))
}

impl NodeHandle {
    /// Answers a request that changes the membership or the leadership, or
    /// lists the members.
    pub(super) async fn operate(&self, request: Request) -> Reply {
        match request {
            Request::Members => self.members_now().await.map(Response::Members),
            Request::TransferLeadership { to } => {
                let _guard = self.changes.begin(
                    format!("transferring leadership to node {to}"),
                    ApiError::Transfer,
                )?;
                let (leader, term) = self.transfer_to(Some(to)).await?;
                Ok(Response::Transferred { leader, term })
            }
            change => {
                let change = Change::from_request(change)?;
                let _guard = self.changes.begin(change.describe(), refuse)?;
                let steps = self
                    .member_step(|reply| MemberCommand::Plan { change, reply })
                    .await?;
                let mut recorded = None;
                for step in steps {
                    match step {
                        Step::Record(op) => match self.propose(op).await? {
                            Response::Applied { index, .. } => recorded = Some(index),
                            other => {
                                return Err(ApiError::Internal(format!(
                                    "unexpected answer to an address entry: {other:?}"
                                )));
                            }
                        },
                        Step::Reconfigure(change) => {
                            self.member_step(|reply| MemberCommand::Reconfigure { change, reply })
                                .await?
                        }
                        Step::CatchUp(id) => {
                            let deadline = Instant::now() + self.cfg.request_timeout;
                            self.member_step(|reply| MemberCommand::CatchUp {
                                id,
                                deadline,
                                reply,
                            })
                            .await?
                        }
                        Step::Settle(id) => {
                            let index = recorded.expect("a settle follows a record");
                            self.member_step(|reply| MemberCommand::Settle { id, index, reply })
                                .await?
                        }
                        Step::HandOver => {
                            let (leader, _) = self.transfer_to(None).await?;
                            // The new leader removes this node; the client
                            // follows the redirect with the same request.
                            return Err(not_leader(Some(leader)));
                        }
                    }
                }
                self.members_now().await.map(Response::Members)
            }
        }
    }

    async fn members_now(&self) -> Result<Members, ApiError> {
        self.member_step(|reply| MemberCommand::List { reply })
            .await
    }

    async fn transfer_to(&self, to: Option<NodeId>) -> Result<(NodeId, u64), ApiError> {
        let deadline = Instant::now() + self.cfg.request_timeout;
        self.member_step(|reply| MemberCommand::Transfer {
            to,
            deadline,
            reply,
        })
        .await
    }

    /// Sends one step to the event loop and waits for its answer. The loop
    /// answers every step by its deadline; the timeout here is a safety net.
    async fn member_step<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, ApiError>>) -> MemberCommand,
    ) -> Result<T, ApiError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Members(command(reply)))?;
        let limit = self.cfg.request_timeout + self.cfg.tick * 4;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::Outcome),
            Err(_) => Err(ApiError::Timeout),
        }
    }

    /// The client address of node `id`: the log's, else the configured one.
    pub(super) fn client_addr(&self, id: NodeId) -> Option<String> {
        self.shared()
            .addresses
            .borrow()
            .get(id)
            .map(|a| a.client.to_string())
            .or_else(|| self.cfg.client_addrs.get(&id).cloned())
    }

    /// The log index at which this node was removed, if it was.
    pub(super) fn removed_at(&self) -> Option<u64> {
        self.changes.removed_at()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_raft::Membership;

    fn at(n: u16) -> Addresses {
        Addresses {
            peer: SocketAddr::from(([127, 0, 0, 1], 7100 + n)),
            client: SocketAddr::from(([127, 0, 0, 1], 7000 + n)),
        }
    }

    fn conf() -> BTreeMap<NodeId, Addresses> {
        (1..=3).map(|id| (id, at(id as u16))).collect()
    }

    fn m(voters: &[NodeId], learners: &[NodeId]) -> Membership {
        Membership::new(voters.iter().copied(), learners.iter().copied()).unwrap()
    }

    fn err(r: Result<Vec<Step>, ApiError>) -> String {
        match r {
            Err(ApiError::Membership(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn adding_a_learner_records_every_address_first() {
        let book = AddressBook::default();
        let add = Change::AddLearner { id: 4, at: at(4) };
        let steps = plan(1, &m(&[1, 2, 3], &[]), true, &book, &conf(), &add).unwrap();
        let ids: Vec<NodeId> = steps
            .iter()
            .filter_map(|s| match s {
                Step::Record(Op::SetAddress { id, .. }) => Some(*id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, [1, 2, 3, 4], "founders first, then the new node");
        assert_eq!(
            steps.last(),
            Some(&Step::Reconfigure(Reconfig::AddLearner(4)))
        );
        // Once the log has the founders, only the new node is recorded.
        let mut book = AddressBook::default();
        for id in 1..=3 {
            book.set(id, at(id as u16)).unwrap();
        }
        let steps = plan(1, &m(&[1, 2, 3], &[]), true, &book, &conf(), &add).unwrap();
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn bad_additions_are_refused_with_the_reason() {
        let book = AddressBook::default();
        let members = m(&[1, 2, 3], &[5]);
        let add = |id, a| Change::AddLearner { id, at: a };
        let e = err(plan(1, &members, true, &book, &conf(), &add(2, at(9))));
        assert!(e.contains("node 2 is already a member (voter)"), "{e}");
        let e = err(plan(1, &members, true, &book, &conf(), &add(5, at(9))));
        assert!(e.contains("(learner)"), "{e}");
        let e = err(plan(1, &members, true, &book, &conf(), &add(0, at(9))));
        assert!(e.contains("reserved"), "{e}");
        let taken = Addresses {
            peer: at(9).peer,
            client: at(3).client,
        };
        let e = err(plan(1, &members, true, &book, &conf(), &add(4, taken)));
        assert!(e.contains("already the address of node 3"), "{e}");
        let mut removed = AddressBook::default();
        removed.remove(7, 40);
        let e = err(plan(1, &members, true, &removed, &conf(), &add(7, at(7))));
        assert!(e.contains("was removed") && e.contains("new id"), "{e}");
        let e = err(plan(1, &members, false, &book, &conf(), &add(4, at(4))));
        assert!(e.contains("one change at a time"), "{e}");
    }

    #[test]
    fn promotion_waits_for_the_learner_to_catch_up() {
        let book = AddressBook::default();
        let members = m(&[1, 2, 3], &[4]);
        assert_eq!(
            plan(1, &members, true, &book, &conf(), &Change::Promote(4)).unwrap(),
            [Step::CatchUp(4), Step::Reconfigure(Reconfig::Promote(4))]
        );
        let e = err(plan(1, &members, true, &book, &conf(), &Change::Promote(2)));
        assert!(e.contains("voter already"), "{e}");
        let e = err(plan(1, &members, true, &book, &conf(), &Change::Promote(9)));
        assert!(e.contains("not a member"), "{e}");
    }

    #[test]
    fn removal_demotes_tells_waits_and_drops() {
        let book = AddressBook::default();
        let members = m(&[1, 2, 3], &[4]);
        let remove = |id| plan(1, &members, true, &book, &conf(), &Change::Remove(id));
        assert_eq!(
            remove(3).unwrap(),
            [
                Step::Reconfigure(Reconfig::Demote(3)),
                Step::Record(Op::RemoveMember { id: 3 }),
                Step::Settle(3),
                Step::Reconfigure(Reconfig::Remove(3)),
            ]
        );
        // A learner needs no demotion.
        assert_eq!(remove(4).unwrap().len(), 3);
        // The leader hands over first.
        assert_eq!(remove(1).unwrap(), [Step::HandOver]);
        let e = err(remove(9));
        assert!(e.contains("node 9 is not a member"), "{e}");
        let alone = m(&[1], &[4]);
        let e = err(plan(1, &alone, true, &book, &conf(), &Change::Remove(1)));
        assert!(e.contains("last voter"), "{e}");
    }

    #[test]
    fn a_removal_is_recorded_durably() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(recorded_removal(dir.path()), None);
        record_removal(dir.path(), 812).unwrap();
        assert_eq!(recorded_removal(dir.path()), Some(812));
    }

    #[test]
    fn one_change_at_a_time() {
        let lock = Operations::default();
        let first = lock.begin("promoting node 4".into(), refuse).unwrap();
        match lock.begin("removing node 2".into(), refuse) {
            Err(ApiError::Membership(why)) => {
                assert!(why.contains("promoting node 4 is under way"), "{why}")
            }
            _ => panic!("a second change went ahead"),
        }
        drop(first);
        assert!(lock.begin("removing node 2".into(), refuse).is_ok());
    }

    #[test]
    fn addresses_are_checked_before_anything_is_proposed() {
        let bad = Request::AddLearner {
            id: 4,
            peer: "nowhere".into(),
            client: "127.0.0.1:1".into(),
        };
        assert!(matches!(
            Change::from_request(bad),
            Err(ApiError::BadRequest(why)) if why.contains("peer address")
        ));
        let same = Request::AddLearner {
            id: 4,
            peer: "127.0.0.1:1".into(),
            client: "127.0.0.1:1".into(),
        };
        assert!(Change::from_request(same).is_err());
    }
}
