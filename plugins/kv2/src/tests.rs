use super::*;
use kythira_guest::Raw;
use kythira_guest::codec::{decode, encode};
use kythira_guest::testing::Harness;

fn put(key: &[u8], value: &[u8]) -> v1::Command {
    v1::Command::Put {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn append(key: &[u8], value: &[u8]) -> Command {
    Command::Append {
        key: key.to_vec(),
        value: value.to_vec(),
    }
}

fn revision(key: &[u8]) -> Query {
    Query::Revision { key: key.to_vec() }
}

fn value(value: Option<&[u8]>) -> Response {
    Response::Value(value.map(<[u8]>::to_vec))
}

fn scan(prefix: &[u8], start_after: Option<&[u8]>, limit: u32) -> Scan {
    Scan {
        prefix: prefix.to_vec(),
        start_after: start_after.map(<[u8]>::to_vec),
        limit,
    }
}

fn scan_all() -> Scan {
    scan(b"", None, MAX_SCAN_LIMIT)
}

/// Every key of a v2 store, through the scan query.
fn keys(kv: &Harness<KvStore>) -> Vec<Vec<u8>> {
    match kv.query(&Query::Scan(scan_all())) {
        Ok(Response::Entries { entries, more }) => {
            assert!(!more, "a test store fits in one scan");
            entries.into_iter().map(|(key, _)| key).collect()
        }
        other => panic!("a scan answers {other:?}"),
    }
}

/// A fixed pseudo-random walk through every kv command over `keys` keys,
/// including refused scans.
fn kv_workload(len: u32, keys: u32) -> Vec<v1::Command> {
    (0..len)
        .map(|i| {
            let key = (i.wrapping_mul(2_654_435_761) % keys)
                .to_be_bytes()
                .to_vec();
            match i % 7 {
                0 | 1 => put(&key, &i.to_le_bytes()),
                2 => v1::Command::Get { key },
                3 => v1::Command::Delete { key },
                4 => v1::Command::CompareAndSwap {
                    key,
                    expected: None,
                    new: Some(vec![1]),
                },
                5 => v1::Command::CompareAndSwap {
                    key,
                    expected: Some(vec![1]),
                    new: (i % 2 == 0).then(|| vec![2]),
                },
                _ => v1::Command::Scan(scan(
                    &key[..3],
                    Some(&key),
                    if i % 5 == 0 {
                        MAX_SCAN_LIMIT + 1
                    } else {
                        i % 4
                    },
                )),
            }
        })
        .collect()
}

/// The examples of this crate's README, byte for byte.
#[test]
fn wire_format_matches_the_readme() {
    assert_eq!(
        encode(&append(b"k", b"vv")).unwrap(),
        [0x05, 0x01, 0x6b, 0x02, 0x76, 0x76]
    );
    assert_eq!(encode(&revision(b"k")).unwrap(), [0x02, 0x01, 0x6b]);
    assert_eq!(
        encode(&Response::Revision(Some(300))).unwrap(),
        [0x04, 0x01, 0xac, 0x02]
    );
    assert_eq!(encode(&Response::Revision(None)).unwrap(), [0x04, 0x00]);

    // The state layout: the tag, then the entries with their revisions.
    assert_eq!(
        KvStore::default().snapshot().unwrap(),
        [0x00, 0x4b, 0x56, 0x02, 0x00]
    );
    let mut store = KvStore::default();
    let at = |index| ApplyContext {
        index,
        term: 1,
        timestamp_ms: 0,
    };
    store.apply(&at(5), append(b"a", b"1")).unwrap();
    store.apply(&at(300), append(b"b", b"")).unwrap();
    assert_eq!(
        store.snapshot().unwrap(),
        [
            0x00, 0x4b, 0x56, 0x02, 0x02, 0x01, 0x61, 0x01, 0x31, 0x05, 0x01, 0x62, 0x00, 0xac,
            0x02
        ]
    );
}

/// The JSON examples of this crate's README, through the same translation
/// the component exports.
#[test]
fn json_matches_the_readme() {
    let command = |json: &str| Raw::<KvStore>::command_from_json(json);
    let query = |json: &str| Raw::<KvStore>::query_from_json(json);
    let answer = |r: &Response| Raw::<KvStore>::query_response_to_json(&encode(r).unwrap());

    assert_eq!(
        command(r#"{"append":{"key":"k","value":"vv"}}"#),
        Ok(encode(&append(b"k", b"vv")).unwrap())
    );
    assert_eq!(
        command(r#"{"append":{"key":{"hex":"00ff"},"value":[1,2]}}"#),
        Ok(encode(&append(&[0x00, 0xff], &[1, 2])).unwrap())
    );
    assert_eq!(
        query(r#"{"revision":{"key":"k"}}"#),
        Ok(encode(&revision(b"k")).unwrap())
    );
    assert_eq!(
        answer(&Response::Revision(Some(42))).as_deref(),
        Ok(r#"{"revision":42}"#)
    );
    assert_eq!(
        answer(&Response::Revision(None)).as_deref(),
        Ok(r#"{"revision":null}"#)
    );

    for (json, reason) in [
        (r#"{"append":{"key":"k"}}"#, "missing field `value`"),
        (
            r#"{"append":{"key":"k","value":"v","revision":1}}"#,
            "unknown field `revision`",
        ),
    ] {
        let error = command(json).unwrap_err();
        assert!(error.contains(reason), "{json}: {error}");
    }
    let error = query(r#"{"revision":{}}"#).unwrap_err();
    assert!(error.contains("missing field `key`"), "{error}");
}

/// Clients keep sending kv's bytes and reading answers with kv's types
/// during and after the upgrade.
#[test]
fn kv_encodings_are_the_same_messages_in_kv2() {
    let commands = [
        put(b"k", b"vv"),
        put(b"", b""),
        v1::Command::Get { key: b"k".to_vec() },
        v1::Command::Delete {
            key: vec![0x00, 0xff],
        },
        v1::Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: None,
            new: Some(b"v".to_vec()),
        },
        v1::Command::CompareAndSwap {
            key: b"k".to_vec(),
            expected: Some(b"v".to_vec()),
            new: None,
        },
        v1::Command::Scan(scan(b"b/", Some(b"b/1"), 300)),
    ];
    for command in commands {
        let bytes = encode(&command).unwrap();
        let read: Command = decode(&bytes).unwrap();
        assert_eq!(read, Command::from(command.clone()));
        assert_eq!(encode(&read).unwrap(), bytes, "{command:?}");
    }

    let queries = [
        v1::Query::Get { key: b"a".to_vec() },
        v1::Query::Scan(scan(b"a", None, 300)),
    ];
    for query in queries {
        let bytes = encode(&query).unwrap();
        let read: Query = decode(&bytes).unwrap();
        assert_eq!(read, Query::from(query.clone()));
        assert_eq!(encode(&read).unwrap(), bytes, "{query:?}");
    }

    let responses = [
        v1::Response::Value(None),
        v1::Response::Value(Some(b"1".to_vec())),
        v1::Response::Swapped,
        v1::Response::Mismatch {
            current: Some(b"v1".to_vec()),
        },
        v1::Response::Entries {
            entries: vec![(b"a".to_vec(), b"1".to_vec()), (b"b".to_vec(), vec![0xff])],
            more: true,
        },
    ];
    for response in responses {
        let ours = Response::from(response.clone());
        let bytes = encode(&ours).unwrap();
        assert_eq!(bytes, encode(&response).unwrap(), "{response:?}");
        // What a client holding kv's types reads from kv2's answer.
        assert_eq!(decode::<v1::Response>(&bytes).unwrap(), response);
        assert_eq!(
            Raw::<KvStore>::response_to_json(&bytes),
            Raw::<v1::KvStore>::response_to_json(&bytes)
        );
        assert_eq!(
            Raw::<KvStore>::query_response_to_json(&bytes),
            Raw::<v1::KvStore>::query_response_to_json(&bytes)
        );
    }

    // kv's JSON forms, including the ones its README shows, translate to the
    // same bytes.
    for json in [
        r#"{"put":{"key":"k","value":"vv"}}"#,
        r#"{"get":{"key":"k"}}"#,
        r#"{"delete":{"key":{"hex":"00ff"}}}"#,
        r#"{"compare_and_swap":{"key":"k","expected":null,"new":"v"}}"#,
        r#"{"compare_and_swap":{"key":"k","expected":"v"}}"#,
        r#"{"scan":{"prefix":"b/","start_after":"b/1","limit":10}}"#,
    ] {
        assert_eq!(
            Raw::<KvStore>::command_from_json(json),
            Raw::<v1::KvStore>::command_from_json(json),
            "{json}"
        );
    }
    for json in [
        r#"{"get":{"key":"a"}}"#,
        r#"{"scan":{"prefix":"a","limit":300}}"#,
    ] {
        assert_eq!(
            Raw::<KvStore>::query_from_json(json),
            Raw::<v1::KvStore>::query_from_json(json),
            "{json}"
        );
    }

    // The new variants are not kv's: kv refuses them instead of misreading.
    assert!(decode::<v1::Command>(&encode(&append(b"k", b"v")).unwrap()).is_err());
    assert!(decode::<v1::Query>(&encode(&revision(b"k")).unwrap()).is_err());
    assert!(decode::<v1::Response>(&encode(&Response::Revision(Some(1))).unwrap()).is_err());
}

#[test]
fn kv_commands_answer_alike_on_kv_and_kv2() {
    let mut kv = Harness::<v1::KvStore>::new();
    let mut fresh = Harness::<KvStore>::new();
    let mut upgraded = None;
    let workload = kv_workload(300, 40);
    for (i, command) in workload.iter().enumerate() {
        if i == 150 {
            upgraded = Some(kv.upgrade::<KvStore>().expect("kv2 reads kv's state"));
        }
        let bytes = encode(command).unwrap();
        // Compared as bytes: the same answer with the same encoding, or the
        // same refusal.
        let expected = kv.apply_bytes(&bytes);
        assert_eq!(fresh.apply_bytes(&bytes), expected, "{i}: {command:?}");
        if let Some(upgraded) = &mut upgraded {
            assert_eq!(upgraded.apply_bytes(&bytes), expected, "{i}: {command:?}");
        }
    }
    let upgraded = upgraded.unwrap();
    assert!(
        kv.log().iter().any(|entry| entry.response.is_err()),
        "the workload includes refusals"
    );

    for key in 0u32..40 {
        let key = key.to_be_bytes().to_vec();
        let expected = kv.query(&v1::Query::Get { key: key.clone() });
        for kv2 in [&fresh, &upgraded] {
            assert_eq!(
                kv2.query(&Query::Get { key: key.clone() }),
                expected.clone().map(Response::from)
            );
        }
    }
    let expected = kv.query(&v1::Query::Scan(scan_all()));
    assert_eq!(
        fresh.query(&Query::Scan(scan_all())),
        expected.clone().map(Response::from)
    );
    assert_eq!(
        upgraded.query(&Query::Scan(scan_all())),
        expected.map(Response::from)
    );

    // The same through JSON.
    let mut upgraded = upgraded;
    for json in [
        r#"{"put":{"key":"j","value":"1"}}"#,
        r#"{"compare_and_swap":{"key":"j","expected":"1","new":"2"}}"#,
        r#"{"get":{"key":"j"}}"#,
        r#"{"scan":{"prefix":"j","limit":5}}"#,
        r#"{"delete":{"key":"j"}}"#,
        r#"{"scan":{"prefix":"","limit":10001}}"#,
    ] {
        let expected = kv.apply_json(json);
        assert_eq!(fresh.apply_json(json), expected, "{json}");
        assert_eq!(upgraded.apply_json(json), expected, "{json}");
    }

    fresh.assert_deterministic();
    upgraded.assert_deterministic();
    upgraded.assert_snapshot_transparent();
}

#[test]
fn a_kv_state_migrates_with_revision_zero() {
    let mut kv = Harness::<v1::KvStore>::new();
    let long = [7u8; 300];
    for (key, value) in [
        (&b""[..], &b"the empty key"[..]),
        (b"a", b""),
        (b"b/1", b"x"),
        (&[0x00, 0xff], &[0xfe]),
        (b"long", &long),
        (b"gone", b"soon"),
    ] {
        kv.apply(&put(key, value)).unwrap();
    }
    kv.apply(&put(b"b/1", b"y")).unwrap();
    kv.apply(&v1::Command::Delete {
        key: b"gone".to_vec(),
    })
    .unwrap();

    let mut kv2 = kv.upgrade::<KvStore>().expect("kv2 reads kv's state");
    // Every key and value, in order.
    assert_eq!(
        kv2.query(&Query::Scan(scan_all())),
        kv.query(&v1::Query::Scan(scan_all())).map(Response::from)
    );
    assert_eq!(kv2.machine().len(), 5);
    for key in keys(&kv2) {
        assert_eq!(
            kv2.query(&revision(&key)),
            Ok(Response::Revision(Some(0))),
            "{key:?}"
        );
    }
    assert_eq!(kv2.query(&revision(b"gone")), Ok(Response::Revision(None)));
    // The next snapshot is in kv2's layout.
    assert!(kv2.state().starts_with(&LAYOUT_TAG));

    // Writes after the upgrade record their index; others keep 0.
    let index = kv2.next_context().index;
    assert_eq!(kv2.apply(&append(b"a", b"+")), Ok(value(Some(b""))));
    assert_eq!(
        kv2.query(&revision(b"a")),
        Ok(Response::Revision(Some(index)))
    );
    assert_eq!(
        kv2.query(&revision(b"b/1")),
        Ok(Response::Revision(Some(0)))
    );

    kv2.assert_snapshot_round_trip();
    kv2.assert_deterministic();
    kv2.assert_snapshot_transparent();
}

#[test]
fn a_kv2_state_round_trips_with_its_revisions() {
    let mut kv2 = Harness::<KvStore>::new();
    for command in kv_workload(120, 30) {
        kv2.apply(&command.into()).ok();
    }
    kv2.apply(&append(b"tail", b"1")).unwrap();
    let state = kv2.state();
    assert!(state.starts_with(&LAYOUT_TAG));

    let mut restored = Raw::<KvStore>::new();
    restored.restore_from_snapshot(&state).unwrap();
    assert_eq!(restored.get_state().unwrap(), state);
    assert_eq!(restored.machine(), kv2.machine());

    // Deploying kv2 over kv2 (a rebuild with the same layout) keeps the
    // revisions rather than resetting them to 0.
    let again = kv2.upgrade::<KvStore>().unwrap();
    for key in keys(&kv2) {
        assert_eq!(again.query(&revision(&key)), kv2.query(&revision(&key)));
    }
    assert_eq!(
        again.query(&revision(b"tail")),
        Ok(Response::Revision(Some(121)))
    );
    kv2.assert_snapshot_round_trip();
    kv2.assert_deterministic();
    kv2.assert_snapshot_transparent();
}

#[test]
fn append_creates_and_extends_and_writes_record_their_revision() {
    let mut kv2 = Harness::<KvStore>::new();
    let rev = |kv2: &Harness<KvStore>, key: &[u8]| match kv2.query(&revision(key)) {
        Ok(Response::Revision(revision)) => revision,
        other => panic!("a revision query answers {other:?}"),
    };
    // Harness indexes start at 1, one per command.
    assert_eq!(kv2.apply(&append(b"a", b"x")), Ok(value(None)));
    assert_eq!(rev(&kv2, b"a"), Some(1));
    assert_eq!(kv2.apply(&append(b"a", b"yz")), Ok(value(Some(b"x"))));
    assert_eq!(rev(&kv2, b"a"), Some(2));
    // Reads change nothing.
    assert_eq!(
        kv2.apply(&Command::Get { key: b"a".to_vec() }),
        Ok(value(Some(b"xyz")))
    );
    assert_eq!(rev(&kv2, b"a"), Some(2));
    assert_eq!(kv2.apply(&put(b"a", b"p").into()), Ok(value(Some(b"xyz"))));
    assert_eq!(rev(&kv2, b"a"), Some(4));
    // A compare-and-swap writes only when it matches.
    let cas = |expected: &[u8], new: &[u8]| Command::CompareAndSwap {
        key: b"a".to_vec(),
        expected: Some(expected.to_vec()),
        new: Some(new.to_vec()),
    };
    assert_eq!(
        kv2.apply(&cas(b"other", b"q")),
        Ok(Response::Mismatch {
            current: Some(b"p".to_vec())
        })
    );
    assert_eq!(rev(&kv2, b"a"), Some(4));
    assert_eq!(kv2.apply(&cas(b"p", b"q")), Ok(Response::Swapped));
    assert_eq!(rev(&kv2, b"a"), Some(6));
    // Appending nothing still creates the key and counts as a write.
    assert_eq!(kv2.apply(&append(b"b", b"")), Ok(value(None)));
    assert_eq!(
        kv2.query(&Query::Get { key: b"b".to_vec() }),
        Ok(value(Some(b"")))
    );
    assert_eq!(rev(&kv2, b"b"), Some(7));
    // A deleted key has no revision.
    assert_eq!(
        kv2.apply(&Command::Delete { key: b"a".to_vec() }),
        Ok(value(Some(b"q")))
    );
    assert_eq!(rev(&kv2, b"a"), None);

    // The JSON forms, end to end.
    assert_eq!(
        kv2.apply_json(r#"{"append":{"key":"c","value":"1"}}"#)
            .as_deref(),
        Ok(r#"{"value":null}"#)
    );
    assert_eq!(
        kv2.apply_json(r#"{"append":{"key":"c","value":"2"}}"#)
            .as_deref(),
        Ok(r#"{"value":"1"}"#)
    );
    assert_eq!(
        kv2.query_json(r#"{"get":{"key":"c"}}"#).as_deref(),
        Ok(r#"{"value":"12"}"#)
    );
    assert_eq!(
        kv2.query_json(r#"{"revision":{"key":"c"}}"#).as_deref(),
        Ok(r#"{"revision":10}"#)
    );
    assert_eq!(
        kv2.query_json(r#"{"revision":{"key":"nope"}}"#).as_deref(),
        Ok(r#"{"revision":null}"#)
    );

    kv2.assert_snapshot_round_trip();
    kv2.assert_deterministic();
    kv2.assert_snapshot_transparent();
}

#[test]
fn states_of_neither_layout_are_refused_and_change_nothing() {
    let v2 = |rest: &[u8]| [&LAYOUT_TAG[..], rest].concat();
    let cases: [(Vec<u8>, &str); 10] = [
        (vec![], "neither a kv2 nor a kv state"),
        // kv's layout, one entry announced and none there.
        (vec![0x01], "neither a kv2 nor a kv state"),
        // kv's layout with a byte after a complete map.
        (
            vec![0x01, 0x01, b'a', 0x01, b'1', 0xff],
            "neither a kv2 nor a kv state",
        ),
        (br#"{"a":"1"}"#.to_vec(), "neither a kv2 nor a kv state"),
        (vec![0x00, 0x00], "not a kv state: it starts with 00"),
        (vec![0x00, b'K', b'V'], "not a kv state: it starts with 00"),
        (v2(&[]), "malformed kv2 state"),
        // An entry without its revision.
        (v2(&[0x01, 0x01, b'a', 0x01, b'1']), "malformed kv2 state"),
        (v2(&[0x00, 0x00]), "malformed kv2 state"),
        (
            vec![0x00, b'K', b'V', 3, 0x00],
            "kv state layout 3 is unknown to kv2",
        ),
    ];
    let mut kv2 = Raw::<KvStore>::new();
    let ctx = ApplyContext {
        index: 1,
        term: 1,
        timestamp_ms: 0,
    };
    kv2.apply(&ctx, &encode(&append(b"k", b"v")).unwrap())
        .unwrap();
    let before = kv2.get_state().unwrap();
    for (state, reason) in cases {
        let error = kv2.restore_from_snapshot(&state).unwrap_err();
        assert!(
            error.starts_with("snapshot refused: ") && error.contains(reason),
            "{state:02x?}: {error}"
        );
        assert_eq!(kv2.get_state().unwrap(), before);
    }
}

/// Only the first byte tells the layouts apart (see `LAYOUT_TAG`), and kv
/// states that resemble the tag elsewhere are still read as kv's.
#[test]
fn layouts_are_told_apart_by_the_first_byte() {
    // The empty kv map is the one kv state that starts with 00.
    let empty = Harness::<v1::KvStore>::new();
    assert_eq!(empty.state(), [0x00]);
    let kv2 = empty.upgrade::<KvStore>().unwrap();
    assert!(kv2.machine().is_empty());
    assert_eq!(kv2.state(), [0x00, b'K', b'V', 2, 0x00]);

    // Entry counts whose first byte is the tag's 'K' (75), has no low bits
    // set (128: 80 01), or is a multi-byte varint (300: ac 02).
    for count in [1u32, 75, 127, 128, 300] {
        let mut kv = Harness::<v1::KvStore>::new();
        for i in 0..count {
            kv.apply(&put(format!("{i:04}").as_bytes(), &i.to_le_bytes()))
                .unwrap();
        }
        let state = kv.state();
        assert_ne!(state[0], 0x00, "{count}");
        let kv2 = kv.upgrade::<KvStore>().unwrap();
        assert_eq!(kv2.machine().len(), count as usize);
        assert_eq!(
            kv2.query(&Query::Scan(scan_all())),
            kv.query(&v1::Query::Scan(scan_all())).map(Response::from)
        );
    }

    // A kv state whose bytes after the first are the tag: one entry, the
    // empty key (length 00), a 75-byte value (4b) starting with "V\x02".
    let mut long = b"V\x02".to_vec();
    long.resize(75, b'.');
    let mut kv = Harness::<v1::KvStore>::new();
    kv.apply(&put(b"", &long)).unwrap();
    let state = kv.state();
    assert_eq!(state[1..5], LAYOUT_TAG);
    let kv2 = kv.upgrade::<KvStore>().unwrap();
    assert_eq!(
        kv2.query(&Query::Get { key: Vec::new() }),
        Ok(value(Some(&long)))
    );
    assert_eq!(kv2.query(&revision(b"")), Ok(Response::Revision(Some(0))));
}

#[test]
fn restores_maps_in_any_order_with_the_last_of_repeated_keys() {
    // A map encodes as a list of pairs; build non-canonical ones by hand.
    let state = |entries: &[(&[u8], &[u8], u64)]| {
        let pairs: Vec<_> = entries.iter().map(|&(k, v, r)| (k, (v, r))).collect();
        [&LAYOUT_TAG[..], &encode(&pairs).unwrap()].concat()
    };
    let shuffled = state(&[(b"b", b"2", 1), (b"a", b"1", 2), (b"b", b"3", 3)]);
    let store = KvStore::restore(&shuffled).unwrap();
    assert_eq!(
        store.snapshot().unwrap(),
        state(&[(b"a", b"1", 2), (b"b", b"3", 3)])
    );
}

#[test]
fn many_commands_are_deterministic_and_snapshot_transparent() {
    let mut kv2 = Harness::<KvStore>::new();
    for (i, command) in kv_workload(150, 25).into_iter().enumerate() {
        let command = if i % 5 == 0 {
            append(&(i as u32 % 25).to_be_bytes(), &[i as u8])
        } else {
            command.into()
        };
        kv2.apply(&command).ok();
    }
    assert!(!kv2.machine().is_empty());
    kv2.assert_snapshot_round_trip();
    kv2.assert_deterministic();
    kv2.assert_snapshot_transparent();
}
