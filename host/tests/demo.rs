//! The README's main command, `just demo`, runs `kythira demo`: three real
//! processes, the CLI against them, the leader killed and the data still there.

use std::path::PathBuf;

#[test]
fn the_demo_runs_as_the_readme_runs_it() {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args(["demo", "--plugins"])
        .arg(&plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for expected in [
        "$ kythira deploy kv",
        "deployed kv at index",
        r#"{"value":"hello"}"#,
        "killing the leader",
        r#"{"value":"kythira"}"#,
        "leads now and serves what node",
        "demo finished; all nodes stopped",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
