//! Loading a component: recognize, compile (or fetch from the cache), validate.

use std::fmt;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use crate::bindings::StateMachinePre;
use crate::machine::StoreData;
use crate::{LoadError, Runtime};

/// The sha256 of a component's bytes: its identity in the replicated log, in
/// snapshots and in the artifact cache.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PluginHash(pub [u8; 32]);

impl PluginHash {
    /// Hashes component bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }
}

impl fmt::Display for PluginHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PluginHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PluginHash({self})")
    }
}

/// A validated, compiled component, ready to instantiate. Cheap to clone.
#[derive(Clone)]
pub struct Plugin {
    hash: PluginHash,
    pre: Arc<StateMachinePre<StoreData>>,
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plugin").field("hash", &self.hash).finish()
    }
}

impl Plugin {
    /// The sha256 of the component's bytes.
    pub fn hash(&self) -> PluginHash {
        self.hash
    }

    pub(crate) fn pre(&self) -> &StateMachinePre<StoreData> {
        &self.pre
    }
}

/// The functions of the world, in the order their absence is reported.
const WORLD_EXPORTS: [&str; 9] = [
    "apply",
    "apply-batch",
    "query",
    "get-state",
    "restore-from-snapshot",
    "command-from-json",
    "query-from-json",
    "response-to-json",
    "query-response-to-json",
];

/// The WIT package this host runs.
pub const WIT_PACKAGE: &str = "kythira:state-machine@0.3.0";

/// The custom section in which `kythira-plugin componentize` names the WIT
/// package a component was built against.
const WIT_SECTION: &str = "kythira:wit";

/// The functions 0.3.0 added: a component without a stamp that lacks one of
/// them was built against an older package.
const ADDED_IN_0_3_0: [&str; 4] = [
    "command-from-json",
    "query-from-json",
    "response-to-json",
    "query-response-to-json",
];

pub(crate) fn load(runtime: &Runtime, bytes: &[u8]) -> Result<Plugin, LoadError> {
    check_header(bytes)?;
    // Before compiling: a component of another version is refused by name,
    // not by the first type that happens to differ.
    let stamp = stamped_package(bytes);
    if let Some(found) = &stamp
        && found != WIT_PACKAGE
    {
        return Err(LoadError::WitVersion {
            found: found.clone(),
            expected: WIT_PACKAGE.into(),
        });
    }
    let hash = PluginHash::of(bytes);
    let component = compile(runtime, &hash, bytes)?;
    let inner = &runtime.inner;
    let ty = component.component_type();
    if let Some((name, _)) = ty.imports(&inner.engine).next() {
        return Err(LoadError::ForbiddenImport {
            name: name.to_string(),
        });
    }
    for name in WORLD_EXPORTS {
        if ty.get_export(&inner.engine, name).is_none() {
            if stamp.is_none() && ADDED_IN_0_3_0.contains(&name) {
                return Err(LoadError::WitVersion {
                    found: format!(
                        "kythira:state-machine@0.2.0 or older (it lacks `{name}`, added in 0.3.0)"
                    ),
                    expected: WIT_PACKAGE.into(),
                });
            }
            return Err(LoadError::MissingExport {
                name: name.to_string(),
            });
        }
    }
    let instance_pre = inner
        .linker
        .instantiate_pre(&component)
        .map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
    // Checks every export's type against the world.
    let pre = StateMachinePre::new(instance_pre)
        .map_err(|e| LoadError::WrongExports(format!("{e:#}")))?;
    Ok(Plugin {
        hash,
        pre: Arc::new(pre),
    })
}

/// The package named by the component's own [`WIT_SECTION`], if it has one.
/// Only the component's top level counts: a section inside an embedded
/// module is that module's business. Bytes that do not parse are left to
/// the compiler, which reports them better.
fn stamped_package(bytes: &[u8]) -> Option<String> {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.ok()? {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.checked_sub(1)?,
            wasmparser::Payload::CustomSection(section)
                if depth == 0 && section.name() == WIT_SECTION =>
            {
                return String::from_utf8(section.data().to_vec()).ok();
            }
            _ => {}
        }
    }
    None
}

/// Tells a component from a core module or garbage before handing the bytes to
/// the compiler, whose errors for these cases are less helpful.
fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8; 4] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(LoadError::NotWasm);
    }
    // Bytes 4..8 are a version and a layer: layer 0 is a core module, layer 1 a
    // component.
    match bytes[6..8] {
        [0, 0] => Err(LoadError::CoreModule),
        [1, 0] => Ok(()),
        _ => Err(LoadError::Invalid(format!(
            "unknown WebAssembly layer {:02x}{:02x}",
            bytes[6], bytes[7]
        ))),
    }
}

fn compile(runtime: &Runtime, hash: &PluginHash, bytes: &[u8]) -> Result<Component, LoadError> {
    let inner = &runtime.inner;
    let invalid = |e: wasmtime::Error| LoadError::Invalid(format!("{e:#}"));
    let Some(cache) = &inner.cache else {
        return Component::new(&inner.engine, bytes).map_err(invalid);
    };
    if let Some(component) = cache.get(&inner.engine, hash) {
        return Ok(component);
    }
    let artifact = inner.engine.precompile_component(bytes).map_err(invalid)?;
    cache.put(hash, &artifact);
    // SAFETY: `artifact` was produced just now by this engine's
    // `precompile_component`, which is exactly what `deserialize` requires.
    #[allow(unsafe_code)]
    let component = unsafe { Component::deserialize(&inner.engine, &artifact) };
    component.map_err(invalid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_tells_garbage_modules_and_components_apart() {
        assert_eq!(check_header(b""), Err(LoadError::NotWasm));
        assert_eq!(check_header(b"hello, world"), Err(LoadError::NotWasm));
        assert_eq!(check_header(b"\0asm\x01\0\0\0"), Err(LoadError::CoreModule));
        assert_eq!(check_header(b"\0asm\x0d\0\x01\0"), Ok(()));
        assert!(matches!(
            check_header(b"\0asm\x0d\0\x07\0"),
            Err(LoadError::Invalid(_))
        ));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            PluginHash::of(b"").to_string(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
