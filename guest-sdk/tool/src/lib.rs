//! Build steps for Kythira plugins that cargo cannot do on its own.
//!
//! A plugin crate built for `wasm32-unknown-unknown` is a core WebAssembly
//! module that carries its WIT world in a `component-type` custom section
//! (wit-bindgen puts it there). [`componentize`] turns such a module into the
//! component the Kythira runtime loads, stamped with the version of the WIT
//! package it was built against.

use anyhow::Context as _;
use wasm_encoder::{ComponentSection as _, CustomSection, Encode as _};
use wit_component::ComponentEncoder;

/// The custom section that names the WIT package a component was built
/// against, e.g. `kythira:state-machine@0.3.0`. The component model keeps no
/// trace of a world's package in a component that exports bare functions,
/// so without it a host could only guess a version from which functions
/// are missing; with it, a host refuses another version by name.
pub const WIT_SECTION: &str = "kythira:wit";

/// Wraps a core module built with wit-bindgen into a validated component.
///
/// # Errors
///
/// If the module carries no component type information, does not match the
/// world it declares, or the resulting component does not validate.
pub fn componentize(core_module: &[u8]) -> anyhow::Result<Vec<u8>> {
    if wasmparser::Parser::is_component(core_module) {
        anyhow::bail!("input is already a component, not a core module");
    }
    // Without this section the encoder would happily produce an empty
    // component that exports nothing; refuse early with the likely cause.
    if !has_component_type(core_module)? {
        anyhow::bail!(
            "core module carries no component type information (was it built with the kythira-guest SDK's export! macro?)"
        );
    }
    let (_, bindgen) = wit_component::metadata::decode(core_module)
        .context("reading the core module's component type information")?;
    // Decoding merges the module's worlds into a synthetic root world, so
    // the package is found among the resolved ones by name.
    let package = bindgen
        .resolve
        .packages
        .iter()
        .map(|(_, p)| &p.name)
        .find(|name| name.namespace == "kythira" && name.name == "state-machine")
        .map(ToString::to_string)
        .context("the module was not built against the kythira:state-machine WIT package")?;
    let mut component = ComponentEncoder::default()
        .validate(true)
        .module(core_module)
        .context("reading the core module's component type information")?
        .encode()
        .context("core module does not form a valid component")?;
    stamp(&mut component, &package);
    Ok(component)
}

/// Appends the [`WIT_SECTION`] naming `package` to a component. Custom
/// sections may come anywhere and change nothing the component does.
fn stamp(component: &mut Vec<u8>, package: &str) {
    let section = CustomSection {
        name: WIT_SECTION.into(),
        data: package.as_bytes().into(),
    };
    component.push(section.id());
    section.encode(component);
}

/// Whether the module has a `component-type` custom section, where wit-bindgen
/// records the world the module implements (possibly with a suffix).
fn has_component_type(core_module: &[u8]) -> anyhow::Result<bool> {
    for payload in wasmparser::Parser::new(0).parse_all(core_module) {
        if let wasmparser::Payload::CustomSection(section) =
            payload.context("input is not a valid WebAssembly module")?
            && section.name().starts_with("component-type")
        {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use wit_component::{StringEncoding, dummy_module, embed_component_metadata};
    use wit_parser::{ManglingAndAbi, Resolve};

    /// A core module exporting the Kythira world, with its metadata embedded
    /// exactly as wit-bindgen does.
    fn state_machine_core_module() -> Vec<u8> {
        let mut resolve = Resolve::default();
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit");
        let (package, _) = resolve.push_path(&wit).unwrap();
        let world = resolve
            .select_world(&[package], Some("state-machine"))
            .unwrap();
        let mut module = dummy_module(&resolve, world, ManglingAndAbi::Standard32);
        embed_component_metadata(&mut module, &resolve, world, StringEncoding::UTF8, false)
            .unwrap();
        module
    }

    #[test]
    fn componentizes_a_state_machine_module() {
        let component = componentize(&state_machine_core_module()).unwrap();
        assert!(wasmparser::Parser::is_component(&component));

        let mut exports = Vec::new();
        let mut imports = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&component) {
            match payload.unwrap() {
                wasmparser::Payload::ComponentExportSection(section) => {
                    for export in section {
                        exports.push(export.unwrap().name.name.to_owned());
                    }
                }
                wasmparser::Payload::ComponentImportSection(section) => {
                    for import in section {
                        imports.push(import.unwrap().name.name.to_owned());
                    }
                }
                _ => {}
            }
        }
        exports.sort();
        assert_eq!(
            exports,
            [
                "apply",
                "apply-batch",
                "command-from-json",
                "get-state",
                "query",
                "query-from-json",
                "query-response-to-json",
                "response-to-json",
                "restore-from-snapshot"
            ]
        );
        // Types defined at world level are imported by the component; they
        // grant nothing. No function or interface is imported.
        imports.sort();
        assert_eq!(imports, ["apply-context", "batch-result"]);
    }

    #[test]
    fn stamps_the_wit_package_it_was_built_against() {
        let component = componentize(&state_machine_core_module()).unwrap();
        let wit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../wit/state-machine.wit"),
        )
        .unwrap();
        let package = wit
            .lines()
            .find_map(|l| l.strip_prefix("package ")?.strip_suffix(';'))
            .unwrap();
        let mut stamps = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&component) {
            if let wasmparser::Payload::CustomSection(section) = payload.unwrap()
                && section.name() == WIT_SECTION
            {
                stamps.push(String::from_utf8(section.data().to_vec()).unwrap());
            }
        }
        assert_eq!(stamps, [package]);
        // The stamp is the component's last section, outside every module.
        let section_len = 1 + 1 + 1 + WIT_SECTION.len() + package.len();
        assert!(component.ends_with(package.as_bytes()));
        assert_eq!(component[component.len() - section_len], 0);
    }

    #[test]
    fn refuses_a_module_without_component_type() {
        // The smallest valid core module: magic and version only.
        let bare = b"\0asm\x01\0\0\0";
        let error = componentize(bare).unwrap_err();
        assert!(
            format!("{error:#}").contains("valid component")
                || format!("{error:#}").contains("component type"),
            "{error:#}"
        );
    }

    #[test]
    fn refuses_a_component() {
        let component = componentize(&state_machine_core_module()).unwrap();
        let error = componentize(&component).unwrap_err();
        assert!(error.to_string().contains("already a component"), "{error}");
    }

    #[test]
    fn refuses_garbage() {
        let error = componentize(b"not wasm at all").unwrap_err();
        assert!(
            error.to_string().contains("not a valid WebAssembly module"),
            "{error:#}"
        );
    }
}
