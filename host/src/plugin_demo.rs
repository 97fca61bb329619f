//! `kythira demo-plugin`: the plugin half of the system, end to end, in one process.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use kythira_guest::codec::{decode, encode};
use kythira_plugin_kv::{Command, Query, Response, Scan};
use kythira_runtime::{ApplyContext, Outcome, Runtime, RuntimeConfig};

pub fn run(plugins: &Path) -> anyhow::Result<()> {
    let read = |name: &str| {
        let path = plugins.join(format!("{name}.wasm"));
        std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (build the plugins with `just plugins`)",
                path.display()
            )
        })
    };
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(plugins.join("artifact-cache")),
        ..RuntimeConfig::default()
    })?;
    let limits = runtime.limits();
    println!(
        "runtime: fuel per apply {}, memory cap {} MiB, artifact cache {}",
        limits.apply_fuel,
        limits.memory_bytes >> 20,
        plugins.join("artifact-cache").display()
    );

    let started = Instant::now();
    let kv = runtime.load(&read("kv")?)?;
    println!(
        "loaded kv plugin {} in {:.1?}",
        kv.hash(),
        started.elapsed()
    );
    let mut machine = runtime.start(&kv)?;
    let mut log = Log::default();

    println!("\n-- apply commands through the log --");
    let b = |s: &str| s.as_bytes().to_vec();
    for command in [
        Command::Put {
            key: b("greeting"),
            value: b("hello"),
        },
        Command::Put {
            key: b("lang/rust"),
            value: b("2015"),
        },
        Command::Put {
            key: b("lang/wasm"),
            value: b("2017"),
        },
        Command::Get { key: b("greeting") },
        Command::CompareAndSwap {
            key: b("greeting"),
            expected: Some(b("hi")),
            new: Some(b("hey")),
        },
        Command::CompareAndSwap {
            key: b("greeting"),
            expected: Some(b("hello")),
            new: Some(b("hey")),
        },
        Command::Scan(Scan {
            prefix: b("lang/"),
            start_after: None,
            limit: 10,
        }),
        Command::Delete {
            key: b("lang/wasm"),
        },
    ] {
        let ctx = log.next();
        let outcome = machine.apply(ctx, &encode(&command)?);
        println!(
            "[{:>2}] {:<60} -> {}",
            ctx.index,
            show_command(&command),
            show(&outcome)
        );
    }

    println!("\n-- read-only queries --");
    for query in [
        Query::Get { key: b("greeting") },
        Query::Scan(Scan {
            prefix: Vec::new(),
            start_after: None,
            limit: 10,
        }),
    ] {
        let outcome = machine.query(&encode(&query)?);
        println!("{:<65} -> {}", show_query(&query), show(&outcome));
    }

    println!("\n-- snapshot and restore --");
    let state = machine.get_state().result?;
    println!("get-state: {} bytes", state.len());
    let mut replica = runtime.start(&kv)?;
    replica.restore(&state, log.index).result?;
    let same = replica.get_state().result? == state;
    println!("restored into a fresh instance; state identical: {same}");
    if !same {
        bail!("restored state differs from the snapshot");
    }
    let outcome = replica.query(&encode(&Query::Get { key: b("greeting") })?);
    println!("replica answers greeting -> {}", show(&outcome));

    println!("\n-- misbehaving plugins are contained --");
    match runtime.load(&read("wasi")?) {
        Ok(_) => bail!("a WASI-importing plugin was accepted"),
        Err(e) => println!("wasi plugin refused: {e}"),
    }
    contain_loop(&runtime, &read("looper")?)?;
    println!("\ndemo finished");
    Ok(())
}

/// Shows that a plugin that loops forever is stopped by fuel, its state is
/// untouched and it keeps serving.
fn contain_loop(runtime: &Runtime, component: &[u8]) -> anyhow::Result<()> {
    use kythira_testing_looper::Command as Looper;
    let plugin = runtime.load(component)?;
    let mut machine = runtime.start(&plugin)?;
    let mut log = Log::default();
    machine
        .apply(log.next(), &encode(&Looper::Increment)?)
        .result?;
    let before = machine.get_state().result?;
    let outcome = machine.apply(log.next(), &encode(&Looper::Loop)?);
    println!(
        "looper: endless loop -> {} (fuel used {}, {:.1?})",
        outcome
            .result
            .as_ref()
            .err()
            .map_or("ok?".into(), ToString::to_string),
        outcome.fuel_used,
        outcome.duration
    );
    let unchanged = machine.get_state().result? == before;
    let next: u64 = decode(
        &machine
            .apply(log.next(), &encode(&Looper::Increment)?)
            .result?,
    )?;
    println!("looper: state unchanged {unchanged}; next increment answers {next}");
    if !unchanged || next != 2 {
        bail!("the looping call was not rolled back");
    }
    Ok(())
}

/// Hands out consecutive log positions, as the replicated log would.
#[derive(Default)]
struct Log {
    index: u64,
}

impl Log {
    fn next(&mut self) -> ApplyContext {
        self.index += 1;
        ApplyContext {
            index: self.index,
            term: 1,
            timestamp_ms: 1_767_225_600_000 + self.index,
        }
    }
}

fn show_command(command: &Command) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    match command {
        Command::Put { key, value } => format!("put {} = {}", text(key), text(value)),
        Command::Get { key } => format!("get {}", text(key)),
        Command::Delete { key } => format!("delete {}", text(key)),
        Command::CompareAndSwap { key, expected, new } => format!(
            "cas {} if {:?} then {:?}",
            text(key),
            expected.as_deref().map(text),
            new.as_deref().map(text)
        ),
        Command::Scan(scan) => format!("scan prefix {} limit {}", text(&scan.prefix), scan.limit),
    }
}

fn show_query(query: &Query) -> String {
    match query {
        Query::Get { key } => show_command(&Command::Get { key: key.clone() }),
        Query::Scan(scan) => show_command(&Command::Scan(scan.clone())),
    }
}

fn show(outcome: &Outcome<impl AsRef<[u8]>>) -> String {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let body = match &outcome.result {
        Err(e) => format!("error: {e}"),
        Ok(bytes) => match decode::<Response>(bytes.as_ref()) {
            Ok(Response::Value(v)) => format!("value {:?}", v.as_deref().map(text)),
            Ok(Response::Swapped) => "swapped".into(),
            Ok(Response::Mismatch { current }) => {
                format!("mismatch, current {:?}", current.as_deref().map(text))
            }
            Ok(Response::Entries { entries, more }) => format!(
                "{:?}{}",
                entries
                    .iter()
                    .map(|(k, v)| (text(k), text(v)))
                    .collect::<Vec<_>>(),
                if more { " (more)" } else { "" }
            ),
            Err(e) => format!("undecodable response: {e}"),
        },
    };
    format!("{body}  [fuel {}]", outcome.fuel_used)
}
