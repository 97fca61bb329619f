//! What the runtime refuses at load time, and why.

mod support;

use kythira_runtime::LoadError;
use support::{component, runtime};

#[test]
fn wasi_plugin_is_refused_naming_the_import() {
    let err = runtime().load(&component("wasi")).unwrap_err();
    match &err {
        LoadError::ForbiddenImport { name } => assert!(name.starts_with("wasi:"), "{name}"),
        other => panic!("expected ForbiddenImport, got {other:?}"),
    }
    assert!(err.to_string().contains("may import nothing"), "{err}");
}

#[test]
fn garbage_is_not_wasm() {
    assert_eq!(
        runtime().load(b"definitely not wasm").unwrap_err(),
        LoadError::NotWasm
    );
}

#[test]
fn core_module_is_refused_with_a_hint() {
    // The smallest valid core module: magic and version 1.
    let err = runtime().load(b"\0asm\x01\0\0\0").unwrap_err();
    assert_eq!(err, LoadError::CoreModule);
    assert!(err.to_string().contains("componentize"));
}

#[test]
fn component_of_another_world_is_refused_naming_the_missing_export() {
    // The smallest valid component: it exports nothing.
    let err = runtime().load(b"\0asm\x0d\0\x01\0").unwrap_err();
    assert_eq!(
        err,
        LoadError::MissingExport {
            name: "apply".into()
        }
    );
}

/// `component` with a custom section `name` holding `data` appended (every
/// length here fits one LEB128 byte).
fn with_custom_section(mut component: Vec<u8>, name: &str, data: &str) -> Vec<u8> {
    let body_len = 1 + name.len() + data.len();
    assert!(body_len < 128 && name.len() < 128);
    component.extend([0, body_len as u8, name.len() as u8]);
    component.extend(name.as_bytes());
    component.extend(data.as_bytes());
    component
}

#[test]
fn component_of_another_wit_version_is_refused_naming_both() {
    // A component that exports nothing: the version is checked before the
    // world's functions are.
    let empty = b"\0asm\x0d\0\x01\0".to_vec();
    let bytes = with_custom_section(empty, "kythira:wit", "kythira:state-machine@0.4.0");
    let err = runtime().load(&bytes).unwrap_err();
    assert_eq!(
        err,
        LoadError::WitVersion {
            found: "kythira:state-machine@0.4.0".into(),
            expected: kythira_runtime::WIT_PACKAGE.into(),
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("@0.4.0") && message.contains(kythira_runtime::WIT_PACKAGE),
        "{message}"
    );
}

#[test]
fn the_sdk_stamps_the_version_this_host_runs() {
    let kv = component("kv");
    let stamp = with_custom_section(Vec::new(), "kythira:wit", kythira_runtime::WIT_PACKAGE);
    assert!(
        kv.ends_with(&stamp),
        "kv.wasm carries no stamp of {}",
        kythira_runtime::WIT_PACKAGE
    );
    runtime()
        .load(&kv)
        .expect("a component of this version loads");
}

#[test]
fn truncated_component_is_invalid() {
    let bytes = component("kv");
    let err = runtime().load(&bytes[..bytes.len() / 2]).unwrap_err();
    assert!(matches!(err, LoadError::Invalid(_)), "{err:?}");
}

#[test]
fn runtime_keeps_serving_after_refusals() {
    let runtime = runtime();
    assert!(runtime.load(&component("wasi")).is_err());
    assert!(runtime.load(b"junk").is_err());
    let plugin = runtime.load(&component("kv")).expect("kv loads");
    let mut machine = runtime.start(&plugin).expect("start");
    assert!(machine.get_state().result.is_ok());
}

#[test]
fn cached_artifact_loads_and_damaged_one_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let config = || kythira_runtime::RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        max_machines: 2,
        ..Default::default()
    };
    let bytes = component("counter");
    let first = kythira_runtime::Runtime::new(config())
        .unwrap()
        .load(&bytes)
        .unwrap();
    let artifacts: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(
        artifacts[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&first.hash().to_string())
    );

    // An intact artifact is loaded as it is, not rewritten.
    let modified = std::fs::metadata(&artifacts[0])
        .unwrap()
        .modified()
        .unwrap();
    let cached = kythira_runtime::Runtime::new(config())
        .unwrap()
        .load(&bytes)
        .unwrap();
    assert_eq!(cached.hash(), first.hash());
    assert_eq!(
        std::fs::metadata(&artifacts[0])
            .unwrap()
            .modified()
            .unwrap(),
        modified
    );

    // Flip a byte in the middle of the artifact: the checksum catches it, the
    // runtime recompiles instead of trusting it.
    let mut damaged = std::fs::read(&artifacts[0]).unwrap();
    let middle = damaged.len() / 2;
    damaged[middle] ^= 0xff;
    std::fs::write(&artifacts[0], &damaged).unwrap();
    let runtime = kythira_runtime::Runtime::new(config()).unwrap();
    let again = runtime.load(&bytes).unwrap();
    assert_eq!(again.hash(), first.hash());
    let mut machine = runtime.start(&again).unwrap();
    assert!(machine.get_state().result.is_ok());
    assert_ne!(
        std::fs::read(&artifacts[0]).unwrap(),
        damaged,
        "artifact rewritten"
    );
}

#[test]
fn artifact_under_another_plugins_name_is_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = || {
        kythira_runtime::Runtime::new(kythira_runtime::RuntimeConfig {
            cache_dir: Some(dir.path().to_path_buf()),
            max_machines: 2,
            ..Default::default()
        })
        .unwrap()
    };
    let counter = runtime().load(&component("counter")).unwrap();
    let artifact = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let name = artifact.file_name().unwrap().to_string_lossy().into_owned();
    // Plant the counter's compiled code where kv's would be.
    let kv_bytes = component("kv");
    let kv_hash = kythira_runtime::PluginHash::of(&kv_bytes).to_string();
    let planted = dir
        .path()
        .join(name.replacen(&counter.hash().to_string(), &kv_hash, 1));
    std::fs::copy(&artifact, &planted).unwrap();

    let other = runtime();
    let runtime = runtime();
    let kv = runtime.load(&kv_bytes).unwrap();
    assert!(matches!(
        other.start(&kv),
        Err(kythira_runtime::CallError::Internal(message)) if message.contains("another runtime")
    ));
    let mut machine = runtime.start(&kv).unwrap();
    let get = kythira_guest::codec::encode(&kythira_plugin_kv::Query::Get { key: b"k".to_vec() })
        .unwrap();
    let answer = machine
        .query(&get)
        .result
        .expect("kv's own code answers a kv query");
    assert_eq!(
        kythira_guest::codec::decode::<kythira_plugin_kv::Response>(&answer).unwrap(),
        kythira_plugin_kv::Response::Value(None)
    );
}
