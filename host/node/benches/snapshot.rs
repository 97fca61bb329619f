//! `cargo bench -p kythira-node --bench snapshot` (or `just bench-snapshot`):
//! what a snapshot costs, as `BENCH name=… value=… unit=…` lines.
//!
//! A kv machine holding about 16 MiB (65,152 keys of 256-byte values) is
//! snapshotted as the node does it, with 16,001 commands since its last
//! checkpoint (the default interval is 16,384): close to the most an image
//! copies. The applier's part, the copy it makes
//! before handing the image to another thread, is compared with a plain copy
//! of the snapshot's bytes measured in the same run: that is the bound a
//! snapshot may hold up applies for. Writing (encode, write, fsync) runs off
//! the apply path; installing (decode, restore, replay) is what a follower or
//! a restart pays. Every figure is the median of several rounds.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use kythira_api::DeployLimits;
use kythira_guest::codec::encode;
use kythira_node::entry::{Envelope, Op};
use kythira_node::machines::Machines;
use kythira_plugin_kv::Command;
use kythira_raft::{Entry, EntryKind};
use kythira_storage::{SnapshotMeta, SnapshotStore};
use sha2::{Digest, Sha256};

const ROUNDS: usize = 7;
const KEYS: u64 = 3 * 16_384 + 16_000;
const VALUE: usize = 256;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let dir = std::env::var_os("KYTHIRA_PLUGIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"),
        PathBuf::from,
    );
    let kv = std::fs::read(dir.join("kv.wasm"))
        .map_err(|e| format!("{e}: build the plugins first with `just plugins`"))?;
    let scratch = tempfile::tempdir()?;
    let cache = scratch.path().join("compiled");
    let mut machines = Machines::new(kythira_node::engines::Engines::new(Some(cache.clone())));

    let mut index = 0u64;
    let mut entry = |op: &Op| {
        index += 1;
        Entry {
            index,
            term: 1,
            kind: EntryKind::Normal,
            data: Envelope::encode(1_700_000_000_000 + index, op),
        }
    };
    let deploy = entry(&Op::Deploy {
        machine: "kv".into(),
        sha256: Sha256::digest(&kv).into(),
        component: Bytes::from(kv),
        limits: DeployLimits::default(),
    });
    machines.apply(&[deploy]);
    let puts: Vec<Entry> = (0..KEYS)
        .map(|i| {
            let command = encode(&Command::Put {
                key: format!("key{i:08}").into_bytes(),
                value: vec![b'v'; VALUE],
            })
            .expect("encodes");
            entry(&Op::Apply {
                machine: "kv".into(),
                session: None,
                command: command.into(),
            })
        })
        .collect();
    for batch in puts.chunks(1024) {
        machines.apply(batch);
    }

    let encoded = machines.image().encode();
    let bytes = encoded.len() as f64;
    let copy = median(|| {
        black_box(encoded.clone());
    });
    let image = median(|| {
        black_box(machines.image());
    });
    let store = SnapshotStore::open(scratch.path().join("snapshots"))?;
    let mut at = 0u64;
    let write = median(|| {
        at += 1;
        let meta = SnapshotMeta {
            index: at,
            term: 1,
            configuration: Bytes::new(),
        };
        let mut w = store.begin(meta).expect("begin");
        machines.image().encode_into(&mut w).expect("encode");
        w.finish().expect("finish");
    });
    let image_value = machines.image();
    let install = median(|| {
        let m = Machines::from_image(
            image_value.clone(),
            kythira_node::engines::Engines::new(Some(cache.clone())),
            Default::default(),
        )
        .expect("restores");
        black_box(m);
    });

    println!("BENCH name=node.snapshot.size value={bytes:.0} unit=bytes");
    report("node.snapshot.copy_baseline", copy);
    report("node.snapshot.image_on_applier", image);
    println!(
        "BENCH name=node.snapshot.image_vs_copy value={:.2} unit=ratio",
        image.as_secs_f64() / copy.as_secs_f64()
    );
    report("node.snapshot.write_and_fsync", write);
    report("node.snapshot.install", install);
    println!(
        "BENCH name=node.snapshot.write_throughput value={:.0} unit=MiB/s",
        bytes / write.as_secs_f64() / f64::from(1 << 20)
    );
    Ok(())
}

fn report(name: &str, d: Duration) {
    println!(
        "BENCH name={name} value={:.3} unit=ms",
        d.as_secs_f64() * 1e3
    );
}

fn median(mut f: impl FnMut()) -> Duration {
    f(); // warm-up
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed()
        })
        .collect();
    times.sort();
    times[ROUNDS / 2]
}
