//! Mutual TLS and identity checks on a real loopback endpoint: who gets in
//! and who is refused, and that the node keeps serving afterwards.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kythira_transport::{
    Alpn, CloseCode, Endpoint, Identity, PeerConfig, Role, RpcClient, RpcError, RpcServer,
};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Who;

/// A node whose client port answers with the caller's identity.
fn whoami_node(pki: &Pki, id: u64) -> Endpoint {
    let endpoint = Endpoint::bind(any_port(), &pki.node(id)).unwrap();
    endpoint
        .serve_clients(RpcServer::new(|identity: Identity, _: Who| async move {
            identity
        }))
        .unwrap();
    endpoint
}

const CALL: Duration = Duration::from_secs(10);

#[tokio::test]
async fn mtls_roundtrip_carries_the_client_identity() {
    let pki = Pki::new();
    let node = whoami_node(&pki, 1);
    let addr = node.local_addr().unwrap();
    for tls in [
        pki.client("alice", Role::Admin),
        pki.client("bob", Role::Client),
    ] {
        let client = bounded("connect", RpcClient::connect(addr, &tls))
            .await
            .unwrap();
        assert_eq!(client.server(), &Identity::Node(1));
        let seen: Identity = client.call(&Who, CALL).await.unwrap();
        assert_eq!(&seen, tls.identity());
    }
}

async fn assert_refused(addr: std::net::SocketAddr, tls: &kythira_transport::Tls) -> String {
    // connect() may succeed: the server checks our certificate after our
    // side of the handshake is done. The refusal then arrives on first use.
    let err = match bounded("connect", RpcClient::connect(addr, tls)).await {
        Err(err) => err,
        Ok(client) => bounded("call", client.call::<_, Identity>(&Who, CALL))
            .await
            .unwrap_err(),
    };
    match err {
        RpcError::Refused { reason } => reason,
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
async fn a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let other = Pki::new();
    let node = whoami_node(&pki, 1);
    let addr = node.local_addr().unwrap();
    let impostor = pki.foreign(&other, Identity::client("mallory", Role::Admin).unwrap());
    let reason = assert_refused(addr, &impostor).await;
    assert!(reason.contains("certificate"), "{reason}");
    // A node certificate from another CA fares no better.
    let impostor_node = pki.foreign(&other, Identity::Node(1));
    assert_refused(addr, &impostor_node).await;
    // The node still serves its own clients.
    let client = RpcClient::connect(addr, &pki.client("alice", Role::Admin))
        .await
        .unwrap();
    let _: Identity = client.call(&Who, CALL).await.unwrap();
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let node = whoami_node(&pki, 1);
    let addr = node.local_addr().unwrap();
    let endpoint = raw_endpoint();
    let conn = bounded(
        "handshake",
        endpoint
            .connect_with(pki.anonymous(Alpn::Client), addr, "kythira")
            .unwrap(),
    )
    .await
    .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(b"anything").await;
    match bounded("close", conn.closed()).await {
        quinn::ConnectionError::ConnectionClosed(close) => {
            // A TLS alert (RFC 9001: 0x100 + alert), sent by the server.
            let code = u64::from(close.error_code);
            assert!((0x100..0x200).contains(&code), "{close}");
        }
        other => panic!("expected a TLS alert, got {other}"),
    }
    let client = RpcClient::connect(addr, &pki.client("alice", Role::Client))
        .await
        .unwrap();
    let _: Identity = client.call(&Who, CALL).await.unwrap();
}

/// Node 2 with peers 1 and 3, serving peers only. The peers' address is a
/// socket that never answers: only node 2's accepting side is exercised.
fn peer_node(pki: &Pki) -> (Endpoint, kythira_transport::PeerNet, std::net::UdpSocket) {
    let endpoint = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let silent = std::net::UdpSocket::bind(any_port()).unwrap();
    let nowhere = silent.local_addr().unwrap();
    let peers = BTreeMap::from([(1, nowhere), (3, nowhere)]);
    let (net, _inbound) = endpoint.start_peers(PeerConfig::new(2, peers)).unwrap();
    (endpoint, net, silent)
}

#[tokio::test]
async fn a_node_certificate_for_another_id_is_refused_on_the_peer_port() {
    let pki = Pki::new();
    let (endpoint, net, _silent) = peer_node(&pki);
    let addr = endpoint.local_addr().unwrap();
    let raw = raw_endpoint();

    // Node 9 is not a member.
    let conn = raw_connect(&raw, &pki.node(9), Alpn::Peer, addr).await;
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Refused as u64);
    assert!(reason.contains("node 9 is not a member"), "{reason}");

    // Node 3 is a member but has the higher id: node 2 dials it, never the
    // other way round.
    let conn = raw_connect(&raw, &pki.node(3), Alpn::Peer, addr).await;
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Refused as u64);
    assert!(reason.contains("node 3 has a higher id"), "{reason}");

    // Our own id.
    let conn = raw_connect(&raw, &pki.node(2), Alpn::Peer, addr).await;
    let (code, _) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Refused as u64);

    assert_eq!(net.stats().refused, 3);
    assert!(net.stats().peers.values().all(|p| p.connects == 0));
}

#[tokio::test]
async fn a_client_certificate_is_refused_on_the_peer_port() {
    let pki = Pki::new();
    let (endpoint, net, _silent) = peer_node(&pki);
    let addr = endpoint.local_addr().unwrap();
    let raw = raw_endpoint();
    let conn = raw_connect(&raw, &pki.client("alice", Role::Admin), Alpn::Peer, addr).await;
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Refused as u64);
    assert!(reason.contains("not a node"), "{reason}");
    assert_eq!(net.stats().refused, 1);
}

#[tokio::test]
async fn services_that_are_not_started_are_refused() {
    let pki = Pki::new();
    let endpoint = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let addr = endpoint.local_addr().unwrap();
    let raw = raw_endpoint();
    for (tls, alpn) in [
        (pki.node(2), Alpn::Peer),
        (pki.client("c", Role::Client), Alpn::Client),
    ] {
        let conn = raw_connect(&raw, &tls, alpn, addr).await;
        let (code, reason) = closed_by_peer(&conn).await;
        assert_eq!(code, CloseCode::Refused as u64);
        assert!(reason.contains("does not serve"), "{reason}");
    }
}

#[tokio::test]
async fn a_dialer_refuses_a_server_with_the_wrong_node_id() {
    let pki = Pki::new();
    // An impostor listening where node 2 should be, holding node 3's
    // certificate (valid, same CA).
    let impostor =
        quinn::Endpoint::server(pki.node(3).server_config().unwrap(), any_port()).unwrap();
    let impostor_addr = impostor.local_addr().unwrap();
    let node1 = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let (net, _inbound) = node1
        .start_peers(PeerConfig::new(1, BTreeMap::from([(2, impostor_addr)])))
        .unwrap();
    let incoming = bounded("dial", impostor.accept()).await.unwrap();
    let conn = incoming.await.unwrap();
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Refused as u64);
    assert!(
        reason.contains("dialed node 2 but reached node 3"),
        "{reason}"
    );
    assert_eq!(net.stats().peers[&2].connects, 0);
}

#[tokio::test]
async fn clients_cannot_bind_an_endpoint_and_configs_must_match_the_certificate() {
    let pki = Pki::new();
    assert!(Endpoint::bind(any_port(), &pki.client("c", Role::Admin)).is_err());
    let endpoint = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let wrong = endpoint.start_peers(PeerConfig::new(2, BTreeMap::new()));
    assert!(wrong.is_err());
    endpoint
        .start_peers(PeerConfig::new(1, BTreeMap::new()))
        .unwrap();
    assert!(
        endpoint
            .start_peers(PeerConfig::new(1, BTreeMap::new()))
            .is_err()
    );
}
