//! A running hash of every event a run handles, so that a replay can be
//! compared with the original event by event, not only by its totals.

use kythira_raft::{AppendOutcome, MessageBody};

use super::Event;
use crate::profile::Micros;

/// SplitMix64's finalizer: a cheap, well-mixing step.
fn step(h: u64, x: u64) -> u64 {
    let mut z = h ^ x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fold(h: u64, xs: &[u64]) -> u64 {
    xs.iter().fold(h, |h, &x| step(h, x))
}

/// `trace` extended by `event` handled at `at`.
pub(super) fn mix(trace: u64, at: Micros, event: &Event) -> u64 {
    let h = step(trace, at);
    match event {
        Event::Tick { node, incarnation } => fold(h, &[1, *node as u64, *incarnation]),
        Event::Deliver(m, _) => {
            let h = fold(h, &[2, m.from, m.to, m.term]);
            match &m.body {
                MessageBody::PreVote {
                    last_index,
                    last_term,
                } => fold(h, &[1, *last_index, *last_term]),
                MessageBody::PreVoteResponse { granted } => fold(h, &[2, u64::from(*granted)]),
                MessageBody::Vote {
                    last_index,
                    last_term,
                    transfer,
                } => fold(h, &[3, *last_index, *last_term, u64::from(*transfer)]),
                MessageBody::VoteResponse { granted } => fold(h, &[4, u64::from(*granted)]),
                MessageBody::Append {
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                } => {
                    let h = fold(h, &[5, *prev_index, *prev_term, *commit]);
                    entries.iter().fold(h, |h, e| {
                        let data = e.data.iter().fold(0u64, |a, &b| step(a, u64::from(b)));
                        fold(h, &[e.index, e.term, data])
                    })
                }
                MessageBody::AppendResponse(AppendOutcome::Accepted { last_index }) => {
                    fold(h, &[6, *last_index])
                }
                MessageBody::AppendResponse(AppendOutcome::Rejected {
                    prev_index,
                    hint_index,
                    hint_term,
                }) => fold(h, &[7, *prev_index, *hint_index, *hint_term]),
                MessageBody::Heartbeat { commit, read_round } => {
                    fold(h, &[8, *commit, *read_round])
                }
                MessageBody::HeartbeatResponse { read_round } => fold(h, &[9, *read_round]),
                MessageBody::TimeoutNow => fold(h, &[10]),
                MessageBody::Snapshot { meta } => fold(h, &[13, meta.index, meta.term]),
                MessageBody::ReadIndexRequest { ctx } => fold(h, &[11, *ctx]),
                MessageBody::ReadIndexResponse { ctx, index } => fold(h, &[12, *ctx, *index]),
            }
        }
        Event::Persisted { node, write } => fold(h, &[3, *node as u64, *write]),
        Event::SnapshotReport {
            leader,
            incarnation,
            to,
            delivered,
        } => fold(
            h,
            &[14, *leader as u64, *incarnation, *to, u64::from(*delivered)],
        ),
        Event::Restart { node, incarnation } => fold(h, &[4, *node as u64, *incarnation]),
        Event::Crash { node, incarnation } => fold(h, &[5, *node as u64, *incarnation]),
        Event::ClientAct { client } => fold(h, &[6, *client as u64]),
        Event::ClientTimeout {
            client,
            op,
            attempt,
        } => fold(h, &[7, *client as u64, *op as u64, u64::from(*attempt)]),
        Event::LoadAct { proposer } => fold(h, &[8, *proposer as u64]),
        Event::Fault { phase } => fold(h, &[9, u64::from(*phase)]),
        Event::Heal { phase } => fold(h, &[10, u64::from(*phase)]),
        Event::CheckLeader { phase, again } => fold(h, &[11, u64::from(*phase), u64::from(*again)]),
        Event::Drain { phase } => fold(h, &[12, u64::from(*phase)]),
        Event::QuietCheck { phase } => fold(h, &[13, u64::from(*phase)]),
    }
}
