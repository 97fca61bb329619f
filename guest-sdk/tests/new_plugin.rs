//! `new-plugin.sh` creates a plugin that builds and passes its own tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("new-plugin.sh")
}

fn new_plugin(name: &str, parent: &Path) -> Output {
    Command::new("bash")
        .arg(script())
        .arg(name)
        .arg(parent)
        .output()
        .expect("bash runs")
}

fn cargo() -> Command {
    // The cargo running this test, falling back to the one on PATH.
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

#[test]
fn template_builds_and_passes_its_tests() {
    let parent = tempfile::tempdir().unwrap();
    let created = new_plugin("tally-board", parent.path());
    assert!(
        created.status.success(),
        "new-plugin.sh failed: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let dir = parent.path().join("tally-board");
    let lib = std::fs::read_to_string(dir.join("src/lib.rs")).unwrap();
    assert!(lib.contains("kythira_guest::export!(TallyBoard);"));
    assert!(!lib.contains("TemplateMachine"));
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(manifest.contains("name = \"kythira-plugin-tally-board\""));
    assert!(manifest.contains("[profile.plugin]"));

    let tested = cargo()
        .arg("test")
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", parent.path().join("target"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&tested.stdout);
    assert!(
        tested.status.success(),
        "the new plugin's tests fail:\n{stdout}\n{}",
        String::from_utf8_lossy(&tested.stderr)
    );
    assert!(stdout.contains("test result: ok. 4 passed"), "{stdout}");
}

#[test]
fn refuses_bad_names_and_existing_directories() {
    let parent = tempfile::tempdir().unwrap();
    for bad in [
        "Upper",
        "under_score",
        "-dash",
        "trailing-",
        "double--dash",
        "9lives",
    ] {
        let output = new_plugin(bad, parent.path());
        assert_eq!(output.status.code(), Some(2), "{bad} was accepted");
        assert!(!parent.path().join(bad).exists());
    }

    std::fs::create_dir(parent.path().join("taken")).unwrap();
    let output = new_plugin("taken", parent.path());
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("already exists"));
}
