# Kythira task runner. `just --list` shows every recipe.

set shell := ["bash", "-euo", "pipefail", "-c"]

plugin_out := "target/plugins"

default:
    @just --list

# Install the compilation targets the plugins need (idempotent).
setup:
    rustup target add wasm32-unknown-unknown wasm32-wasip2

# Build every plugin (examples and misbehaving test plugins) into components under target/plugins/.
plugins: setup
    bash guest-sdk/build-plugins.sh {{plugin_out}}

# Main job: a local 3-node cluster of `kythira serve` processes serving the kv plugin
# (`just demo --keep` leaves it up until Ctrl-C).
demo *ARGS: plugins
    cargo run -p kythira -- demo --plugins {{plugin_out}} {{ARGS}}

# The plugin runtime alone, in one process.
demo-plugin: plugins
    cargo run -p kythira -- demo-plugin --plugins {{plugin_out}}

# System tools the tests use: strace, which fails chosen system calls for the
# storage fault tests (from Debian's packages when missing).
tools:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v strace >/dev/null && exit 0
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq strace >/dev/null
    command -v strace

# The whole test suite: simulator sweeps (3, 5 and 1-7 nodes), the mutant hunt, then every unit and integration test.
test: plugins tools
    just sim --seeds 2000 --nodes 3
    just sim --seeds 2000 --nodes 5
    just sim --seeds 1000 --nodes mixed
    just sim-mutants
    cargo nextest run --workspace --no-fail-fast

# Long storage fault runs, outside CI: 20,000 power-loss crash states over five
# seeds, 500 SIGKILL rounds, and 16 injection points per failing-disk case.
crash-long: tools
    #!/usr/bin/env bash
    set -euo pipefail
    for seed in 1 2 3 4 5; do
        KYTHIRA_POWER_STATES=4000 KYTHIRA_POWER_SEED=$seed \
            cargo nextest run -p kythira-storage --test power_loss --no-capture
    done
    KYTHIRA_CRASH_ROUNDS=500 cargo nextest run -p kythira-storage --test crash
    KYTHIRA_FAULT_POINTS=16 cargo nextest run -p kythira-storage --test faults --no-capture

# Run the deterministic cluster simulator with the core's assertions on, e.g.
# `just sim --seeds 100 --nodes 5`, `just sim --seeds 100 --nodes mixed` or
# `just sim --seed 42` (`SIM_DEBUG=1` prints every node's state at a failure).
sim *ARGS:
    cargo run --profile sim -p kythira-sim --bin sim -- {{ARGS}}

# The long sweep, outside CI: 100,000 seeds at 3 and at 5 nodes (about an hour on 2 cores).
sim-long:
    just sim --seeds 100000 --nodes 3
    just sim --seeds 100000 --nodes 5

# Inject classic Raft bugs one at a time: each must be caught within the seeds
# `just test` sweeps; prints each one's catch rate over a fixed sample
# (`--only NAME --seed S --nodes N` replays one catch).
sim-mutants *ARGS:
    cargo run --profile sim -p kythira-sim --features mutants --bin sim-mutants -- {{ARGS}}

# Every benchmark.
bench: bench-core bench-storage bench-plugin bench-lin bench-snapshot bench-cluster

bench-core:
    cargo run --release -p kythira-sim --bin bench-core

bench-storage:
    cargo bench -p kythira-storage --bench storage

bench-plugin: plugins
    cargo bench -p kythira-runtime --bench plugin

bench-lin:
    cargo bench -p kythira-linearizability --bench check

# A 16 MiB kv state snapshotted as a node does it: the applier's copy against
# a plain copy of the same bytes, writing with fsync, installing.
bench-snapshot: plugins
    cargo bench -p kythira-node --bench snapshot

# A local 3-node cluster of release `kythira serve` processes (fsync on): 1, 16
# and 64 clients writing 100-byte values for 10 s each, with the fdatasync and
# loopback QUIC baselines measured in the same run.
bench-cluster: plugins
    cargo build --release -p kythira
    target/release/kythira bench --local --plugins {{plugin_out}} --clients 1,16,64 --duration 10s --warmup 1s --value-size 100

# Create plugins/NAME from the template; it builds and passes its tests as created.
new-plugin NAME:
    bash guest-sdk/new-plugin.sh {{NAME}}

lint:
    cargo fmt --all --check
    cargo clippy --workspace --all-targets -- -D warnings
