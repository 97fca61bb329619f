//! Every kind of bad input a running cluster can meet, each refused with a
//! clear error while every node keeps serving.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use kythira::local::Options;
use kythira_api::{ApiError, Consistency, Payload};
use kythira_client::ClientError;
use kythira_transport::pki::{Ca, Identity, Role};
use kythira_transport::tls::{Alpn, Tls};
use support::*;

async fn connect(
    addr: SocketAddr,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, String> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(config);
    let connecting = ep.connect(addr, "kythira").map_err(|e| e.to_string())?;
    connecting.await.map_err(|e| e.to_string())
}

/// Sends `bytes` on a new stream and waits (bounded) for the server to
/// close the connection, as it must for a malformed frame.
async fn send_garbage(conn: &quinn::Connection, bytes: &[u8], uni: bool) {
    if uni {
        let mut s = conn.open_uni().await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
    } else {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        let _ = s.write_all(bytes).await;
        let _ = s.finish();
        let _ = tokio::time::timeout(Duration::from_secs(30), r.read_to_end(1 << 20)).await;
    }
    let closed = tokio::time::timeout(Duration::from_secs(30), conn.closed()).await;
    assert!(
        closed.is_ok(),
        "the server kept a connection that sent {bytes:?}"
    );
}

fn frames() -> Vec<Vec<u8>> {
    vec![
        // Garbage.
        b"\xde\xad\xbe\xef garbage that is no frame at all".to_vec(),
        // A header announcing 1 GiB.
        vec![0x40, 0, 0, 0, 1, 0, 0, 0],
        // A frame of version 9.
        vec![0, 0, 0, 2, 9, 1, 2],
        // A header promising 100 bytes, then the end of the stream.
        vec![0, 0, 0, 100, 1, 1, 2, 3],
        // A well-formed frame whose payload decodes to nothing sensible.
        vec![0, 0, 0, 4, 1, 0xff, 0xff, 0xff, 0xff],
    ]
}

/// Applies and reads through every node: the cluster still serves.
async fn still_serving(c: &support::TestCluster, tag: &str) {
    for id in c.ids() {
        let client = client_for(c, "app", vec![c.addr(id)]);
        let put = format!(r#"{{"put":{{"key":"{tag}-{id}","value":"ok"}}}}"#);
        client
            .apply("kv", Payload::Json(put))
            .await
            .expect("apply after bad input");
        let got = client
            .query(
                "kv",
                Payload::Json(format!(r#"{{"get":{{"key":"{tag}-{id}"}}}}"#)),
                Consistency::Linearizable,
            )
            .await
            .expect("query after bad input");
        assert_eq!(json(got), r#"{"value":"ok"}"#);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_on_either_port_close_only_that_connection() {
    let c = start(Options::default());
    deploy(&c, "kv");
    let admin = Tls::load(&c.client_files("admin")).unwrap();
    for bytes in frames() {
        let conn = connect(c.addr(2), admin.client_config(Alpn::Client).unwrap())
            .await
            .unwrap();
        send_garbage(&conn, &bytes, false).await;
    }
    // Node 1 dials node 3 in this cluster, so node 1's certificate may.
    let node1 = Tls::load(&kythira_transport::tls::TlsFiles {
        ca: c.dir().join("certs/ca.pem"),
        cert: c.dir().join("certs/node-1.pem"),
        key: c.dir().join("certs/node-1-key.pem"),
    })
    .unwrap();
    for bytes in frames() {
        let conn = connect(c.peer_addr(3), node1.client_config(Alpn::Peer).unwrap())
            .await
            .unwrap();
        send_garbage(&conn, &bytes, true).await;
    }
    still_serving(&c, "frames").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_that_are_not_the_clusters_clients_are_refused() {
    let c = start(Options::default());
    deploy(&c, "kv");
    let ca_pem = std::fs::read_to_string(c.dir().join("certs/ca.pem")).unwrap();
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pem(&ca_pem) {
            roots.add(cert).unwrap();
        }
        Arc::new(roots)
    };
    let provider = kythira_transport::tls::provider();
    let client_config =
        |builder: rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert>,
         cert: Option<(String, String)>| {
            let mut cfg = match cert {
                None => builder.with_no_client_auth(),
                Some((cert, key)) => builder
                    .with_client_auth_cert(rustls_pem(&cert), rustls_key(&key))
                    .unwrap(),
            };
            cfg.alpn_protocols = vec![b"kythira-client/1".to_vec()];
            let quic = quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap();
            quinn::ClientConfig::new(Arc::new(quic))
        };
    let builder = || {
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots.clone())
    };
    // No certificate at all; then one from another CA.
    let other = Ca::generate().unwrap();
    let stranger = other
        .issue(&Identity::client("stranger", Role::Admin).unwrap(), &[])
        .unwrap();
    // The probe works: the cluster's own admin certificate gets an answer.
    let admin = c.client_files("admin");
    let admin_cert = (
        std::fs::read_to_string(&admin.cert).unwrap(),
        std::fs::read_to_string(&admin.key).unwrap(),
    );
    assert!(answered(c.addr(1), client_config(builder(), Some(admin_cert))).await);
    for cert in [
        None,
        Some((stranger.cert_pem.clone(), stranger.key_pem.clone())),
    ] {
        let what = if cert.is_some() {
            "another CA's certificate"
        } else {
            "no certificate"
        };
        assert!(
            !answered(c.addr(1), client_config(builder(), cert)).await,
            "a client with {what} was answered"
        );
    }
    // A node's certificate used as a client's.
    let node = client_for_files(&c, "node-2");
    let err = node
        .query(
            "kv",
            Payload::Json(r#"{"get":{"key":"a"}}"#.into()),
            Consistency::Linearizable,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(ApiError::Unauthorized(m)) if m.contains("node certificate")),
        "{err}"
    );
    // A client-role certificate cannot deploy.
    let kv = plugin("kv");
    let e = cli_err(&c, "app", &["deploy", "kv2", kv.to_str().unwrap()]);
    assert!(e.contains("unauthorized"), "{e}");
    still_serving(&c, "certs").await;
}

/// Whether a well-formed `Ping` over a connection made with `config` gets
/// any answer at all.
async fn answered(addr: SocketAddr, config: quinn::ClientConfig) -> bool {
    let Ok(conn) = connect(addr, config).await else {
        return false;
    };
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    let payload = postcard::to_allocvec(&(1u64, kythira_api::Request::Ping)).unwrap();
    let mut frame = bytes::BytesMut::new();
    kythira_transport::frame::encode_frame(&payload, 1 << 20, &mut frame).unwrap();
    if send.write_all(&frame).await.is_err() {
        return false;
    }
    let mut header = [0u8; 5];
    matches!(
        tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut header)).await,
        Ok(Ok(()))
    )
}

fn client_for_files(c: &support::TestCluster, stem: &str) -> kythira_client::Client {
    let tls = Tls::load(&kythira_transport::tls::TlsFiles {
        ca: c.dir().join("certs/ca.pem"),
        cert: c.dir().join(format!("certs/{stem}.pem")),
        key: c.dir().join(format!("certs/{stem}-key.pem")),
    })
    .unwrap();
    let mut cfg = kythira_client::ClientConfig::new(c.endpoints(), tls);
    cfg.deadline = Duration::from_secs(30);
    kythira_client::Client::new(cfg).unwrap()
}

fn rustls_pem(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(Result::unwrap)
        .collect()
}

fn rustls_key(pem: &str) -> rustls::pki_types::PrivateKeyDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_commands_and_bad_code_are_clear_errors() {
    let c = start(Options::default());
    deploy(&c, "kv");
    // JSON the plugin does not know: refused before anything is proposed.
    let e = cli_err(&c, "app", &["apply", "kv", r#"{"putt":{"key":"a"}}"#]);
    assert!(e.contains("bad request") && e.contains("putt"), "{e}");
    let e = cli_err(&c, "app", &["apply", "kv", "not json"]);
    assert!(e.contains("bad request"), "{e}");
    // Bytes the plugin cannot decode: its apply refuses them, replicated.
    let client = client(&c, "app");
    let err = client
        .apply(
            "kv",
            Payload::Bytes(bytes::Bytes::from_static(b"\xff\xfe\xfd")),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Api(ApiError::Rejected(_))),
        "{err}"
    );
    // A session position that cannot be: refused before it is proposed.
    let err = client
        .request(
            &kythira_api::Request::Apply {
                machine: "kv".into(),
                command: Payload::Json(r#"{"get":{"key":"a"}}"#.into()),
                session: Some(kythira_api::SessionSeq {
                    id: 1,
                    serial: 1,
                    acked: 9,
                }),
            },
            true,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(ApiError::BadRequest(m)) if m.contains("acked")),
        "{err}"
    );
    // An entry too large for a peer frame would stall the log behind it.
    let huge = bytes::Bytes::from(vec![7u8; 15 << 20]);
    let err = client.apply("kv", Payload::Bytes(huge)).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api(ApiError::BadRequest(m)) if m.contains("log entry")),
        "{err}"
    );
    // A machine that does not exist.
    let e = cli_err(&c, "app", &["query", "nosuch", "{}"]);
    assert!(e.contains("nosuch"), "{e}");
    // Code that is not a component, and a component that imports WASI.
    let junk = c.dir().join("junk.wasm");
    std::fs::write(&junk, b"this is not wasm").unwrap();
    let e = cli_err(&c, "admin", &["deploy", "junk", junk.to_str().unwrap()]);
    assert!(
        e.contains("deploy refused") && e.contains("not a WebAssembly"),
        "{e}"
    );
    let wasi = plugin("wasi");
    let e = cli_err(&c, "admin", &["deploy", "wasi", wasi.to_str().unwrap()]);
    assert!(e.contains("deploy refused"), "{e}");
    // Limits a runtime cannot run under.
    let kv = plugin("kv");
    let e = cli_err(
        &c,
        "admin",
        &["deploy", "kv3", kv.to_str().unwrap(), "--apply-fuel", "5"],
    );
    assert!(e.contains("fuel"), "{e}");
    // Refused deploys leave no machine behind, on any node.
    let out = cli_ok(&c, "app", &["--json", "status"]);
    let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    for s in &all {
        let names: Vec<_> = s["status"]["machines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(names, ["kv"], "{out}");
    }
    still_serving(&c, "commands").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configs_and_foreign_data_directories_stop_the_node_with_a_reason() {
    let c = start(Options::default());
    deploy(&c, "kv");
    let exe = env!("CARGO_BIN_EXE_kythira");
    let good = std::fs::read_to_string(c.config_path(1)).unwrap();
    // Node 1's certificate from another CA, for another cluster's node 1.
    let other = Ca::generate().unwrap();
    let certs = c.dir().join("certs");
    other
        .write(&certs.join("other-ca.pem"), &certs.join("other-ca-key.pem"))
        .unwrap();
    other
        .issue(&Identity::Node(1), &["127.0.0.1".parse().unwrap()])
        .unwrap()
        .write(&certs.join("other-1.pem"), &certs.join("other-1-key.pem"))
        .unwrap();
    let cases = [
        (
            "unknown-key",
            good.replace("data_dir", "data_dri"),
            "data_dri",
        ),
        (
            "wrong-type",
            good.replace("id = 1", "id = \"one\""),
            "bad-wrong-type.toml:1",
        ),
        (
            "timeouts",
            good.replace("election_ticks = 10", "election_ticks = 4"),
            "short by 2",
        ),
        // Node 1's configuration on node 2's log.
        (
            "foreign-dir",
            good.replace("data/node-1", "data/node-2"),
            "belongs to node 2",
        ),
        // Node 1 of another cluster on this cluster's node 1 log.
        (
            "foreign-cluster",
            good.replace("certs/ca.pem", "certs/other-ca.pem")
                .replace("certs/node-1.pem", "certs/other-1.pem")
                .replace("certs/node-1-key.pem", "certs/other-1-key.pem"),
            "of cluster",
        ),
    ];
    // The directory check comes before any port is bound, so the running
    // nodes' ports are no obstacle and their directories stay theirs.
    for (name, text, expected) in cases {
        let path = c.dir().join(format!("bad-{name}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = std::process::Command::new(exe)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: served");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            stderr.contains(path.to_str().unwrap()) || name.starts_with("foreign"),
            "{name}: {stderr}"
        );
    }
    still_serving(&c, "configs").await;
}
