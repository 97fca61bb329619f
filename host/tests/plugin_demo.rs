//! `kythira demo-plugin` (one process, the runtime alone) keeps working.

use std::path::PathBuf;

#[test]
fn plugin_demo_runs_and_reports_what_it_did() {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let output = assert_cmd::Command::cargo_bin("kythira")
        .unwrap()
        .args(["demo-plugin", "--plugins"])
        .arg(&plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "loaded kv plugin",
        "put greeting = hello",
        "mismatch, current Some(\"hello\")",
        "swapped",
        "state identical: true",
        "wasi plugin refused",
        "ran out of fuel",
        "state unchanged true",
        "demo finished",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
