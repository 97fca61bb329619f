//! Client RPC over one multiplexed stream: concurrency, out-of-order
//! answers, timeouts, connection loss and malformed frames.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kythira_transport::frame::{self, DEFAULT_MAX_FRAME};
use kythira_transport::rpc::LossCause;
use kythira_transport::{
    Alpn, CloseCode, Endpoint, Identity, Role, RpcClient, RpcClientConfig, RpcError, RpcServer,
    RpcServerConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Req {
    Double(u64),
    /// Answered only after `Release(key)` arrives.
    Hold(u32),
    Release(u32),
    Never,
    Big(usize),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Resp {
    Doubled(u64),
    Held(u32),
    Released(u32),
    Big(Vec<u8>),
}

/// One-shot gates by key, created by whichever of `Hold` and `Release`
/// comes first, so the two may run in either order.
type Gate = (Option<oneshot::Sender<()>>, Option<oneshot::Receiver<()>>);

#[derive(Default)]
struct Gates(Mutex<HashMap<u32, Gate>>);

impl Gates {
    fn with<T>(&self, key: u32, f: impl FnOnce(&mut Gate) -> T) -> T {
        let mut gates = self.0.lock().unwrap();
        let entry = gates.entry(key).or_insert_with(|| {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        });
        f(entry)
    }
}

fn server(pki: &Pki, config: RpcServerConfig) -> (Endpoint, SocketAddr) {
    let endpoint = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let gates = Arc::new(Gates::default());
    endpoint
        .serve_clients(RpcServer::with_config(
            move |_: Identity, req: Req| {
                let gates = gates.clone();
                async move {
                    match req {
                        Req::Double(x) => Resp::Doubled(2 * x),
                        Req::Hold(key) => {
                            if let Some(rx) = gates.with(key, |g| g.1.take()) {
                                let _ = rx.await;
                            }
                            Resp::Held(key)
                        }
                        Req::Release(key) => {
                            if let Some(tx) = gates.with(key, |g| g.0.take()) {
                                let _ = tx.send(());
                            }
                            Resp::Released(key)
                        }
                        Req::Never => std::future::pending().await,
                        Req::Big(n) => Resp::Big(vec![7; n]),
                    }
                }
            },
            config,
        ))
        .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

const CALL: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_calls_share_one_connection() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let client = RpcClient::connect(addr, &pki.client("app", Role::Client))
        .await
        .unwrap();
    let mut calls = tokio::task::JoinSet::new();
    for x in 0..1000u64 {
        let client = client.clone();
        calls.spawn(async move {
            let resp: Resp = client.call(&Req::Double(x), CALL).await.unwrap();
            (x, resp)
        });
    }
    let mut seen = 0;
    while let Some(joined) = bounded("calls", calls.join_next()).await {
        let (x, resp) = joined.unwrap();
        assert_eq!(resp, Resp::Doubled(2 * x));
        seen += 1;
    }
    assert_eq!(seen, 1000);
}

#[tokio::test]
async fn a_request_waits_for_a_later_one_on_the_same_stream() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let client = RpcClient::connect(addr, &pki.client("app", Role::Client))
        .await
        .unwrap();
    // `Hold` is answered only after `Release`, sent later on the same
    // stream, has been handled: a server answering in request order would
    // deadlock here, so this shows requests run concurrently and answers
    // are routed by id.
    // `join!` polls in order, so `Hold` is queued on the stream first.
    let (held, released) = bounded("calls", async {
        tokio::join!(
            client.call::<_, Resp>(&Req::Hold(1), CALL),
            client.call::<_, Resp>(&Req::Release(1), CALL),
        )
    })
    .await;
    assert_eq!(released.unwrap(), Resp::Released(1));
    assert_eq!(held.unwrap(), Resp::Held(1));
}

#[tokio::test]
async fn a_call_times_out_and_the_connection_stays_usable() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let client = RpcClient::connect(addr, &pki.client("app", Role::Client))
        .await
        .unwrap();
    let err = client
        .call::<_, Resp>(&Req::Never, Duration::from_millis(50))
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Timeout { .. }), "{err}");
    let resp: Resp = client.call(&Req::Double(4), CALL).await.unwrap();
    assert_eq!(resp, Resp::Doubled(8));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_connection_fails_every_call_in_flight() {
    let pki = Pki::new();
    let (endpoint, addr) = server(&pki, RpcServerConfig::default());
    let client = RpcClient::connect(addr, &pki.client("app", Role::Client))
        .await
        .unwrap();
    // Prove the connection works, then park calls in the server.
    let _: Resp = client.call(&Req::Double(1), CALL).await.unwrap();
    let mut parked = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let client = client.clone();
        parked.spawn(async move { client.call::<_, Resp>(&Req::Never, CALL).await });
    }
    // Make sure the parked requests have reached the server: a later call
    // on the same ordered stream has been answered.
    let _: Resp = client.call(&Req::Double(2), CALL).await.unwrap();
    endpoint.close();
    while let Some(joined) = bounded("failures", parked.join_next()).await {
        let err = joined.unwrap().unwrap_err();
        assert!(matches!(err, RpcError::ConnectionLost { .. }), "{err}");
    }
    let err = client
        .call::<_, Resp>(&Req::Double(3), CALL)
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::ConnectionLost { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_their_connection() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let alice = pki.client("alice", Role::Client);
    let good = RpcClient::connect(addr, &alice).await.unwrap();

    let undecodable = {
        let mut buf = Vec::new();
        let start = frame::begin_frame(&mut buf);
        buf.extend_from_slice(&[1, 0xff, 0xff]);
        frame::end_frame(&mut buf, start, DEFAULT_MAX_FRAME).unwrap();
        buf
    };
    let cases: [(&str, Vec<u8>); 4] = [
        (
            "unsupported frame version",
            vec![0, 0, 0, 1, frame::VERSION + 1, 0],
        ),
        ("exceeds the maximum", vec![0x7f, 0, 0, 0, frame::VERSION]),
        ("malformed request", undecodable),
        (
            "stream ended inside a frame",
            vec![0, 0, 0, 9, frame::VERSION, 1],
        ),
    ];
    let raw = raw_endpoint();
    for (expected, bytes) in cases {
        let conn = raw_connect(&raw, &alice, Alpn::Client, addr).await;
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        if expected.starts_with("stream ended") {
            send.finish().unwrap();
        }
        let (code, reason) = closed_by_peer(&conn).await;
        assert_eq!(code, CloseCode::Protocol as u64, "{expected}");
        assert!(reason.contains(expected), "{expected}: {reason}");
    }

    // The connection that behaved is untouched, and new ones are served.
    let resp: Resp = good.call(&Req::Double(5), CALL).await.unwrap();
    assert_eq!(resp, Resp::Doubled(10));
    let fresh = RpcClient::connect(addr, &alice).await.unwrap();
    let resp: Resp = fresh.call(&Req::Double(6), CALL).await.unwrap();
    assert_eq!(resp, Resp::Doubled(12));
}

#[tokio::test]
async fn the_frame_limit_holds_on_both_sides() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(
        &pki,
        RpcServerConfig {
            max_frame: 1024,
            max_concurrent: 16,
        },
    );
    let tls = pki.client("app", Role::Client);
    let client = RpcClient::connect_with(
        addr,
        &tls,
        RpcClientConfig {
            max_frame: 1024,
            max_queued: 16,
        },
    )
    .await
    .unwrap();
    // Too large to send: refused locally, the connection lives on.
    let err = client
        .call::<_, Resp>(&vec![0u8; 2000], CALL)
        .await
        .unwrap_err();
    assert!(
        matches!(err, RpcError::FrameTooLarge { max: 1024, .. }),
        "{err}"
    );
    let resp: Resp = client.call(&Req::Big(10), CALL).await.unwrap();
    assert_eq!(resp, Resp::Big(vec![7; 10]));
    // A response over the server's limit closes the connection with a reason.
    let err = client
        .call::<_, Resp>(&Req::Big(4000), CALL)
        .await
        .unwrap_err();
    match err {
        RpcError::ConnectionLost {
            cause: LossCause::Connection(quinn::ConnectionError::ApplicationClosed(close)),
        } => assert!(String::from_utf8_lossy(&close.reason).contains("exceeds")),
        other => panic!("expected the server's close, got {other}"),
    }
}

#[tokio::test]
async fn a_response_of_the_wrong_type_is_a_decode_error() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let client = RpcClient::connect(addr, &pki.client("app", Role::Client))
        .await
        .unwrap();
    let err = client
        .call::<_, String>(&Req::Double(1), CALL)
        .await
        .unwrap_err();
    assert!(matches!(err, RpcError::Decode(_)), "{err}");
    let resp: Resp = client.call(&Req::Double(2), CALL).await.unwrap();
    assert_eq!(resp, Resp::Doubled(4));
}

#[tokio::test]
async fn nodes_reach_each_other_as_clients_from_their_own_socket() {
    let pki = Pki::new();
    let (_endpoint, addr) = server(&pki, RpcServerConfig::default());
    let other = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let client = other
        .rpc_client(addr, RpcClientConfig::default())
        .await
        .unwrap();
    assert_eq!(client.server(), &Identity::Node(1));
    let resp: Resp = client.call(&Req::Double(21), CALL).await.unwrap();
    assert_eq!(resp, Resp::Doubled(42));
}
