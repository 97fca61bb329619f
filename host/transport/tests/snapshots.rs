//! Snapshot transfer between peers over loopback: a whole transfer, resumes
//! from a partial left by an earlier attempt (from the same or another
//! sender), refusals on both sides, and snapshots kept off the message stream.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::*;
use kythira_raft::{Membership, Message, MessageBody, SnapshotMeta};
use kythira_storage::{SnapshotInfo, SnapshotStore};
use kythira_transport::frame::{self, DEFAULT_MAX_FRAME};
use kythira_transport::{
    Alpn, CloseCode, Endpoint, PeerConfig, PeerNet, SendError, SnapshotError, SnapshotSent, wire,
};
use tokio::sync::mpsc;

const MIB: usize = 1 << 20;
const INDEX: u64 = 100;
const TERM: u64 = 3;

struct Node {
    _endpoint: Endpoint,
    net: PeerNet,
    inbound: mpsc::Receiver<Message>,
    store: Option<SnapshotStore>,
    _dir: tempfile::TempDir,
}

impl Node {
    fn store(&self) -> &SnapshotStore {
        self.store.as_ref().expect("this node has a store")
    }
}

/// Starts `n` nodes on loopback, each knowing all others; node `id` gets a
/// snapshot store if `with_store(id)`. Started from the highest id down, so
/// that nobody dials a node before it serves peers (see `tests/peer.rs`).
fn cluster(pki: &Pki, n: u64, with_store: impl Fn(u64) -> bool) -> Vec<Node> {
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
            let dir = tempfile::Builder::new()
                .prefix("transport-snapshots-")
                .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
                .unwrap();
            let store = with_store(id).then(|| SnapshotStore::open(dir.path()).unwrap());
            let mut config = PeerConfig::new(id, peers);
            if let Some(store) = &store {
                config = config.with_snapshots(store.clone());
            }
            let (net, inbound) = endpoint.start_peers(config).unwrap();
            Node {
                _endpoint: endpoint,
                net,
                inbound,
                store,
                _dir: dir,
            }
        })
        .collect();
    nodes.reverse();
    nodes
}

fn membership() -> Membership {
    Membership::new([1, 2, 3], []).unwrap()
}

/// Deterministic bytes that look random (SplitMix64).
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes the snapshot at (INDEX, TERM) the way a node would.
fn take_snapshot(store: &SnapshotStore, data: &[u8]) -> SnapshotInfo {
    let mut writer = store
        .begin(kythira_storage::SnapshotMeta {
            index: INDEX,
            term: TERM,
            configuration: membership().encode(),
        })
        .unwrap();
    for chunk in data.chunks(256 << 10) {
        writer.write_chunk(chunk).unwrap();
    }
    writer.finish().unwrap()
}

fn snapshot_message(from: u64, to: u64, index: u64) -> Message {
    Message {
        from,
        to,
        term: TERM,
        body: MessageBody::Snapshot {
            meta: SnapshotMeta {
                index,
                term: TERM,
                membership: membership(),
            },
        },
    }
}

fn heartbeat(from: u64, to: u64) -> Message {
    Message {
        from,
        to,
        term: TERM,
        body: MessageBody::Heartbeat {
            commit: 0,
            read_round: 0,
        },
    }
}

fn latest_file(store: &SnapshotStore) -> Vec<u8> {
    std::fs::read(store.latest_path().unwrap()).unwrap()
}

async fn connect(a: &Node, b: &Node) {
    assert!(bounded("connect", a.net.wait_connected(b.net.id())).await);
    assert!(bounded("connect", b.net.wait_connected(a.net.id())).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_arrives_whole_and_is_handed_to_the_core() {
    let pki = Pki::new();
    let mut nodes = cluster(&pki, 2, |_| true);
    let data = random_bytes(3 * MIB, 1);
    let info = take_snapshot(nodes[0].store(), &data);
    connect(&nodes[0], &nodes[1]).await;

    let sent = bounded(
        "snapshot",
        nodes[0].net.send_snapshot(snapshot_message(1, 2, INDEX)),
    )
    .await
    .unwrap();
    assert_eq!(
        sent,
        SnapshotSent {
            bytes_sent: data.len() as u64,
            resumed_from: 0
        }
    );
    // Delivered before the sender heard `Done`: already queued.
    assert_eq!(
        nodes[1].inbound.try_recv().unwrap(),
        snapshot_message(1, 2, INDEX)
    );
    assert_eq!(nodes[1].store().latest(), Some(info));
    assert_eq!(latest_file(nodes[1].store()), latest_file(nodes[0].store()));

    let sender = nodes[0].net.stats().peers[&2];
    assert_eq!(sender.snapshots_sent, 1);
    assert_eq!(sender.snapshot_bytes_sent, data.len() as u64);
    assert_eq!(sender.snapshot_send_failures, 0);
    let receiver = nodes[1].net.stats().peers[&1];
    assert_eq!(receiver.snapshots_received, 1);
    assert_eq!(receiver.snapshot_bytes_received, data.len() as u64);
    assert_eq!(receiver.snapshot_receive_failures, 0);
    // The connection carried the transfer without trouble.
    assert_eq!(receiver.connects, 1);
    assert_eq!(receiver.decode_errors, 0);

    // Sent again (say the first `Done` was lost): no data moves, but the
    // core gets the message again.
    let sent = bounded(
        "snapshot again",
        nodes[0].net.send_snapshot(snapshot_message(1, 2, INDEX)),
    )
    .await
    .unwrap();
    assert_eq!(
        sent,
        SnapshotSent {
            bytes_sent: 0,
            resumed_from: data.len() as u64
        }
    );
    assert_eq!(
        nodes[1].inbound.try_recv().unwrap(),
        snapshot_message(1, 2, INDEX)
    );
    assert_eq!(nodes[1].net.stats().peers[&1].snapshots_received, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_resumes_from_the_partial_the_receiver_holds() {
    let pki = Pki::new();
    let mut nodes = cluster(&pki, 2, |_| true);
    let data = random_bytes(3 * MIB, 2);
    let info = take_snapshot(nodes[0].store(), &data);
    // What an earlier, interrupted transfer would have left.
    let mut partial = nodes[1].store().receive(&info).unwrap();
    partial.write_chunk(0, &data[..MIB]).unwrap();
    drop(partial);
    connect(&nodes[0], &nodes[1]).await;

    resumes_at_one_mib(&mut nodes, 1, 2, info).await;
    assert_eq!(
        nodes[1].net.stats().peers[&1].snapshot_bytes_received,
        2 * MIB as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_sender_with_the_same_snapshot_completes_a_broken_transfer() {
    let pki = Pki::new();
    let mut nodes = cluster(&pki, 3, |_| true);
    let data = random_bytes(3 * MIB, 3);
    let info = take_snapshot(nodes[0].store(), &data);
    assert_eq!(take_snapshot(nodes[2].store(), &data), info);
    assert_eq!(latest_file(nodes[0].store()), latest_file(nodes[2].store()));
    // Node 1's copy loses its last 1.5 MiB on disk: it can send the first
    // chunk, then its read fails and its transfer breaks off.
    let path = nodes[0].store().latest_path().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - 3 * MIB as u64 / 2).unwrap();
    drop(file);
    connect(&nodes[0], &nodes[1]).await;
    connect(&nodes[2], &nodes[1]).await;

    let err = bounded(
        "broken snapshot",
        nodes[0].net.send_snapshot(snapshot_message(1, 2, INDEX)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SnapshotError::Storage(_)), "{err}");
    assert!(nodes[1].store().latest().is_none());
    assert!(nodes[1].inbound.try_recv().is_err(), "nothing delivered");
    let receiver = nodes[1].net.stats().peers[&1];
    assert_eq!(receiver.snapshot_bytes_received, MIB as u64);
    assert_eq!(receiver.snapshot_receive_failures, 1);
    assert_eq!(nodes[0].net.stats().peers[&2].snapshot_send_failures, 1);

    resumes_at_one_mib(&mut nodes, 3, 2, info).await;
}

/// Node `from` sends its 3 MiB snapshot `info` to node `to`, which holds
/// the first MiB already: 2 MiB travel, the message reaches `to`'s core and
/// both files end up identical.
async fn resumes_at_one_mib(nodes: &mut [Node], from: u64, to: u64, info: SnapshotInfo) {
    let (s, r) = (from as usize - 1, to as usize - 1);
    let sent = bounded(
        "snapshot",
        nodes[s]
            .net
            .send_snapshot(snapshot_message(from, to, INDEX)),
    )
    .await
    .unwrap();
    assert_eq!(
        sent,
        SnapshotSent {
            bytes_sent: 2 * MIB as u64,
            resumed_from: MIB as u64
        }
    );
    assert_eq!(
        nodes[r].inbound.try_recv().unwrap(),
        snapshot_message(from, to, INDEX)
    );
    assert_eq!(nodes[r].store().latest(), Some(info));
    assert_eq!(latest_file(nodes[r].store()), latest_file(nodes[s].store()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_errors_at_the_sender() {
    let pki = Pki::new();
    let nodes = cluster(&pki, 3, |id| id != 2);
    let data = random_bytes(64 << 10, 4);
    take_snapshot(nodes[0].store(), &data);
    connect(&nodes[0], &nodes[1]).await;

    // Node 2 keeps no snapshots.
    let err = bounded(
        "refusal",
        nodes[0].net.send_snapshot(snapshot_message(1, 2, INDEX)),
    )
    .await
    .unwrap_err();
    match &err {
        SnapshotError::Refused { to: 2, reason } => {
            assert!(reason.contains("keeps no snapshot store"), "{reason}")
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(nodes[0].net.stats().peers[&2].snapshot_send_failures, 1);
    assert_eq!(nodes[1].net.stats().peers[&1].snapshot_receive_failures, 1);

    // Not the snapshot the store holds.
    let err = nodes[0]
        .net
        .send_snapshot(snapshot_message(1, 3, INDEX + 1))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            SnapshotError::NotLatest {
                index: 101,
                latest_index: INDEX,
                ..
            }
        ),
        "{err}"
    );
    // Node 3 has a store but no snapshot; node 2 has no store.
    let err = nodes[2]
        .net
        .send_snapshot(snapshot_message(3, 1, INDEX))
        .await
        .unwrap_err();
    assert!(matches!(err, SnapshotError::NoSnapshot), "{err}");
    let err = nodes[1]
        .net
        .send_snapshot(snapshot_message(2, 1, INDEX))
        .await
        .unwrap_err();
    assert!(matches!(err, SnapshotError::NoStore), "{err}");
    // Not a snapshot, not from us, not a peer.
    let err = nodes[0].net.send_snapshot(heartbeat(1, 2)).await;
    assert!(matches!(err, Err(SnapshotError::NotASnapshot)));
    let err = nodes[0]
        .net
        .send_snapshot(snapshot_message(2, 3, INDEX))
        .await;
    assert!(matches!(
        err,
        Err(SnapshotError::NotFromUs { from: 2, us: 1 })
    ));
    let err = nodes[0]
        .net
        .send_snapshot(snapshot_message(1, 9, INDEX))
        .await;
    assert!(matches!(err, Err(SnapshotError::UnknownPeer { to: 9 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_never_travels_on_the_message_stream() {
    let pki = Pki::new();
    let mut nodes = cluster(&pki, 2, |_| true);
    connect(&nodes[0], &nodes[1]).await;

    assert_eq!(
        nodes[0].net.send(snapshot_message(1, 2, INDEX)),
        Err(SendError::Snapshot { to: 2 })
    );
    assert_eq!(nodes[0].net.stats().peers[&2].encode_errors, 1);
    // The next message is the first to arrive.
    nodes[0].net.send(heartbeat(1, 2)).unwrap();
    assert_eq!(
        bounded("message", nodes[1].inbound.recv()).await.unwrap(),
        heartbeat(1, 2)
    );

    // A peer that writes one on its message stream anyway is cut off.
    let addr2 = nodes[1]._endpoint.local_addr().unwrap();
    let raw = raw_endpoint();
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;
    let mut stream = conn.open_uni().await.unwrap();
    let mut buf = Vec::new();
    let start = frame::begin_frame(&mut buf);
    wire::encode_into(&snapshot_message(1, 2, INDEX), &mut buf).unwrap();
    frame::end_frame(&mut buf, start, DEFAULT_MAX_FRAME).unwrap();
    stream.write_all(&buf).await.unwrap();
    let (code, reason) = closed_by_peer(&conn).await;
    assert_eq!(code, CloseCode::Protocol as u64);
    assert!(
        reason.contains("snapshot message on the message stream"),
        "{reason}"
    );
    assert!(nodes[1].inbound.try_recv().is_err(), "nothing delivered");
}

/// Reads the one reply frame a receiver sends; its first byte is the reply's
/// tag (0 resume, 1 refuse, 2 done, 3 failed).
async fn reply(recv: &mut quinn::RecvStream) -> Vec<u8> {
    bounded("reply", frame::read_frame(recv, DEFAULT_MAX_FRAME))
        .await
        .unwrap()
        .expect("a reply")
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_offer_fails_its_stream_not_the_connection() {
    let pki = Pki::new();
    let node2 = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let addr2 = node2.local_addr().unwrap();
    let (_dir, store) = scratch_store();
    let (net2, mut inbound2) = node2
        .start_peers(PeerConfig::new(2, BTreeMap::from([(1, any_port())])).with_snapshots(store))
        .unwrap();

    // A raw connection with node 1's certificate.
    let raw = raw_endpoint();
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;

    // The right version byte, then garbage.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, &[1, 0xff, 0xff, 0xff], DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let answer = reply(&mut recv).await;
    assert_eq!(answer[0], 3, "failed");
    assert!(String::from_utf8_lossy(&answer).contains("malformed offer"));

    // An unknown protocol version is refused before anything else is read.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, &[9, 1, 2, 3], DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let answer = reply(&mut recv).await;
    assert_eq!(answer[0], 1, "refused");
    assert!(String::from_utf8_lossy(&answer).contains("version 9"));

    // The connection still carries messages.
    let mut stream = conn.open_uni().await.unwrap();
    let mut buf = Vec::new();
    let start = frame::begin_frame(&mut buf);
    wire::encode_into(&heartbeat(1, 2), &mut buf).unwrap();
    frame::end_frame(&mut buf, start, DEFAULT_MAX_FRAME).unwrap();
    stream.write_all(&buf).await.unwrap();
    assert_eq!(
        bounded("message", inbound2.recv()).await.unwrap(),
        heartbeat(1, 2)
    );
    assert!(conn.close_reason().is_none());
    let stats = net2.stats().peers[&1];
    assert_eq!(stats.snapshot_receive_failures, 2);
    assert_eq!(stats.decode_errors, 0);
}

/// The offer as the protocol lays it out (`kythira_transport::snapshot`),
/// for a raw peer that misbehaves.
#[derive(serde::Serialize)]
struct RawOffer<'a> {
    version: u8,
    #[serde(with = "serde_bytes")]
    message: &'a [u8],
    #[serde(with = "serde_bytes")]
    configuration: &'a [u8],
    data_len: u64,
    checksum: u32,
}

fn raw_offer(message: &Message, data: &[u8]) -> Vec<u8> {
    let message = wire::encode(message).unwrap();
    let configuration = membership().encode();
    postcard::to_stdvec(&RawOffer {
        version: kythira_transport::snapshot::PROTOCOL_VERSION,
        message: &message,
        configuration: &configuration,
        data_len: data.len() as u64,
        checksum: crc32c(data),
    })
    .unwrap()
}

/// CRC-32C (Castagnoli), bitwise: small data only.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0x82f6_3b78 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

async fn offer(
    conn: &quinn::Connection,
    offer: &[u8],
) -> (quinn::SendStream, quinn::RecvStream, Vec<u8>) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    frame::write_frame(&mut send, offer, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let answer = reply(&mut recv).await;
    (send, recv, answer)
}

/// A snapshot store in a directory of its own, removed when dropped.
fn scratch_store() -> (tempfile::TempDir, SnapshotStore) {
    let dir = tempfile::Builder::new()
        .prefix("transport-snapshots-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    let store = SnapshotStore::open(dir.path()).unwrap();
    (dir, store)
}

fn says(answer: &[u8], tag: u8, text: &str) -> bool {
    answer[0] == tag && String::from_utf8_lossy(answer).contains(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_receiver_checks_offers_and_chunks() {
    let pki = Pki::new();
    let node2 = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let addr2 = node2.local_addr().unwrap();
    let (_dir, store) = scratch_store();
    let mut config =
        PeerConfig::new(2, BTreeMap::from([(1, any_port())])).with_snapshots(store.clone());
    config.max_snapshot_bytes = 4 * MIB as u64;
    let (net2, mut inbound2) = node2.start_peers(config).unwrap();
    let raw = raw_endpoint();
    let conn = raw_connect(&raw, &pki.node(1), Alpn::Peer, addr2).await;
    let data = random_bytes(2 * MIB, 5);
    let good = raw_offer(&snapshot_message(1, 2, INDEX), &data);

    // A transfer starts; while it runs, a second offer is refused.
    let (mut first, mut first_answers, answer) = offer(&conn, &good).await;
    assert_eq!(answer, [0, 0], "resume from 0");
    let (_, _, answer) = offer(&conn, &good).await;
    assert!(says(&answer, 1, "another snapshot transfer is in progress"));
    // The first ends after one chunk: the receiver keeps it.
    frame::write_frame(&mut first, &data[..MIB], MIB)
        .await
        .unwrap();
    first.finish().unwrap();
    let answer = reply(&mut first_answers).await;
    assert!(
        says(&answer, 3, "ended after 1048576 of 2097152"),
        "{answer:?}"
    );

    // Offers the receiver refuses before touching its disk.
    let misaddressed = raw_offer(&snapshot_message(5, 2, INDEX), &data);
    let (_, _, answer) = offer(&conn, &misaddressed).await;
    assert!(says(&answer, 1, "misaddressed"));
    let too_large = raw_offer(&snapshot_message(1, 2, INDEX), &random_bytes(5 * MIB, 6));
    let (_, _, answer) = offer(&conn, &too_large).await;
    assert!(says(&answer, 1, "exceeds the maximum"));
    let not_a_snapshot = {
        let message = wire::encode(&heartbeat(1, 2)).unwrap();
        postcard::to_stdvec(&RawOffer {
            version: 1,
            message: &message,
            configuration: b"",
            data_len: 0,
            checksum: 0,
        })
        .unwrap()
    };
    let (_, _, answer) = offer(&conn, &not_a_snapshot).await;
    assert!(says(&answer, 3, "not a snapshot"));
    // A header configuration other than the message's membership would be
    // read back at restart: refused.
    let wrong_configuration = {
        let message = wire::encode(&snapshot_message(1, 2, INDEX)).unwrap();
        postcard::to_stdvec(&RawOffer {
            version: kythira_transport::snapshot::PROTOCOL_VERSION,
            message: &message,
            configuration: b"\x09not a membership",
            data_len: data.len() as u64,
            checksum: crc32c(&data),
        })
        .unwrap()
    };
    let (_, _, answer) = offer(&conn, &wrong_configuration).await;
    assert!(says(&answer, 3, "does not match"), "{answer:?}");

    // The partial survived all that; a chunk past the end fails the
    // transfer and writes nothing.
    let (mut send, mut recv, answer) = offer(&conn, &good).await;
    assert_eq!(answer[0], 0);
    assert_eq!(
        postcard::from_bytes::<u64>(&answer[1..]).unwrap(),
        MIB as u64,
        "resume offset"
    );
    let half = MIB / 2;
    frame::write_frame(&mut send, &data[MIB..MIB + half], MIB)
        .await
        .unwrap();
    let mut long = data[MIB + half..].to_vec();
    long.push(0);
    frame::write_frame(&mut send, &long, MIB).await.unwrap();
    let answer = reply(&mut recv).await;
    assert!(
        says(&answer, 3, "1572864 of 2097152 bytes are held"),
        "{answer:?}"
    );

    // A chunk frame over the chunk size fails the transfer too.
    let (mut send, mut recv, answer) = offer(&conn, &good).await;
    assert_eq!(answer[0], 0);
    send.write_all(&[0, 0x20, 0, 0, frame::VERSION])
        .await
        .unwrap();
    let answer = reply(&mut recv).await;
    assert!(says(&answer, 3, "malformed chunk"), "{answer:?}");

    // Nothing was published or delivered, the connection is up, and an
    // honest attempt still goes through.
    assert!(store.latest().is_none());
    assert!(inbound2.try_recv().is_err());
    assert!(conn.close_reason().is_none());
    let (mut send, mut recv, answer) = offer(&conn, &good).await;
    assert_eq!(answer[0], 0);
    let from = postcard::from_bytes::<u64>(&answer[1..]).unwrap() as usize;
    for chunk in data[from..].chunks(MIB) {
        frame::write_frame(&mut send, chunk, MIB).await.unwrap();
    }
    send.finish().unwrap();
    assert_eq!(reply(&mut recv).await, [2], "done");
    assert_eq!(inbound2.try_recv().unwrap(), snapshot_message(1, 2, INDEX));
    assert_eq!(store.latest().unwrap().checksum, crc32c(&data));

    let stats = net2.stats().peers[&1];
    assert_eq!(stats.misaddressed, 1);
    assert_eq!(stats.snapshots_received, 1);
    assert_eq!(stats.snapshot_receive_failures, 8);
    assert_eq!(stats.decode_errors, 0);
}
