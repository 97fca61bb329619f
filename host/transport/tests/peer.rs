//! The Raft peer mesh over loopback: ordering, non-blocking drops, and a
//! malformed peer that is cut off while the node keeps working.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use kythira_raft::{Bytes, Entry, EntryKind, Message, MessageBody};
use kythira_transport::frame::{self, DEFAULT_MAX_FRAME};
use kythira_transport::{Alpn, CloseCode, Endpoint, PeerConfig, PeerNet, SendError, wire};
use tokio::sync::mpsc;

fn heartbeat(from: u64, to: u64, seq: u64) -> Message {
    Message {
        from,
        to,
        term: seq,
        body: MessageBody::Heartbeat {
            commit: seq,
            read_round: 0,
        },
    }
}

fn append(from: u64, to: u64, seq: u64) -> Message {
    Message {
        from,
        to,
        term: seq,
        body: MessageBody::Append {
            prev_index: seq,
            prev_term: 1,
            entries: vec![
                Entry {
                    term: 1,
                    index: seq + 1,
                    kind: EntryKind::Normal,
                    data: Bytes::from(vec![seq as u8; 100]),
                },
                Entry {
                    term: 1,
                    index: seq + 2,
                    kind: EntryKind::Noop,
                    data: Bytes::new(),
                },
            ],
            commit: seq,
        },
    }
}

struct Node {
    _endpoint: Endpoint,
    net: PeerNet,
    inbound: mpsc::Receiver<Message>,
}

/// Starts `n` nodes on loopback, each knowing all others. The peer networks
/// start from the highest id down, so every node is ready to accept before
/// anyone dials it: no dial is refused and retried, and each pair makes
/// exactly one connection. (Started in another order, an early dial is
/// refused — "does not serve peers" — and retried after the backoff.)
fn cluster(pki: &Pki, n: u64, queue_len: usize) -> Vec<Node> {
    let endpoints: Vec<Endpoint> = (1..=n)
        .map(|id| Endpoint::bind(any_port(), &pki.node(id)).unwrap())
        .collect();
    let addrs: BTreeMap<u64, SocketAddr> = (1..=n)
        .map(|id| (id, endpoints[id as usize - 1].local_addr().unwrap()))
        .collect();
    let mut nodes: Vec<Node> = endpoints
        .into_iter()
        .enumerate()
        .rev()
        .map(|(i, endpoint)| {
            let id = i as u64 + 1;
            let mut peers = addrs.clone();
            peers.remove(&id);
            let mut config = PeerConfig::new(id, peers);
            config.queue_len = queue_len;
            let (net, inbound) = endpoint.start_peers(config).unwrap();
            Node {
                _endpoint: endpoint,
                net,
                inbound,
            }
        })
        .collect();
    nodes.reverse();
    nodes
}

async fn connect_all(nodes: &[Node]) {
    for node in nodes {
        for peer in 1..=nodes.len() as u64 {
            if peer != node.net.id() {
                assert!(bounded("mesh", node.net.wait_connected(peer)).await);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_deliver_in_order_between_every_pair() {
    const N: u64 = 600;
    let pki = Pki::new();
    let mut nodes = cluster(&pki, 3, 2 * N as usize);
    connect_all(&nodes).await;

    for node in &nodes {
        let us = node.net.id();
        for seq in 0..N {
            for peer in (1..=3).filter(|&p| p != us) {
                // Mix small and large messages: ordering must hold across
                // batches of both.
                let m = if seq % 3 == 0 {
                    append(us, peer, seq)
                } else {
                    heartbeat(us, peer, seq)
                };
                node.net.send(m).unwrap();
            }
        }
    }

    for node in &mut nodes {
        let us = node.net.id();
        let mut next: BTreeMap<u64, u64> = BTreeMap::new();
        for _ in 0..2 * N {
            let m = bounded("messages", node.inbound.recv()).await.unwrap();
            assert_eq!(m.to, us);
            let expected = next.entry(m.from).or_insert(0);
            assert_eq!(m.term, *expected, "from {} to {us} out of order", m.from);
            let want = if m.term % 3 == 0 {
                append(m.from, us, m.term)
            } else {
                heartbeat(m.from, us, m.term)
            };
            assert_eq!(m, want);
            *expected += 1;
        }
        assert_eq!(next.values().copied().collect::<Vec<_>>(), vec![N, N]);
    }
    for node in &nodes {
        assert_eq!(node.net.stats().refused, 0);
        for (peer, stats) in node.net.stats().peers {
            assert_eq!(stats.sent, N, "{} -> {peer}: {stats:?}", node.net.id());
            assert_eq!(stats.received, N);
            assert_eq!(stats.dropped_full + stats.dropped_disconnected, 0);
            assert_eq!(stats.connects, 1, "exactly one connection per pair");
            assert!(stats.connected);
        }
    }
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_blocking() {
    let pki = Pki::new();
    // Node 2's address is a socket that never answers, so node 1 stays
    // disconnected, and on this single-threaded runtime its driver cannot
    // run between the sends below: the queue fills and then drops.
    let silent = std::net::UdpSocket::bind(any_port()).unwrap();
    let endpoint = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let mut config = PeerConfig::new(1, BTreeMap::from([(2, silent.local_addr().unwrap())]));
    config.queue_len = 16;
    let (net, _inbound) = endpoint.start_peers(config).unwrap();

    let mut full = 0;
    for seq in 0..10_000 {
        match net.send(heartbeat(1, 2, seq)) {
            Ok(()) => {}
            Err(SendError::QueueFull { to: 2 }) => full += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(full, 10_000 - 16);
    let stats = net.stats().peers[&2];
    assert_eq!(stats.dropped_full, 10_000 - 16);
    assert!(!stats.connected);

    assert_eq!(
        net.send(heartbeat(1, 7, 0)),
        Err(SendError::UnknownPeer { to: 7 })
    );
    assert!(matches!(
        net.send(heartbeat(5, 2, 0)),
        Err(SendError::NotFromUs { from: 5, us: 1 })
    ));

    // Once the driver runs, what was queued for a disconnected peer is
    // dropped as such, and the queue accepts messages again.
    bounded("drain", async {
        while net.stats().peers[&2].dropped_disconnected < 16 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    net.send(heartbeat(1, 2, 0)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_peer_is_cut_off_and_the_node_keeps_running() {
    let pki = Pki::new();
    let node2 = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let addr2 = node2.local_addr().unwrap();
    let node1 = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let addr1 = node1.local_addr().unwrap();
    let (net2, mut inbound2) = node2
        .start_peers(PeerConfig::new(2, BTreeMap::from([(1, addr1)])))
        .unwrap();

    // A raw connection with node 1's certificate: a misaddressed message,
    // then a frame of an unknown version.
    let raw = raw_endpoint();
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;
    let mut stream = conn.open_uni().await.unwrap();
    let mut buf = Vec::new();
    let start = frame::begin_frame(&mut buf);
    wire::encode_into(&heartbeat(5, 2, 0), &mut buf).unwrap();
    frame::end_frame(&mut buf, start, DEFAULT_MAX_FRAME).unwrap();
    buf.extend_from_slice(&[0, 0, 0, 1, 9, 0]);
    stream.write_all(&buf).await.unwrap();
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Protocol as u64);
    assert!(reason.contains("unsupported frame version 9"), "{reason}");

    // A valid frame whose payload is not a message.
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;
    let mut stream = conn.open_uni().await.unwrap();
    let mut buf = Vec::new();
    let start = frame::begin_frame(&mut buf);
    buf.extend_from_slice(&[0xff; 12]);
    frame::end_frame(&mut buf, start, DEFAULT_MAX_FRAME).unwrap();
    stream.write_all(&buf).await.unwrap();
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Protocol as u64);
    assert!(reason.contains("malformed message"), "{reason}");

    // An oversized frame header.
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;
    let mut stream = conn.open_uni().await.unwrap();
    stream
        .write_all(&[0x7f, 0xff, 0xff, 0xff, frame::VERSION])
        .await
        .unwrap();
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Protocol as u64);
    assert!(reason.contains("exceeds the maximum"), "{reason}");

    let stats = net2.stats().peers[&1];
    assert_eq!(stats.decode_errors, 3);
    assert_eq!(stats.misaddressed, 1);
    assert_eq!(stats.received, 0);

    // The real node 1 connects, and messages flow both ways.
    let (net1, mut inbound1) = node1
        .start_peers(PeerConfig::new(1, BTreeMap::from([(2, addr2)])))
        .unwrap();
    assert!(bounded("connect", net1.wait_connected(2)).await);
    assert!(bounded("connect", net2.wait_connected(1)).await);
    net1.send(heartbeat(1, 2, 42)).unwrap();
    assert_eq!(
        bounded("message", inbound2.recv()).await.unwrap(),
        heartbeat(1, 2, 42)
    );
    net2.send(heartbeat(2, 1, 43)).unwrap();
    assert_eq!(
        bounded("message", inbound1.recv()).await.unwrap(),
        heartbeat(2, 1, 43)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_lower_node_replaces_its_old_connection() {
    let pki = Pki::new();
    let node2 = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let addr2 = node2.local_addr().unwrap();
    let (net2, mut inbound2) = node2
        .start_peers(PeerConfig::new(2, BTreeMap::from([(1, any_port())])))
        .unwrap();

    for generation in 0..3u64 {
        // A fresh node 1 (new socket, new PeerNet) each time, as after a
        // restart; the old one is simply dropped.
        let node1 = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
        let (net1, _inbound1) = node1
            .start_peers(PeerConfig::new(1, BTreeMap::from([(2, addr2)])))
            .unwrap();
        assert!(bounded("connect", net1.wait_connected(2)).await);
        net1.send(heartbeat(1, 2, generation)).unwrap();
        assert_eq!(
            bounded("message", inbound2.recv()).await.unwrap(),
            heartbeat(1, 2, generation)
        );
    }
    assert!(net2.stats().peers[&1].connects >= 3);
}
