//! The HTTP/JSON API against a real 3-node cluster of `kythira serve`
//! processes, over HTTPS with client certificates, as curl would use it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use kythira::local::{LocalCluster, Options};
use kythira_client::{Client, ClientConfig};
use kythira_transport::pki::{Ca, Identity};
use kythira_transport::tls::Tls;
use serde_json::{Value, json};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig as RustlsClientConfig, RootCertStore};

/// A client certificate to present, or none.
#[derive(Clone)]
struct Who {
    ca: PathBuf,
    cert: Option<(PathBuf, PathBuf)>,
}

impl Who {
    fn of(cluster: &LocalCluster, name: &str) -> Self {
        let files = cluster.client_files(name);
        Who {
            ca: files.ca,
            cert: Some((files.cert, files.key)),
        }
    }

    fn anonymous(cluster: &LocalCluster) -> Self {
        Who {
            ca: cluster.client_files("admin").ca,
            cert: None,
        }
    }

    fn files(ca: &Path, cert: &Path, key: &Path) -> Self {
        Who {
            ca: ca.to_path_buf(),
            cert: Some((cert.to_path_buf(), key.to_path_buf())),
        }
    }

    fn connector(&self) -> anyhow::Result<TlsConnector> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&self.ca)? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let builder = RustlsClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match &self.cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?;
                builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsConnector::from(Arc::new(config)))
    }
}

/// One HTTPS request on a fresh connection, verifying the node by its IP
/// address as curl does; answers the status and the JSON body.
async fn https(
    who: &Who,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: impl Into<Bytes>,
) -> anyhow::Result<(u16, Value)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = who
        .connector()?
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .context("TLS handshake")?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(Full::new(body.into()))?;
    let resp = sender.send_request(req).await.context("request")?;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&bytes)))?;
    Ok((status, value))
}

fn plugin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../target/plugins/{name}.wasm"))
}

/// The node that says it leads, asked through the client library. A
/// deploy has just committed, so one does; the loop only covers the moment
/// in which a follower has not yet heard of it.
async fn leader(cluster: &LocalCluster, client: &Client) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for id in cluster.ids() {
            if let Ok(s) = client.status_of(cluster.addr(id)).await
                && s.role == "leader"
            {
                return id;
            }
        }
        assert!(Instant::now() < deadline, "no node leads");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_over_mutual_tls() {
    let kv = plugin("kv");
    assert!(kv.exists(), "{} missing: run `just plugins`", kv.display());
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::create(
        Path::new(env!("CARGO_BIN_EXE_kythira")),
        dir.path(),
        &Options {
            http: true,
            ..Options::default()
        },
    )
    .unwrap();
    cluster.start_all().unwrap();

    // Deploy through the CLI, which retries until a leader answers.
    let out = cluster
        .cli("admin")
        .args(["deploy", "kv"])
        .arg(&kv)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "deploy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client = Client::new(ClientConfig::new(
        cluster.endpoints(),
        Tls::load(&cluster.client_files("admin")).unwrap(),
    ))
    .unwrap();
    let leader = leader(&cluster, &client).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let http = |id: u64| cluster.http_addr(id).unwrap();
    let admin = Who::of(&cluster, "admin");
    let app = Who::of(&cluster, "app");

    // Health on every node, with either role.
    for id in cluster.ids() {
        let (status, body) = https(&app, http(id), "GET", "/health", "").await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "ok");
        assert_eq!(body["id"], id);
    }

    // Status names the deployed machine.
    let (status, body) = https(&admin, http(leader), "GET", "/v1/status", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["role"], "leader");
    assert_eq!(body["id"], leader);
    assert_eq!(body["machines"][0]["name"], "kv", "{body}");

    // Apply on the leader, then read it back linearizably.
    let put = r#"{"put":{"key":"a","value":"1"}}"#;
    let (status, body) = https(&app, http(leader), "POST", "/v1/machines/kv/apply", put)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body["index"].as_u64().unwrap() > 0, "{body}");
    assert_eq!(body["output"], json!({"value": null}));
    let get = r#"{"get":{"key":"a"}}"#;
    let (status, body) = https(&app, http(leader), "POST", "/v1/machines/kv/query", get)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!({"value": "1"}));

    // A follower does not lead, and says who does. It translates JSON with
    // its own copy of the plugin, so it must have applied the deploy first;
    // no event tells the test when, so it waits for that condition.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .status_of(cluster.addr(follower))
        .await
        .is_ok_and(|s| s.machines.iter().any(|m| m.name == "kv"))
    {
        assert!(
            Instant::now() < deadline,
            "node {follower} never applied the deploy"
        );
        tokio::task::yield_now().await;
    }
    let (status, body) = https(&app, http(follower), "POST", "/v1/machines/kv/apply", put)
        .await
        .unwrap();
    assert_eq!(status, 421, "{body}");
    assert_eq!(body["error"]["kind"], "not_leader");
    assert_eq!(body["error"]["leader"], leader, "{body}");
    assert_eq!(
        body["error"]["leader_addr"],
        cluster.addr(leader).to_string(),
        "{body}"
    );

    // Exactly once within a session: a retried serial answers the first result.
    let (status, body) = https(&app, http(leader), "POST", "/v1/sessions", "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let session = body["id"].as_u64().unwrap();
    let path = format!("/v1/machines/kv/apply?session={session}&serial=1");
    let put_b = r#"{"put":{"key":"b","value":"x"}}"#;
    let (s1, first) = https(&app, http(leader), "POST", &path, put_b)
        .await
        .unwrap();
    let (s2, retry) = https(&app, http(leader), "POST", &path, put_b)
        .await
        .unwrap();
    assert_eq!((s1, s2), (200, 200), "{first} {retry}");
    assert_eq!(first, retry, "a retry must not apply again");
    let (status, body) = https(
        &app,
        http(leader),
        "POST",
        "/v1/machines/kv/apply?serial=2",
        put_b,
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "a serial without a session: {body}");

    // Deploy over HTTP: admin only.
    let wasm = std::fs::read(&kv).unwrap();
    let (status, body) = https(&app, http(leader), "PUT", "/v1/machines/kv2", wasm.clone())
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["kind"], "unauthorized");
    let (status, body) = https(
        &admin,
        http(leader),
        "PUT",
        "/v1/machines/kv2?apply_fuel=100000000",
        wasm,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sha256"].as_str().unwrap().len(), 64, "{body}");
    let (status, body) = https(&admin, http(leader), "PUT", "/v1/machines/junk", "not wasm")
        .await
        .unwrap();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["kind"], "deploy_refused");

    // Bad input: each a clear JSON error, and the node keeps serving.
    let (status, body) = https(
        &app,
        http(leader),
        "POST",
        "/v1/machines/kv/apply",
        "{\"put\":",
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["kind"], "bad_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{body}"
    );
    let (status, body) = https(
        &app,
        http(leader),
        "POST",
        "/v1/machines/kv/apply",
        r#"{"frobnicate":{}}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "a command the plugin does not know: {body}");
    let (status, body) = https(&app, http(leader), "POST", "/v1/machines/nope/query", get)
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["kind"], "unknown_machine");
    let (status, body) = https(
        &app,
        http(leader),
        "POST",
        "/v1/machines/kv/query",
        vec![b' '; (1 << 20) + 1],
    )
    .await
    .unwrap();
    assert_eq!(status, 413, "{body}");
    let (status, body) = https(
        &app,
        http(leader),
        "POST",
        "/v1/machines/kv/query?consistency=eventually",
        get,
    )
    .await
    .unwrap();
    assert_eq!(status, 400, "{body}");
    let (status, body) = https(&app, http(leader), "GET", "/v2/anything", "")
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");

    // Refused certificates: none, another CA's, a node's used as a client.
    let refused = https(
        &Who::anonymous(&cluster),
        http(leader),
        "GET",
        "/health",
        "",
    )
    .await;
    assert!(
        refused.is_err(),
        "no client certificate was served: {refused:?}"
    );
    let other = tempfile::tempdir().unwrap();
    let foreign = Ca::generate().unwrap();
    let (ca, cert, key) = (
        other.path().join("ca.pem"),
        other.path().join("c.pem"),
        other.path().join("c-key.pem"),
    );
    // The client trusts the cluster's CA but presents a foreign certificate.
    std::fs::copy(cluster.client_files("admin").ca, &ca).unwrap();
    foreign
        .issue(
            &Identity::client("mallory", kythira_transport::pki::Role::Admin).unwrap(),
            &[],
        )
        .unwrap()
        .write(&cert, &key)
        .unwrap();
    let refused = https(
        &Who::files(&ca, &cert, &key),
        http(leader),
        "GET",
        "/health",
        "",
    )
    .await;
    assert!(
        refused.is_err(),
        "a foreign certificate was served: {refused:?}"
    );
    let certs = cluster.dir().join("certs");
    let node_cert = Who::files(
        &certs.join("ca.pem"),
        &certs.join(format!("node-{follower}.pem")),
        &certs.join(format!("node-{follower}-key.pem")),
    );
    let (status, body) = https(&node_cert, http(leader), "GET", "/v1/status", "")
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // Still serving, and nothing refused was applied.
    let (status, body) = https(&app, http(leader), "POST", "/v1/machines/kv/apply", put)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["output"], json!({"value": "1"}));
    for id in cluster.ids() {
        let (status, _) = https(&app, http(id), "GET", "/health", "").await.unwrap();
        assert_eq!(status, 200);
    }
}
