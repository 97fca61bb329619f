//! `cargo bench -p kythira-runtime --bench plugin` (or `just bench-plugin`):
//! costs of running plugins, as `BENCH name=… value=… unit=…` lines.
//!
//! Every figure is the median of several timed rounds; the native figures are
//! the same kv logic called directly, measured in the same run as a baseline.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use kythira_guest::Raw;
use kythira_guest::codec::encode;
use kythira_plugin_kv::{Command, KvStore};
use kythira_runtime::{ApplyContext, Limits, Runtime, RuntimeConfig};

const ROUNDS: usize = 15;

fn main() -> anyhow::Result<()> {
    let dir = std::env::var_os("KYTHIRA_PLUGIN_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/plugins"),
        PathBuf::from,
    );
    let kv = std::fs::read(dir.join("kv.wasm"))
        .map_err(|e| anyhow::anyhow!("{e}: build the plugins first with `just plugins`"))?;
    let cache = tempfile::tempdir()?;
    let runtime = Runtime::new(RuntimeConfig {
        limits: Limits::default(),
        cache_dir: Some(cache.path().to_path_buf()),
        ..RuntimeConfig::default()
    })?;
    let plugin = runtime.load(&kv)?;

    // 16-byte puts (8-byte key, 8-byte value) over 1,024 keys.
    let commands: Vec<Vec<u8>> = (0..1024u64)
        .map(|i| {
            encode(&Command::Put {
                key: format!("key{i:05}").into_bytes(),
                value: i.to_le_bytes().to_vec(),
            })
        })
        .collect::<Result<_, _>>()?;
    const PER_ROUND: u64 = 20_000;

    let mut machine = runtime.start(&plugin)?;
    let mut index = 0u64;
    let mut fuel = Vec::new();
    let wasm = median_per_op(PER_ROUND, || {
        for _ in 0..PER_ROUND {
            index += 1;
            let ctx = at(index);
            let command = &commands[(index % 1024) as usize];
            let outcome = machine.apply(ctx, command);
            assert!(outcome.result.is_ok());
            fuel.push(outcome.fuel_used);
        }
    });
    let mut native = Raw::<KvStore>::new();
    let mut index = 0u64;
    let native_ns = median_per_op(PER_ROUND, || {
        for _ in 0..PER_ROUND {
            index += 1;
            let ctx = kythira_guest::ApplyContext {
                index,
                term: 1,
                timestamp_ms: index,
            };
            let command = &commands[(index % 1024) as usize];
            black_box(native.apply(&ctx, black_box(command)).is_ok());
        }
    });
    fuel.sort_unstable();
    bench("plugin.apply.kv_put16", ns(wasm), "ns");
    bench("plugin.apply.native_kv_put16", ns(native_ns), "ns");
    bench(
        "plugin.apply.kv_put16_vs_native",
        ns(wasm) / ns(native_ns),
        "ratio",
    );
    bench(
        "plugin.apply.kv_put16_fuel",
        fuel[fuel.len() / 2] as f64,
        "fuel",
    );

    // The same puts handed over 64 at a time, as a node applies the entries
    // committed together (same outcomes as one by one, fewer guest calls).
    const BATCH: u64 = 64;
    let mut batched = runtime.start(&plugin)?;
    let mut index = 0u64;
    let batch_ns = median_per_op(PER_ROUND, || {
        for _ in 0..PER_ROUND / BATCH {
            let entries: Vec<(ApplyContext, &[u8])> = (0..BATCH)
                .map(|_| {
                    index += 1;
                    let ctx = at(index);
                    (ctx, commands[(index % 1024) as usize].as_slice())
                })
                .collect();
            let outcomes = batched.apply_batch(&entries);
            assert!(outcomes.iter().all(|o| o.result.is_ok()));
        }
    });
    bench("plugin.apply.kv_put16_batch64", ns(batch_ns), "ns");
    bench(
        "plugin.apply.kv_put16_batch64_vs_native",
        ns(batch_ns) / ns(native_ns),
        "ratio",
    );

    // The floor: the smallest apply there is (decode a one-byte command, bump
    // a counter, encode a varint), through the same runtime and SDK path.
    let panicker = runtime.load(&std::fs::read(dir.join("panicker.wasm"))?)?;
    let mut floor = runtime.start(&panicker)?;
    let increment = encode(&kythira_testing_panicker::Command::Increment)?;
    let mut index = 0u64;
    let mut floor_fuel = 0;
    let minimal = median_per_op(PER_ROUND, || {
        for _ in 0..PER_ROUND {
            index += 1;
            let ctx = at(index);
            let outcome = floor.apply(ctx, &increment);
            assert!(outcome.result.is_ok());
            floor_fuel = outcome.fuel_used;
        }
    });
    bench("plugin.apply.minimal", ns(minimal), "ns");
    bench("plugin.apply.minimal_fuel", floor_fuel as f64, "fuel");

    // The boundary alone: `get-state` of an eight-byte state, one call into
    // the guest that does next to nothing.
    let tiny = median_per_op(PER_ROUND, || {
        for _ in 0..PER_ROUND {
            assert!(floor.get_state().result.is_ok());
        }
    });
    bench("plugin.call.get_state_tiny", ns(tiny), "ns");

    // Instantiation from a loaded plugin (pooling allocator, pre-instantiated).
    let start = median_per_op(200, || {
        for _ in 0..200 {
            black_box(runtime.start(&plugin).expect("start"));
        }
    });
    bench("plugin.instantiate.cached", ns(start) / 1e3, "us");

    // Loading from the artifact cache (deserialize + validate).
    let load = median_per_op(20, || {
        for _ in 0..20 {
            black_box(runtime.load(&kv).expect("load"));
        }
    });
    bench("plugin.load.cached", ns(load) / 1e3, "us");

    // get-state + restore of a 10 MB state (160 values of 64 KiB).
    let mut big = runtime.start(&plugin)?;
    for i in 0..160u64 {
        let put = encode(&Command::Put {
            key: format!("blob{i:04}").into_bytes(),
            value: vec![i as u8; 64 << 10],
        })?;
        big.apply(at(i + 1), &put).result?;
    }
    let mut fresh = runtime.start(&plugin)?;
    let snapshot = median_per_op(1, || {
        let state = big.get_state().result.expect("get-state");
        assert!(state.len() >= 10 << 20);
        fresh.restore(&state, 160).result.expect("restore");
    });
    bench("plugin.snapshot.10mb", ns(snapshot) / 1e6, "ms");
    Ok(())
}

/// The context of the entry at `index`, stamped with its index as time.
fn at(index: u64) -> ApplyContext {
    ApplyContext {
        index,
        term: 1,
        timestamp_ms: index,
    }
}

/// Median over [`ROUNDS`] runs of `round`, per operation (`ops` per round).
fn median_per_op(ops: u64, mut round: impl FnMut()) -> Duration {
    round(); // warm-up
    let mut times: Vec<Duration> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            round();
            started.elapsed() / u32::try_from(ops).expect("ops fit u32")
        })
        .collect();
    times.sort_unstable();
    times[ROUNDS / 2]
}

fn ns(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

fn bench(name: &str, value: f64, unit: &str) {
    println!("BENCH name={name} value={value:.3} unit={unit}");
}
