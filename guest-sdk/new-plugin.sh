#!/usr/bin/env bash
# Creates a plugin crate from guest-sdk/template/; it builds and passes its
# tests as created.
#
#   guest-sdk/new-plugin.sh NAME [PARENT_DIR]
#
# NAME: lowercase letters, digits and dashes; the crate is kythira-plugin-NAME
# and the state-machine type is NAME in CamelCase. PARENT_DIR defaults to the
# repository's plugins/.
#
# If the root workspace does not already take the new directory in, the plugin
# is made its own workspace (with the `plugin` build profile) and the line to
# add to the root Cargo.toml's members is printed.
set -euo pipefail

usage() {
    echo "usage: $0 NAME [PARENT_DIR]" >&2
    exit 2
}
[[ $# -ge 1 && $# -le 2 ]] || usage

name=$1
if [[ ! $name =~ ^[a-z][a-z0-9]*(-[a-z0-9]+)*$ ]]; then
    echo "error: plugin name '$name' must be lowercase letters, digits and single dashes, starting with a letter" >&2
    exit 2
fi
sdk=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$sdk")
parent=${2:-$root/plugins}
mkdir -p "$parent"
parent=$(cd "$parent" && pwd)
dir=$parent/$name
if [[ -e $dir ]]; then
    echo "error: $dir already exists" >&2
    exit 1
fi

type_name=$(sed -E 's/(^|-)([a-z0-9])/\U\2/g' <<<"$name")
# Relative inside the repository, so that it survives moving the checkout.
if [[ $dir == "$root"/* ]]; then
    sdk_path=$(realpath -m --relative-to="$dir" "$sdk")
else
    sdk_path=$sdk
fi

mkdir -p "$dir/src"
sed -e "s|{{name}}|$name|g" -e "s|{{sdk}}|$sdk_path|g" \
    "$sdk/template/Cargo.toml.template" >"$dir/Cargo.toml"
sed -e "s/TemplateMachine/$type_name/g" "$sdk/template/src/lib.rs" >"$dir/src/lib.rs"

plugin_profile='
# Plugin components: small and fast (the same profile as the Kythira workspace).
[profile.plugin]
inherits = "release"
opt-level = "s"
lto = true
codegen-units = 1
strip = true
debug = false
panic = "abort"'

# Which workspace does cargo put the new package in?
if workspace=$(cargo locate-project --workspace --message-format plain \
    --manifest-path "$dir/Cargo.toml" 2>"$dir/.locate-error"); then
    rm "$dir/.locate-error"
    if [[ $workspace == "$dir/Cargo.toml" ]]; then
        # Outside any workspace: a workspace of its own already.
        standalone=1
        membership="its own workspace"
    else
        standalone=0
        printf '\n[lints]\nworkspace = true\n' >>"$dir/Cargo.toml"
        membership="a member of the workspace at $workspace"
    fi
elif grep -q "believes it's in a workspace when it's not" "$dir/.locate-error"; then
    rm "$dir/.locate-error"
    # Inside a workspace that does not list it: its own workspace until added.
    standalone=1
    member=$(realpath --relative-to="$root" "$dir")
    {
        printf '\n# Its own workspace until "%s" is added to the members of the\n' "$member"
        printf '# root Cargo.toml; then delete this table and the profile below.\n[workspace]\n'
    } >>"$dir/Cargo.toml"
    membership="its own workspace; to make it a member, add \"$member\" to members in $root/Cargo.toml and delete its [workspace] table and [profile.plugin]"
else
    echo "error: cargo cannot place $dir in a workspace:" >&2
    cat "$dir/.locate-error" >&2
    rm -r "$dir"
    exit 1
fi
if ((standalone)); then
    printf '%s\n' "$plugin_profile" >>"$dir/Cargo.toml"
    # Start from the dependency versions the repository builds with.
    if [[ -f $root/Cargo.lock ]]; then
        cp "$root/Cargo.lock" "$dir/Cargo.lock"
    fi
fi

cat <<MSG
created $dir (crate kythira-plugin-$name, type $type_name), $membership.

next:
  cargo test --manifest-path $dir/Cargo.toml
  cargo build --manifest-path $dir/Cargo.toml --profile plugin --target wasm32-unknown-unknown
  kythira-plugin componentize <target>/wasm32-unknown-unknown/plugin/kythira_plugin_${name//-/_}.wasm -o $name.wasm
MSG
