#!/usr/bin/env bash
# Builds every plugin into a component: OUTDIR/<name>.wasm.
#
#   guest-sdk/build-plugins.sh OUTDIR
#
# Plugins built for wasm32-unknown-unknown are core modules carrying their WIT
# world; `kythira-plugin componentize` turns each into a component. The WASI test
# plugin is built for wasm32-wasip2, whose linker already emits a component (one
# that imports wasi:*, which is the point of it). Respects CARGO_TARGET_DIR.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
out=$(cd "$1" && pwd)
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# A relative CARGO_TARGET_DIR means relative to where we were called from.
target_dir=${CARGO_TARGET_DIR:-$root/target}
mkdir -p "$target_dir"
target_dir=$(cd "$target_dir" && pwd)
export CARGO_TARGET_DIR=$target_dir
cd "$root"

# Component name, then package name.
plugins=(
    kv kythira-plugin-kv
    counter kythira-plugin-counter
    lock kythira-plugin-lock
    looper kythira-testing-looper
    memhog kythira-testing-memhog
    panicker kythira-testing-panicker
    bad-restore kythira-testing-bad-restore
    nan kythira-testing-nan
)
# Plugins built on another plugin's crate with its `component` feature off
# (kv2 on kv), each built by a cargo invocation of its own: in one that also
# builds the plugin it depends on, cargo unifies the dependency's features,
# turns `component` back on, and links both plugins' exports into one module
# (rust-lld: duplicate symbol `apply`).
separate=(
    kv2 kythira-plugin-kv2
)

packages=()
for ((i = 0; i < ${#plugins[@]}; i += 2)); do
    packages+=(-p "${plugins[i + 1]}")
done

cargo build --profile plugin --target wasm32-unknown-unknown "${packages[@]}"
for ((i = 0; i < ${#separate[@]}; i += 2)); do
    cargo build --profile plugin --target wasm32-unknown-unknown -p "${separate[i + 1]}"
done
cargo build --profile plugin --target wasm32-wasip2 -p kythira-testing-wasi
cargo build -p kythira-plugin-tool --bin kythira-plugin

tool="$target_dir/debug/kythira-plugin"
built=()
all=("${plugins[@]}" "${separate[@]}")
for ((i = 0; i < ${#all[@]}; i += 2)); do
    name=${all[i]}
    core="$target_dir/wasm32-unknown-unknown/plugin/${all[i + 1]//-/_}.wasm"
    "$tool" componentize "$core" -o "$out/$name.wasm"
    built+=("$out/$name.wasm")
done
cp "$target_dir/wasm32-wasip2/plugin/kythira_testing_wasi.wasm" "$out/wasi.wasm"
built+=("$out/wasi.wasm")

echo "built ${#built[@]} plugin components:"
for file in "${built[@]}"; do
    printf '  %-40s %8d bytes\n' "$file" "$(stat -c %s "$file")"
done
