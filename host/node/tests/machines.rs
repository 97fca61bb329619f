//! The replicated state above the log, entry by entry: batches, sessions and
//! deploys give the answers one-by-one application would.

use std::path::PathBuf;

use bytes::Bytes;
use kythira_api::{ApiError, ChangeKind, DeployLimits, Payload, Response, SessionSeq};
use kythira_guest::codec;
use kythira_node::engines::Engines;
use kythira_node::entry::{Envelope, Op};
use kythira_node::machines::{Machines, resolve};
use kythira_plugin_kv::{Command, Response as KvResponse};
use kythira_raft::{Entry, EntryKind};
use sha2::{Digest, Sha256};

fn component(name: &str) -> Bytes {
    let dir = std::env::var_os("KYTHIRA_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"));
    Bytes::from(std::fs::read(dir.join(format!("{name}.wasm"))).expect("built plugins"))
}

fn entry(index: u64, op: Op) -> Entry {
    entry_at(index, 1_000 + index, op)
}

fn entry_at(index: u64, timestamp_ms: u64, op: Op) -> Entry {
    Entry {
        term: 1,
        index,
        kind: EntryKind::Normal,
        data: Envelope::encode(timestamp_ms, &op),
    }
}

fn deploy(name: &str, bytes: Bytes) -> Op {
    Op::Deploy {
        machine: name.into(),
        sha256: Sha256::digest(&bytes).into(),
        component: bytes,
        limits: DeployLimits::default(),
    }
}

fn put(key: &str, value: &str, session: Option<SessionSeq>) -> Op {
    Op::Apply {
        machine: "kv".into(),
        session,
        command: codec::encode(&Command::Put {
            key: key.into(),
            value: value.into(),
        })
        .unwrap()
        .into(),
    }
}

fn previous(reply: &Result<Response, ApiError>) -> Option<Vec<u8>> {
    let Ok(Response::Applied {
        output: Payload::Bytes(b),
        ..
    }) = reply
    else {
        panic!("not applied: {reply:?}")
    };
    match codec::decode::<KvResponse>(b).unwrap() {
        KvResponse::Value(v) => v,
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_duplicate_inside_one_batch_gets_the_first_answer_in_log_order() {
    let mut m = Machines::new(Engines::new(None));
    let seq = |serial| {
        Some(SessionSeq {
            id: 2,
            serial,
            acked: 0,
        })
    };
    let entries = vec![
        entry(1, deploy("kv", component("kv"))),
        entry(2, Op::RegisterSession { ttl_ms: 60_000 }),
        entry(3, put("a", "1", seq(1))),
        entry(4, put("a", "1", seq(1))),
        entry(5, put("a", "2", None)),
        Entry {
            term: 1,
            index: 6,
            kind: EntryKind::Noop,
            data: Bytes::new(),
        },
        entry(7, put("a", "3", seq(2))),
        // Refused while entry 7 still waits in the batch.
        entry(
            8,
            put(
                "a",
                "4",
                Some(SessionSeq {
                    id: 99,
                    serial: 1,
                    acked: 0,
                }),
            ),
        ),
    ];
    let answers = m.apply(&entries);
    let indexes: Vec<u64> = answers.iter().map(|a| a.index).collect();
    assert_eq!(
        indexes,
        [1, 2, 3, 4, 5, 7, 8],
        "one answer per normal entry, in order"
    );
    assert_eq!(answers[6].reply, Err(ApiError::SessionExpired(99)));
    assert_eq!(previous(&answers[2].reply), None);
    assert_eq!(
        answers[3].reply, answers[2].reply,
        "the duplicate is not applied again"
    );
    assert_eq!(previous(&answers[4].reply), Some(b"1".to_vec()));
    assert_eq!(previous(&answers[5].reply), Some(b"2".to_vec()));
    assert_eq!(m.applied(), 8);
}

#[test]
fn bad_deploys_and_unknown_machines_are_replicated_errors() {
    let mut m = Machines::new(Engines::new(None));
    let junk = Bytes::from_static(b"not a component");
    let mut tampered = deploy("kv", component("kv"));
    if let Op::Deploy { sha256, .. } = &mut tampered {
        sha256[0] ^= 1;
    }
    let answers = m.apply(&[
        entry(1, deploy("junk", junk)),
        entry(2, deploy("wasi", component("wasi"))),
        entry(3, tampered),
        entry(4, put("a", "1", None)),
        entry(
            5,
            Op::Apply {
                machine: "kv".into(),
                session: Some(SessionSeq {
                    id: 77,
                    serial: 1,
                    acked: 0,
                }),
                command: Bytes::new(),
            },
        ),
    ]);
    assert!(matches!(&answers[0].reply, Err(ApiError::Deploy(m)) if m.contains("WebAssembly")));
    assert!(matches!(&answers[1].reply, Err(ApiError::Deploy(_))));
    assert!(matches!(&answers[2].reply, Err(ApiError::Deploy(m)) if m.contains("sha256")));
    assert_eq!(answers[3].reply, Err(ApiError::UnknownMachine("kv".into())));
    assert_eq!(answers[4].reply, Err(ApiError::SessionExpired(77)));
    assert!(m.status().is_empty());
}

#[test]
fn a_session_that_expires_while_its_command_waits_in_a_batch_is_no_crash() {
    // One batch, as a restarted node replays it: the session's command
    // joins a run, and a later entry of the same run is past the ttl.
    let mut m = Machines::new(Engines::new(None));
    let seq = Some(SessionSeq {
        id: 2,
        serial: 1,
        acked: 0,
    });
    let answers = m.apply(&[
        entry_at(1, 1, deploy("kv", component("kv"))),
        entry_at(2, 1, Op::RegisterSession { ttl_ms: 1_000 }),
        entry_at(3, 10, put("a", "1", seq)),
        entry_at(4, 5_000, put("a", "2", None)),
        entry_at(5, 5_001, put("a", "3", seq)),
    ]);
    assert_eq!(previous(&answers[2].reply), None);
    assert_eq!(previous(&answers[3].reply), Some(b"1".to_vec()));
    assert_eq!(answers[4].reply, Err(ApiError::SessionExpired(2)));
}

fn new_machines() -> Machines {
    Machines::new(Engines::new(None))
}

fn kv_limits(memory_mib: u64) -> DeployLimits {
    DeployLimits {
        memory_bytes: Some(memory_mib << 20),
        ..DeployLimits::default()
    }
}

#[test]
fn a_component_compiled_ahead_is_in_the_cache_when_its_deploy_applies() {
    let dir = tempfile::tempdir().unwrap();
    let engines = Engines::new(Some(dir.path().to_path_buf()));
    let kv = component("kv");
    let sha = kythira_node::machines::hex(&Sha256::digest(&kv));
    engines.compile_ahead(resolve(DeployLimits::default()), kv.clone());
    // The compile thread announces nothing: wait for its artifact (the
    // bound is a safety net for a loaded machine, not a schedule).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let cached = || {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().starts_with(&sha))
    };
    while !cached() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was compiled ahead"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut m = Machines::new(engines);
    let answers = m.apply(&[entry(1, deploy("kv", kv)), entry(2, put("a", "1", None))]);
    assert!(
        matches!(answers[0].reply, Ok(Response::Deployed { .. })),
        "{answers:?}"
    );
    assert_eq!(previous(&answers[1].reply), None);
}

#[test]
fn limits_change_and_machines_go_through_entries_and_snapshots_keep_their_history() {
    let mut m = new_machines();
    let kv = component("kv");
    let limits = Op::SetLimits {
        machine: "kv".into(),
        limits: kv_limits(128),
    };
    let answers = m.apply(&[
        entry(1, limits.clone()),
        entry(2, deploy("kv", kv)),
        entry(3, put("a", "1", None)),
        entry(4, limits),
        entry(5, put("b", "2", None)),
    ]);
    assert_eq!(answers[0].reply, Err(ApiError::UnknownMachine("kv".into())));
    assert!(
        matches!(answers[3].reply, Ok(Response::Deployed { index: 4, .. })),
        "{answers:?}"
    );
    let report = &m.reports()[0];
    assert_eq!(report.limits.memory_bytes, 128 << 20);
    let changes: Vec<_> = report.history.iter().map(|c| (c.index, c.change)).collect();
    assert_eq!(changes, [(2, ChangeKind::Deploy), (4, ChangeKind::Limits)]);

    // A replica restored from a snapshot runs the same machine.
    let mut restored =
        Machines::from_image(m.image(), Engines::new(None), Default::default()).unwrap();
    assert_eq!(restored.reports(), m.reports());

    let answers = m.apply(&[
        entry(
            6,
            Op::Undeploy {
                machine: "kv".into(),
            },
        ),
        entry(7, put("c", "3", None)),
        entry(
            8,
            Op::Undeploy {
                machine: "kv".into(),
            },
        ),
    ]);
    assert_eq!(answers[0].reply, Ok(Response::Undeployed { index: 6 }));
    assert_eq!(answers[1].reply, Err(ApiError::UnknownMachine("kv".into())));
    assert_eq!(answers[2].reply, Err(ApiError::UnknownMachine("kv".into())));
    let image = m.image();
    assert!(
        image.machines.is_empty() && image.components.is_empty(),
        "{image:?}"
    );
}

#[test]
fn two_machines_of_one_component_keep_it_once() {
    let mut m = new_machines();
    let kv = component("kv");
    m.apply(&[entry(1, deploy("a", kv.clone())), entry(2, deploy("b", kv))]);
    assert_eq!(m.image().components.len(), 1);
    assert_eq!(m.reports().len(), 2);
}
