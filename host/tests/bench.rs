//! `kythira bench --local` runs end to end against its own cluster and prints
//! the machine-readable lines scripts read.

use std::path::PathBuf;

#[test]
fn local_bench_prints_bench_lines() {
    let plugins = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_kythira"))
        .args([
            "bench",
            "--local",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--clients",
            "2",
        ])
        .arg("--plugins")
        .arg(&plugins)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "bench failed:\n{stdout}\n{stderr}");
    for name in [
        "baseline.fdatasync_4k.p50",
        "baseline.quic_rtt.p50",
        "cluster.write.c2.ops",
        "cluster.write.c2.p50",
        "cluster.write.c2.p99",
        "cluster.write.c2.p999",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("BENCH name={name} value=")))
            .unwrap_or_else(|| panic!("no BENCH line for {name} in:\n{stdout}"));
        let value: f64 = line
            .split_whitespace()
            .find_map(|f| f.strip_prefix("value="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(value > 0.0, "{line}");
    }
    assert!(
        stdout.contains("BENCH name=cluster.write.c2.errors value=0 unit=count"),
        "{stdout}"
    );
}
