//! On-disk cache of compiled components.
//!
//! Compiling a component costs tens of milliseconds (much more in debug builds);
//! loading a compiled artifact costs tens of microseconds. Artifacts are keyed by
//! the component's sha256 and a hash of every engine setting that affects code
//! generation, so an artifact is only ever loaded into an engine it was built for.

use std::fs;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::{PluginHash, RuntimeError};

#[derive(Debug)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
    engine_key: u64,
}

/// Length of the checksum that prefixes every artifact file.
const CHECKSUM_LEN: usize = 32;

impl ArtifactCache {
    pub(crate) fn open(dir: &Path, engine: &Engine) -> Result<Self, RuntimeError> {
        fs::create_dir_all(dir).map_err(|source| RuntimeError::Cache {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key: hasher.finish(),
        })
    }

    fn path(&self, hash: &PluginHash) -> PathBuf {
        self.dir
            .join(format!("{hash}-{:016x}.cwasm", self.engine_key))
    }

    /// Returns the cached artifact for `hash`, or `None` when there is none or it
    /// is unusable (a damaged file is removed and recompiled, never trusted).
    pub(crate) fn get(&self, engine: &Engine, hash: &PluginHash) -> Option<Component> {
        let path = self.path(hash);
        let file = fs::read(&path).ok()?;
        let valid = file.len() > CHECKSUM_LEN
            && self.checksum(hash, &file[CHECKSUM_LEN..]).as_slice() == &file[..CHECKSUM_LEN];
        if !valid {
            tracing::warn!(path = %path.display(), "damaged compiled artifact; recompiling");
            let _ = fs::remove_file(&path);
            return None;
        }
        // SAFETY: `Component::deserialize` requires bytes produced by
        // `Engine::precompile_component` for a compatible engine. The file name
        // carries the engine's compatibility hash, the checksum (over plugin
        // hash, engine key and bytes) proves the bytes are exactly what `put`
        // wrote for this plugin and engine, and only `put` writes into this
        // directory (the daemon owns it).
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize(engine, &file[CHECKSUM_LEN..]) };
        match component {
            Ok(component) => Some(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unloadable compiled artifact; recompiling");
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Binds the artifact to the plugin and engine it was compiled for, so a
    /// file copied under another plugin's name is rejected too.
    fn checksum(&self, hash: &PluginHash, artifact: &[u8]) -> [u8; 32] {
        let mut digest = Sha256::new();
        digest.update(hash.0);
        digest.update(self.engine_key.to_le_bytes());
        digest.update(artifact);
        digest.finalize().into()
    }

    /// Stores an artifact. Failures are logged and ignored: the cache only saves
    /// time. No fsync: a torn file after a crash fails its checksum and is rebuilt.
    pub(crate) fn put(&self, hash: &PluginHash, artifact: &[u8]) {
        let path = self.path(hash);
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{hash}.{}.{unique}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = fs::File::create(&tmp)?;
            file.write_all(&self.checksum(hash, artifact))?;
            file.write_all(artifact)?;
            drop(file);
            // Rename is atomic: concurrent loaders see no file or a whole one.
            fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            tracing::warn!(path = %path.display(), error = %e, "cannot cache compiled artifact");
            let _ = fs::remove_file(&tmp);
        }
    }
}
