//! Random kv histories that are linearizable by construction.
//!
//! Each operation gets a linearization point inside its interval; applying
//! the operations to a real map in the order of those points yields the
//! outputs. Pending operations either take effect at their point or not at
//! all; their client either stops (it waits for each reply) or gives up at
//! the end of the interval and carries on.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::KvOp;
use kythira_linearizability::Operation;
use kythira_linearizability::kv::{KvInput, KvOutput};

/// Shape of the generated histories.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub clients: u64,
    pub keys: u64,
    pub values: u64,
    pub min_ops: usize,
    pub max_ops: usize,
    /// One global clock: no two operations overlap.
    pub sequential: bool,
    /// A client whose operation is pending issues more operations (it gave
    /// up waiting); otherwise it issues nothing more.
    pub resume_after_pending: bool,
    /// Probability that an operation never completes.
    pub pending: f64,
}

#[derive(Clone, Debug)]
pub struct OpSpec {
    client: u64,
    key: u64,
    put: Option<u64>,
    gap: u64,
    duration: u64,
    /// Fraction of the interval, in 1/16ths, at which the operation takes effect.
    point: u64,
    pending: bool,
    took_effect: bool,
}

fn op_spec(shape: Shape) -> impl Strategy<Value = OpSpec> {
    (
        0..shape.clients,
        0..shape.keys,
        prop::option::weighted(0.5, 0..shape.values),
        0..4u64,
        0..12u64,
        0..=16u64,
        prop::bool::weighted(shape.pending),
        any::<bool>(),
    )
        .prop_map(
            |(client, key, put, gap, duration, point, pending, took_effect)| OpSpec {
                client,
                key,
                put,
                gap,
                duration,
                point,
                pending,
                took_effect,
            },
        )
}

pub fn specs(shape: Shape) -> impl Strategy<Value = Vec<OpSpec>> {
    prop::collection::vec(op_spec(shape), shape.min_ops..=shape.max_ops)
}

/// Builds the history the specs describe, with outputs from a real map.
pub fn linearizable_history(specs: &[OpSpec], shape: Shape) -> Vec<KvOp> {
    let mut clock: BTreeMap<u64, u64> = BTreeMap::new();
    let mut stopped: Vec<u64> = Vec::new();
    // (linearization point, history index)
    let mut points: Vec<(u64, usize)> = Vec::new();
    let mut history: Vec<KvOp> = Vec::new();
    for spec in specs {
        if stopped.contains(&spec.client) {
            continue;
        }
        let clock_key = if shape.sequential { 0 } else { spec.client };
        let now = clock.entry(clock_key).or_insert(0);
        let call = *now + spec.gap;
        let ret = call + spec.duration;
        // Strictly after the reply, so a client's operations never overlap.
        *now = ret + 1;
        let input = match spec.put {
            Some(value) => KvInput::Put {
                key: spec.key,
                value,
            },
            None => KvInput::Get { key: spec.key },
        };
        let index = history.len();
        if spec.pending {
            if !shape.resume_after_pending {
                stopped.push(spec.client);
            }
            if spec.took_effect {
                points.push((call + spec.duration * spec.point / 16, index));
            }
        } else {
            points.push((call + spec.duration * spec.point / 16, index));
        }
        history.push(Operation {
            client: spec.client,
            input,
            call,
            output: None,
            ret: (!spec.pending).then_some(ret),
        });
    }
    points.sort_unstable();
    let mut map: BTreeMap<u64, u64> = BTreeMap::new();
    for (_, index) in points {
        let op = &mut history[index];
        let output = match op.input {
            KvInput::Get { key } => KvOutput::Get(map.get(&key).copied()),
            KvInput::Put { key, value } => {
                map.insert(key, value);
                KvOutput::Put
            }
        };
        if op.ret.is_some() {
            op.output = Some(output);
        }
    }
    history
}
