//! Calls through the built components: every kv command, each misbehaving
//! plugin's specific error with the state unchanged afterwards, rollback across
//! checkpoints, upgrades.

mod support;

use kythira_guest::codec::{decode, encode};
use kythira_plugin_kv::{Command as Kv, Query as KvQuery, Response, Scan};
use kythira_runtime::{ApplyContext, CallError, Limits, Machine};
use support::{load, runtime, runtime_with, start, test_limits};

/// Applies entries with consecutive indexes, as the log would.
struct Log {
    next: u64,
}

impl Log {
    fn new() -> Self {
        Self { next: 1 }
    }

    fn ctx(&mut self) -> ApplyContext {
        let index = self.next;
        self.next += 1;
        ApplyContext {
            index,
            term: 1,
            timestamp_ms: 1_700_000_000_000 + index,
        }
    }

    fn apply<C: serde::Serialize>(
        &mut self,
        m: &mut Machine,
        command: &C,
    ) -> Result<bytes::Bytes, CallError> {
        let ctx = self.ctx();
        m.apply(ctx, &encode(command).unwrap()).result
    }
}

fn kv(log: &mut Log, m: &mut Machine, command: Kv) -> Response {
    decode(&log.apply(m, &command).expect("kv apply")).expect("kv response")
}

fn kv_query(m: &mut Machine, query: KvQuery) -> Response {
    decode(&m.query(&encode(&query).unwrap()).result.expect("kv query")).unwrap()
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[test]
fn kv_every_command() {
    let runtime = runtime();
    let mut m = start(&runtime, "kv");
    let mut log = Log::new();

    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::Put {
                key: b("a/1"),
                value: b("x")
            }
        ),
        Response::Value(None)
    );
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::Put {
                key: b("a/1"),
                value: b("y")
            }
        ),
        Response::Value(Some(b("x")))
    );
    kv(
        &mut log,
        &mut m,
        Kv::Put {
            key: b("a/2"),
            value: b("z"),
        },
    );
    kv(
        &mut log,
        &mut m,
        Kv::Put {
            key: b("b/1"),
            value: b("w"),
        },
    );
    assert_eq!(
        kv(&mut log, &mut m, Kv::Get { key: b("a/1") }),
        Response::Value(Some(b("y")))
    );
    assert_eq!(
        kv(&mut log, &mut m, Kv::Get { key: b("nope") }),
        Response::Value(None)
    );

    // Compare-and-swap: mismatch changes nothing, match applies.
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::CompareAndSwap {
                key: b("a/1"),
                expected: Some(b("x")),
                new: Some(b("q"))
            }
        ),
        Response::Mismatch {
            current: Some(b("y"))
        }
    );
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::CompareAndSwap {
                key: b("a/1"),
                expected: Some(b("y")),
                new: Some(b("q"))
            }
        ),
        Response::Swapped
    );
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::CompareAndSwap {
                key: b("c"),
                expected: None,
                new: Some(b("new"))
            }
        ),
        Response::Swapped
    );
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::CompareAndSwap {
                key: b("c"),
                expected: Some(b("new")),
                new: None
            }
        ),
        Response::Swapped
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("c") }),
        Response::Value(None)
    );

    // Scans: prefix, limit, continuation.
    let scan = |prefix: &str, start_after: Option<&str>, limit| Scan {
        prefix: b(prefix),
        start_after: start_after.map(b),
        limit,
    };
    assert_eq!(
        kv(&mut log, &mut m, Kv::Scan(scan("a/", None, 1))),
        Response::Entries {
            entries: vec![(b("a/1"), b("q"))],
            more: true
        }
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Scan(scan("a/", Some("a/1"), 10))),
        Response::Entries {
            entries: vec![(b("a/2"), b("z"))],
            more: false
        }
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Scan(scan("", None, 10))),
        Response::Entries {
            entries: vec![(b("a/1"), b("q")), (b("a/2"), b("z")), (b("b/1"), b("w"))],
            more: false
        }
    );

    // Delete answers the removed value.
    assert_eq!(
        kv(&mut log, &mut m, Kv::Delete { key: b("a/2") }),
        Response::Value(Some(b("z")))
    );
    assert_eq!(
        kv(&mut log, &mut m, Kv::Delete { key: b("a/2") }),
        Response::Value(None)
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("a/2") }),
        Response::Value(None)
    );

    // A refused command is a plugin error, and the machine goes on.
    let too_big = kythira_plugin_kv::MAX_SCAN_LIMIT + 1;
    match log.apply(&mut m, &Kv::Scan(scan("", None, too_big))) {
        Err(CallError::Plugin(message)) => assert!(message.contains("limit"), "{message}"),
        other => panic!("expected a plugin error, got {other:?}"),
    }
    // Malformed command bytes are a plugin error too, not a trap.
    let ctx = log.ctx();
    assert!(matches!(
        m.apply(ctx, b"\xff\xff\xff").result,
        Err(CallError::Plugin(_))
    ));
    assert!(matches!(m.query(b"").result, Err(CallError::Plugin(_))));
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("b/1") }),
        Response::Value(Some(b("w")))
    );

    // Snapshot and restore into a fresh machine.
    let state = m.get_state().result.unwrap();
    let mut copy = start(&runtime, "kv");
    copy.restore(&state, 20).result.unwrap();
    assert_eq!(copy.get_state().result.unwrap(), state);
    assert_eq!(
        kv_query(&mut copy, KvQuery::Get { key: b("a/1") }),
        Response::Value(Some(b("q")))
    );
}

/// Runs a failing command against a counter plugin and checks the state is
/// untouched and the machine keeps working.
fn assert_contained<C: serde::Serialize>(
    name: &str,
    limits: Limits,
    increment: C,
    failing: C,
    expect: impl Fn(&CallError) -> bool,
) {
    let runtime = runtime_with(limits);
    let mut m = start(&runtime, name);
    let mut log = Log::new();
    for _ in 0..3 {
        log.apply(&mut m, &increment).unwrap();
    }
    let before = m.get_state().result.unwrap();
    let outcome = m.apply(log.ctx(), &encode(&failing).unwrap());
    let err = outcome.result.unwrap_err();
    assert!(expect(&err), "{name}: unexpected error {err:?}");
    assert!(err.rolled_back());
    assert!(outcome.fuel_used > 0);
    assert_eq!(
        m.get_state().result.unwrap(),
        before,
        "{name}: state changed by a failed call"
    );
    let count: u64 = decode(&log.apply(&mut m, &increment).unwrap()).unwrap();
    assert_eq!(count, 4, "{name}: the next call works on the old state");
}

#[test]
fn panic_is_a_trap_and_rolls_back() {
    use kythira_testing_panicker::Command;
    assert_contained(
        "panicker",
        test_limits(),
        Command::Increment,
        Command::Panic,
        |e| matches!(e, CallError::Trap(message) if message.contains("unreachable")),
    );
}

#[test]
fn endless_loop_exhausts_fuel_and_rolls_back() {
    use kythira_testing_looper::Command;
    let limits = test_limits();
    let budget = limits.apply_fuel;
    assert_contained("looper", limits, Command::Increment, Command::Loop, |e| {
        *e == CallError::FuelExhausted { budget }
    });
}

#[test]
fn memory_hog_hits_the_limit_and_rolls_back() {
    use kythira_testing_memhog::Command;
    let limits = Limits {
        // Enough fuel to reach the cap: the limit, not fuel, must stop it.
        apply_fuel: 2_000_000_000,
        ..test_limits()
    };
    let limit = limits.memory_bytes;
    assert_contained("memhog", limits, Command::Increment, Command::Hog, |e| {
        *e == CallError::MemoryLimit { limit }
    });
}

#[test]
fn failed_restore_leaves_the_state_unchanged() {
    use kythira_testing_bad_restore::Command;
    let runtime = runtime();
    let mut m = start(&runtime, "bad-restore");
    let mut log = Log::new();
    log.apply(&mut m, &Command::Increment).unwrap();
    let before = m.get_state().result.unwrap();
    let err = m.restore(&before, 1).result.unwrap_err();
    assert!(matches!(err, CallError::Plugin(_)), "{err:?}");
    assert_eq!(m.get_state().result.unwrap(), before);
    let count: u64 = decode(&log.apply(&mut m, &Command::Increment).unwrap()).unwrap();
    assert_eq!(count, 2);
}

#[test]
fn rollback_replays_everything_since_the_checkpoint() {
    use kythira_testing_panicker::Command;
    let runtime = runtime();
    let mut m = start(&runtime, "panicker");
    let mut log = Log::new();
    // Enough increments that several automatic checkpoints are taken, and a
    // failure between each.
    let mut expected = 0u64;
    for round in 0..4 {
        for _ in 0..1500 {
            expected += 1;
            let count: u64 = decode(&log.apply(&mut m, &Command::Increment).unwrap()).unwrap();
            assert_eq!(count, expected);
        }
        assert!(
            matches!(log.apply(&mut m, &Command::Panic), Err(CallError::Trap(_))),
            "round {round}"
        );
        let count: u64 = decode(
            &m.query(&encode(&kythira_testing_panicker::Query::Get).unwrap())
                .result
                .unwrap(),
        )
        .unwrap();
        assert_eq!(count, expected, "round {round}");
    }
    // Checkpoints were taken on the way (every 1,000 indexes), so the
    // rollbacks above restored one and replayed only what followed it.
    let (index, state) = m.checkpoint();
    assert_eq!(index, 6000);
    assert!(state.is_some());
}

/// Large commands bring a checkpoint before the interval does, so the
/// commands kept for rollback stay bounded in bytes.
#[test]
fn checkpoints_also_come_after_a_byte_bound() {
    let runtime = runtime_with(Limits {
        checkpoint_bytes: 200,
        ..test_limits()
    });
    let mut m = start(&runtime, "kv");
    let mut log = Log::new();
    // Each put encodes to 57 bytes: the fourth one since a checkpoint
    // brings the kept commands to 228.
    let put = |i: u8| Kv::Put {
        key: vec![b'k', b'e', b'y', i],
        value: vec![i; 50],
    };
    assert_eq!(encode(&put(0)).unwrap().len(), 57);
    for i in 1..=10 {
        log.apply(&mut m, &put(i)).unwrap();
        let expected = u64::from(i) / 4 * 4;
        assert_eq!(m.checkpoint().0, expected, "after entry {i}");
    }
    assert_eq!(
        kv_query(
            &mut m,
            KvQuery::Get {
                key: vec![b'k', b'e', b'y', 10]
            }
        ),
        Response::Value(Some(vec![10; 50]))
    );
}

/// A checkpoint whose fresh instance cannot be built (every instance slot is
/// taken: a host failure) is still kept at its index, as on every other
/// replica, and a later rollback rebuilds from it.
#[test]
fn a_checkpoint_is_kept_when_no_fresh_instance_can_be_built() {
    use kythira_testing_panicker::{Command, Query};
    let runtime = kythira_runtime::Runtime::new(kythira_runtime::RuntimeConfig {
        limits: Limits {
            checkpoint_interval: 10,
            ..test_limits()
        },
        cache_dir: Some(support::cache_dir()),
        // Two instance slots: the machine's and the one other below.
        max_machines: 1,
    })
    .unwrap();
    let mut m = start(&runtime, "panicker");
    let other = start(&runtime, "panicker");
    let mut log = Log::new();
    for _ in 0..10 {
        log.apply(&mut m, &Command::Increment).unwrap();
    }
    let (index, state) = m.checkpoint();
    assert_eq!(index, 10, "kept although no instance could be built");
    assert!(state.is_some());
    for _ in 0..3 {
        log.apply(&mut m, &Command::Increment).unwrap();
    }
    // Free a slot; the trap rolls back to index 10 and replays three entries.
    drop(other);
    assert!(matches!(
        log.apply(&mut m, &Command::Panic),
        Err(CallError::Trap(_))
    ));
    let count: u64 = decode(&m.query(&encode(&Query::Get).unwrap()).result.unwrap()).unwrap();
    assert_eq!(count, 13);
}

#[test]
fn upgrade_carries_state_and_a_failed_upgrade_keeps_the_old_code() {
    use kythira_testing_panicker::Command;
    let runtime = runtime();
    let mut m = start(&runtime, "panicker");
    let mut log = Log::new();
    for _ in 0..5 {
        log.apply(&mut m, &Command::Increment).unwrap();
    }
    let panicker = m.plugin_hash();

    // bad-restore refuses every snapshot: the upgrade fails, nothing changes.
    let bad = load(&runtime, "bad-restore");
    assert!(matches!(m.upgrade(&bad, 6), Err(CallError::Plugin(_))));
    assert_eq!(m.plugin_hash(), panicker);

    // looper keeps the same state layout (a counter): the count carries over.
    let looper = load(&runtime, "looper");
    m.upgrade(&looper, 6).unwrap();
    assert_eq!(m.plugin_hash(), looper.hash());
    let count: u64 = decode(
        &log.apply(&mut m, &kythira_testing_looper::Command::Increment)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(count, 6);
}

#[test]
fn migrating_to_other_limits_carries_the_state_or_changes_nothing() {
    let runtime = runtime();
    let mut m = start(&runtime, "kv");
    let mut log = Log::new();
    let big = vec![7u8; 1 << 20];
    kv(
        &mut log,
        &mut m,
        Kv::Put {
            key: b("big"),
            value: big.clone(),
        },
    );
    let kv_plugin = m.plugin_hash();

    // Too little memory for the state: refused, the old machine untouched.
    let small = runtime_with(Limits {
        memory_bytes: 2 << 20,
        ..test_limits()
    });
    let plugin = load(&small, "kv");
    let err = m.migrate(&small, &plugin, 2).unwrap_err();
    assert!(matches!(err, CallError::MemoryLimit { .. }), "{err:?}");
    assert_eq!(m.plugin_hash(), kv_plugin);
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("big") }),
        Response::Value(Some(big.clone()))
    );

    // Enough: the state moves, and the report says how large it was.
    let large = runtime_with(Limits {
        memory_bytes: 128 << 20,
        ..test_limits()
    });
    let plugin = load(&large, "kv");
    let migration = m.migrate(&large, &plugin, 2).unwrap();
    assert!(migration.state_bytes > big.len(), "{migration:?}");
    assert!(migration.fuel_used > 0);
    assert_eq!(
        m.checkpoint().0,
        2,
        "the new code starts from a checkpoint at the migration"
    );
    log.next = 3;
    kv(
        &mut log,
        &mut m,
        Kv::Put {
            key: b("k"),
            value: b("v"),
        },
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("big") }),
        Response::Value(Some(big))
    );
}

#[test]
fn upgrade_from_kv_to_kv2_migrates_the_state() {
    use kythira_plugin_kv2::{Command as Kv2, Query as Kv2Query, Response as Kv2Response};
    fn kv2_query(m: &mut Machine, query: Kv2Query) -> Kv2Response {
        decode(&m.query(&encode(&query).unwrap()).result.expect("kv2 query")).unwrap()
    }
    let runtime = runtime();
    let mut m = start(&runtime, "kv");
    let mut log = Log::new();
    for (key, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
        kv(
            &mut log,
            &mut m,
            Kv::Put {
                key: b(key),
                value: b(value),
            },
        );
    }
    kv(&mut log, &mut m, Kv::Delete { key: b("c") });

    // The upgrade is an entry of the log: it takes the next index.
    let kv2 = load(&runtime, "kv2");
    let upgrade = log.ctx().index;
    m.upgrade(&kv2, upgrade).unwrap();
    assert_eq!(m.plugin_hash(), kv2.hash());

    // kv's commands and queries, with kv's types, answer as before.
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("a") }),
        Response::Value(Some(b("1")))
    );
    let all = Scan {
        prefix: Vec::new(),
        start_after: None,
        limit: 10,
    };
    assert_eq!(
        kv_query(&mut m, KvQuery::Scan(all.clone())),
        Response::Entries {
            entries: vec![(b("a"), b("1")), (b("b"), b("2"))],
            more: false
        }
    );
    // Keys written before the upgrade have revision 0.
    assert_eq!(
        kv2_query(&mut m, Kv2Query::Revision { key: b("a") }),
        Kv2Response::Revision(Some(0))
    );
    assert_eq!(
        kv2_query(&mut m, Kv2Query::Revision { key: b("c") }),
        Kv2Response::Revision(None)
    );

    // The new command, then a kv command, each recording its index.
    let append = log.next;
    let answer: Kv2Response = decode(
        &log.apply(
            &mut m,
            &Kv2::Append {
                key: b("a"),
                value: b("+"),
            },
        )
        .unwrap(),
    )
    .unwrap();
    assert!(append > upgrade);
    assert_eq!(answer, Kv2Response::Value(Some(b("1"))));
    assert_eq!(
        kv(
            &mut log,
            &mut m,
            Kv::Put {
                key: b("b"),
                value: b("3")
            }
        ),
        Response::Value(Some(b("2")))
    );
    assert_eq!(
        kv2_query(&mut m, Kv2Query::Revision { key: b("a") }),
        Kv2Response::Revision(Some(append))
    );
    assert_eq!(
        kv2_query(&mut m, Kv2Query::Revision { key: b("b") }),
        Kv2Response::Revision(Some(append + 1))
    );
    assert_eq!(
        kv_query(&mut m, KvQuery::Get { key: b("a") }),
        Response::Value(Some(b("1+")))
    );

    // The JSON forms, through the component's translations.
    let json = runtime
        .query_from_json(&kv2, r#"{"revision":{"key":"a"}}"#)
        .result
        .unwrap();
    let answer = m.query(&json).result.unwrap();
    assert_eq!(
        runtime
            .query_response_to_json(&kv2, &answer)
            .result
            .unwrap(),
        format!(r#"{{"revision":{append}}}"#)
    );

    // The state is now in kv2's layout, which kv cannot read: a downgrade
    // fails and kv2 keeps running.
    let state = m.get_state().result.unwrap();
    assert!(state.starts_with(&[0x00, b'K', b'V', 2]), "{state:02x?}");
    let kv1 = load(&runtime, "kv");
    assert!(matches!(
        m.upgrade(&kv1, log.ctx().index),
        Err(CallError::Plugin(_))
    ));
    assert_eq!(m.plugin_hash(), kv2.hash());
    assert_eq!(
        kv_query(&mut m, KvQuery::Scan(all)),
        Response::Entries {
            entries: vec![(b("a"), b("1+")), (b("b"), b("3"))],
            more: false
        }
    );
}

#[test]
fn nan_bits_are_identical_across_engines_and_canonical() {
    use kythira_testing_nan::{Bits, Command};
    let command = Command::Compute {
        // A NaN with a payload and the sign bit set, and ordinary numbers.
        a: 0xfff4_0000_dead_beef,
        b: 0.0f64.to_bits(),
        x: 0xffc0_beef,
        y: (-1.0f32).to_bits(),
    };
    let run = || {
        let runtime = runtime();
        let mut m = start(&runtime, "nan");
        let bits: Bits = decode(&Log::new().apply(&mut m, &command).unwrap()).unwrap();
        (bits, m.get_state().result.unwrap())
    };
    let (first, first_state) = run();
    let (second, second_state) = run();
    assert_eq!(first, second);
    assert_eq!(first_state, second_state);
    // Every NaN the plugin produced is the canonical one.
    for bits in first.f64_results {
        if f64::from_bits(bits).is_nan() {
            assert_eq!(bits, 0x7ff8_0000_0000_0000, "{bits:#x}");
        }
    }
    for bits in first.f32_results {
        if f32::from_bits(bits).is_nan() {
            assert_eq!(bits, 0x7fc0_0000, "{bits:#x}");
        }
    }
    assert!(f64::from_bits(first.f64_results[0]).is_nan());
}

/// A machine resumed from another's image holds the same state, answers the
/// next commands alike and checkpoints at the same indexes with the same
/// bytes: what a replica installing a Raft snapshot relies on.
#[test]
fn a_machine_resumed_from_an_image_continues_like_the_original() {
    let runtime = runtime_with(Limits {
        checkpoint_interval: 10,
        ..test_limits()
    });
    let mut original = start(&runtime, "kv");
    let mut log = Log::new();
    let put = |i: u64| Kv::Put {
        key: b(&format!("k/{i}")),
        value: b(&format!("v{i}")),
    };
    // 14 entries: a checkpoint at 10, four commands to replay after it.
    for i in 0..14 {
        kv(&mut log, &mut original, put(i));
    }
    // A local call perturbs the original's instance; the image must not care.
    kv_query(&mut original, KvQuery::Get { key: b("k/3") });
    let image = original.image();
    assert_eq!(image.checkpoint_index, 10);
    assert_eq!(image.replay.len(), 4);
    assert!(image.unavailable.is_none());

    let plugin = load(&runtime, "kv");
    let mut resumed = runtime.resume(&plugin, &image).expect("resume");
    assert_eq!(resumed.image(), image);
    let mut other_log = Log { next: log.next };
    for i in 14..25 {
        let a = kv(&mut log, &mut original, put(i));
        let b_ = kv(&mut other_log, &mut resumed, put(i));
        assert_eq!(a, b_, "entry {i}");
    }
    assert_eq!(original.checkpoint().0, 20);
    assert_eq!(original.checkpoint(), resumed.checkpoint());
    assert_eq!(
        original.get_state().result.unwrap(),
        resumed.get_state().result.unwrap()
    );
}

#[test]
fn an_image_out_of_order_or_miscounted_is_refused() {
    let runtime = runtime();
    let mut m = start(&runtime, "kv");
    let mut log = Log::new();
    for i in 0..3 {
        kv(
            &mut log,
            &mut m,
            Kv::Put {
                key: b(&format!("{i}")),
                value: b("x"),
            },
        );
    }
    let plugin = load(&runtime, "kv");
    let mut image = m.image();
    image.counted_bytes += 1_000;
    let e = runtime.resume(&plugin, &image).unwrap_err().to_string();
    assert!(e.contains("counts"), "{e}");
    let mut image = m.image();
    image.replay.swap(0, 1);
    let e = runtime.resume(&plugin, &image).unwrap_err().to_string();
    assert!(e.contains("out of order"), "{e}");
}
