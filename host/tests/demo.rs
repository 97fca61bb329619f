//! The demos keep working: `kythira demo`, which the README's main command
//! (`just demo`) runs — three real processes, the CLI against them, the
//! leader killed and the data still there — and `kythira demo-plugin`, the
//! runtime alone in one process.

use std::path::PathBuf;

/// Runs `kythira <command> --plugins target/plugins`, insists it succeeds
/// and prints each of `expected`.
fn demo_prints(command: &str, expected: &[&str]) {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args([command, "--plugins"])
        .arg(&plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{command} failed:\n{stdout}\n{stderr}"
    );
    for e in expected {
        assert!(stdout.contains(e), "missing {e:?} in:\n{stdout}");
    }
}

#[test]
fn the_demo_runs_as_the_readme_runs_it() {
    demo_prints(
        "demo",
        &[
            "$ kythira deploy kv",
            "deployed kv at index",
            r#"{"value":"hello"}"#,
            "killing the leader",
            r#"{"value":"kythira"}"#,
            "leads now and serves what node",
            "demo finished; all nodes stopped",
        ],
    );
}

#[test]
fn the_plugin_demo_reports_what_it_did() {
    demo_prints(
        "demo-plugin",
        &[
            "loaded kv plugin",
            "put greeting = hello",
            "mismatch, current Some(\"hello\")",
            "swapped",
            "state identical: true",
            "wasi plugin refused",
            "ran out of fuel",
            "state unchanged true",
            "demo finished",
        ],
    );
}
