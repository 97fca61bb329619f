//! Two runtimes fed the same log end in the same place, and so does the same
//! logic run natively; large states survive a snapshot round trip.

mod support;

use kythira_guest::Raw;
use kythira_guest::codec::encode;
use kythira_plugin_kv::{Command as Kv, KvStore, Scan};
use kythira_runtime::{ApplyContext, CallError, Limits};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use support::{runtime, runtime_with, start, test_limits};

fn random_command(rng: &mut SmallRng) -> Kv {
    // A small key space so that gets, deletes and swaps hit existing keys.
    let mut key = || format!("k{:02}", rng.random_range(0..64)).into_bytes();
    let key = key();
    let value = |rng: &mut SmallRng| {
        let len = rng.random_range(0..24);
        (0..len).map(|_| rng.random()).collect::<Vec<u8>>()
    };
    match rng.random_range(0..10) {
        0..=3 => Kv::Put {
            key,
            value: value(rng),
        },
        4 | 5 => Kv::Get { key },
        6 => Kv::Delete { key },
        7 | 8 => Kv::CompareAndSwap {
            key,
            expected: rng.random_bool(0.5).then(|| value(rng)),
            new: rng.random_bool(0.8).then(|| value(rng)),
        },
        _ => Kv::Scan(Scan {
            prefix: vec![b'k', b'0' + rng.random_range(0..7)],
            start_after: None,
            limit: rng.random_range(0..8),
        }),
    }
}

#[test]
fn same_log_gives_identical_results_and_state_everywhere() {
    const COMMANDS: u64 = 10_000;
    let (first_runtime, second_runtime) = (runtime(), runtime());
    let mut first = start(&first_runtime, "kv");
    let mut second = start(&second_runtime, "kv");
    let mut native = Raw::<KvStore>::new();
    let mut rng = SmallRng::seed_from_u64(0x006b_7974_6869_7261);
    for index in 1..=COMMANDS {
        let command = encode(&random_command(&mut rng)).unwrap();
        let ctx = ApplyContext {
            index,
            term: 1 + index / 1000,
            timestamp_ms: 1_700_000_000_000 + index * 3,
        };
        let a = first.apply(ctx, &command);
        let b = second.apply(ctx, &command);
        assert_eq!(a.result, b.result, "index {index}");
        assert_eq!(a.fuel_used, b.fuel_used, "fuel differs at index {index}");
        let native_ctx = kythira_guest::ApplyContext {
            index,
            term: ctx.term,
            timestamp_ms: ctx.timestamp_ms,
        };
        let expected = native
            .apply(&native_ctx, &command)
            .map(bytes::Bytes::from)
            .map_err(CallError::Plugin);
        assert_eq!(
            a.result, expected,
            "component and native logic differ at index {index}"
        );
    }
    let state = first.get_state().result.unwrap();
    assert_eq!(state, second.get_state().result.unwrap());
    assert_eq!(state, native.get_state().unwrap());
}

#[test]
fn batches_give_the_outcomes_of_one_by_one() {
    let (index, _) = batches_match_one_by_one(test_limits(), 5_000);
    assert_eq!(index, 5_000, "checkpoints every 1,000 indexes");
}

#[test]
fn batches_give_the_outcomes_of_one_by_one_with_checkpoints_by_size() {
    // About every 80 entries, wherever the commands' sizes put it.
    let limits = Limits {
        checkpoint_bytes: 1_500,
        ..test_limits()
    };
    let (index, state) = batches_match_one_by_one(limits, 4_990);
    assert!(index > 4_800 && index < 4_990, "{index}");
    assert!(state.is_some());
}

/// Applies the same random log one by one and in random batches; outcomes,
/// states and checkpoints must not depend on how it was batched, as replicas
/// batch differently (whatever committed together). Returns the last
/// checkpoint.
fn batches_match_one_by_one(limits: Limits, entries: u64) -> (u64, Option<std::sync::Arc<[u8]>>) {
    let runtime = runtime_with(limits);
    let mut single = start(&runtime, "kv");
    let mut batched = start(&runtime, "kv");
    let mut rng = SmallRng::seed_from_u64(11);
    let log: Vec<(ApplyContext, Vec<u8>)> = (1..=entries)
        .map(|index| {
            let ctx = ApplyContext {
                index,
                term: 1,
                timestamp_ms: index,
            };
            (ctx, encode(&random_command(&mut rng)).unwrap())
        })
        .collect();
    let expected: Vec<_> = log
        .iter()
        .map(|(ctx, command)| single.apply(*ctx, command).result)
        .collect();
    let mut got = Vec::new();
    let mut rest = log.as_slice();
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rng.random_range(1..=300).min(rest.len()));
        let entries: Vec<(ApplyContext, &[u8])> =
            chunk.iter().map(|(ctx, c)| (*ctx, c.as_slice())).collect();
        got.extend(batched.apply_batch(&entries).into_iter().map(|o| o.result));
        rest = tail;
    }
    assert_eq!(got, expected);
    assert_eq!(single.checkpoint(), batched.checkpoint());
    assert_eq!(
        single.get_state().result.unwrap(),
        batched.get_state().result.unwrap()
    );
    single.checkpoint()
}

#[test]
fn a_failing_entry_in_a_batch_fails_alone() {
    use kythira_testing_looper::Command;
    let runtime = runtime();
    let mut m = start(&runtime, "looper");
    let increment = encode(&Command::Increment).unwrap();
    let looping = encode(&Command::Loop).unwrap();
    let entries: Vec<(ApplyContext, &[u8])> = (1..=9)
        .map(|index| {
            let ctx = ApplyContext {
                index,
                term: 1,
                timestamp_ms: index,
            };
            (
                ctx,
                if index == 5 {
                    &looping[..]
                } else {
                    &increment[..]
                },
            )
        })
        .collect();
    let outcomes = m.apply_batch(&entries);
    let counts: Vec<_> = outcomes
        .iter()
        .map(|o| {
            o.result
                .clone()
                .map(|r| kythira_guest::codec::decode::<u64>(&r).unwrap())
        })
        .collect();
    let budget = support::test_limits().apply_fuel;
    assert_eq!(
        counts,
        vec![
            Ok(1),
            Ok(2),
            Ok(3),
            Ok(4),
            Err(CallError::FuelExhausted { budget }),
            Ok(5),
            Ok(6),
            Ok(7),
            Ok(8)
        ]
    );
}

#[test]
fn local_calls_do_not_change_replicated_outcomes() {
    // Replica `a` only applies; replica `b` also serves queries and snapshots
    // in between, which changes its guest heap. Results, states and
    // checkpoints must still agree.
    let runtime = runtime();
    let mut a = start(&runtime, "kv");
    let mut b = start(&runtime, "kv");
    let mut rng = SmallRng::seed_from_u64(7);
    let query = encode(&kythira_plugin_kv::Query::Scan(Scan {
        prefix: b"k".to_vec(),
        start_after: None,
        limit: 100,
    }))
    .unwrap();
    for index in 1..=3_000 {
        let command = encode(&random_command(&mut rng)).unwrap();
        let ctx = ApplyContext {
            index,
            term: 1,
            timestamp_ms: index,
        };
        if index % 7 == 3 {
            b.query(&query).result.unwrap();
        }
        if index % 251 == 0 {
            b.get_state().result.unwrap();
        }
        assert_eq!(
            a.apply(ctx, &command).result,
            b.apply(ctx, &command).result,
            "index {index}"
        );
    }
    assert_eq!(a.get_state().result.unwrap(), b.get_state().result.unwrap());
    assert_eq!(a.checkpoint(), b.checkpoint());
    assert_eq!(a.checkpoint().0, 3_000);
}

/// Puts 1,000 keys into two fresh kv machines, identically.
fn two_kv_replicas_with_1000_keys(
    runtime: &kythira_runtime::Runtime,
) -> [kythira_runtime::Machine; 2] {
    [start(runtime, "kv"), start(runtime, "kv")].map(|mut m| {
        for i in 1..=1_000u64 {
            let put = Kv::Put {
                key: format!("k{i:04}").into_bytes(),
                value: i.to_le_bytes().to_vec(),
            };
            let ctx = ApplyContext {
                index: i,
                term: 1,
                timestamp_ms: i,
            };
            m.apply(ctx, &encode(&put).unwrap()).result.unwrap();
        }
        m
    })
}

/// The entry after [`two_kv_replicas_with_1000_keys`]: a scan of all keys.
fn scan_after_1000_keys() -> (ApplyContext, Vec<u8>) {
    let ctx = ApplyContext {
        index: 1_001,
        term: 1,
        timestamp_ms: 1_001,
    };
    (ctx, encode(&Kv::Scan(scan_all())).unwrap())
}

fn scan_all() -> Scan {
    Scan {
        prefix: b"k".to_vec(),
        start_after: None,
        limit: 1_000,
    }
}

/// The near-limit rule assumes that calls which are not replicated change
/// what an apply costs by far less than a quarter of the budget. A query that
/// allocates and frees 2,000 small blocks leaves the guest allocator's
/// caches warm; an apply that allocates as many must then cost nearly the
/// same as on a replica that made no query (about 60,000 units apart, where
/// a cache bounded at 1 MiB instead of 4 KiB let them drift 157,000 apart).
#[test]
fn a_query_barely_changes_what_the_next_apply_costs() {
    let runtime = runtime();
    let [mut quiet, mut queried] = two_kv_replicas_with_1000_keys(&runtime);
    let query = encode(&kythira_plugin_kv::Query::Scan(scan_all())).unwrap();
    queried.query(&query).result.unwrap();
    let (ctx, scan) = scan_after_1000_keys();
    let a = quiet.apply(ctx, &scan);
    let b = queried.apply(ctx, &scan);
    assert_eq!(a.result, b.result);
    let difference = a.fuel_used.abs_diff(b.fuel_used);
    assert!(
        difference < 100_000,
        "a query changed the next apply's fuel by {difference} ({} against {})",
        a.fuel_used,
        b.fuel_used
    );
}

/// A batch is kept when it used under three quarters of one entry's budget,
/// which is sound only if an entry alone costs no more than inside a batch,
/// plus the cost of a call itself; here with a large response to encode.
#[test]
fn an_entry_alone_costs_no_more_than_in_a_batch() {
    let runtime = runtime();
    let [mut alone, mut batched] = two_kv_replicas_with_1000_keys(&runtime);
    let (ctx, scan) = scan_after_1000_keys();
    let single = alone.apply(ctx, &scan);
    let batch = batched.apply_batch(&[(ctx, &scan)]).remove(0);
    assert_eq!(single.result, batch.result);
    assert!(
        single.fuel_used <= batch.fuel_used + 5_000,
        "alone {} against {} in a batch",
        single.fuel_used,
        batch.fuel_used
    );
}

#[test]
fn a_100_mb_state_restores() {
    // 100 values of 1 MiB, built natively and encoded the way the plugin does.
    let mut native = Raw::<KvStore>::new();
    for i in 0..100u64 {
        let command = encode(&Kv::Put {
            key: format!("blob{i:03}").into_bytes(),
            value: vec![(i % 251) as u8; 1 << 20],
        })
        .unwrap();
        let ctx = kythira_guest::ApplyContext {
            index: i + 1,
            term: 1,
            timestamp_ms: 0,
        };
        native.apply(&ctx, &command).unwrap();
    }
    let state = native.get_state().unwrap();
    assert!(state.len() > 100 << 20);

    let runtime = runtime_with(Limits {
        memory_bytes: 1 << 30,
        snapshot_fuel: Limits::default().snapshot_fuel,
        ..test_limits()
    });
    let mut m = start(&runtime, "kv");
    let restored = m.restore(&state, 100);
    restored.result.unwrap();
    assert!(restored.fuel_used > 0);
    assert_eq!(m.get_state().result.unwrap(), state);
}

#[test]
fn restoring_more_than_the_memory_limit_fails_cleanly() {
    let mut native = Raw::<KvStore>::new();
    let command = encode(&Kv::Put {
        key: b"big".to_vec(),
        value: vec![7; 8 << 20],
    })
    .unwrap();
    let ctx = kythira_guest::ApplyContext {
        index: 1,
        term: 1,
        timestamp_ms: 0,
    };
    native.apply(&ctx, &command).unwrap();
    let state = native.get_state().unwrap();

    let runtime = runtime_with(Limits {
        memory_bytes: 4 << 20,
        ..test_limits()
    });
    let mut m = start(&runtime, "kv");
    let before = m.get_state().result.unwrap();
    let err = m.restore(&state, 1).result.unwrap_err();
    assert_eq!(err, CallError::MemoryLimit { limit: 4 << 20 });
    assert_eq!(m.get_state().result.unwrap(), before);
}
