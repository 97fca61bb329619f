//! The peer set changes at run time: a node learns a new peer, the pair
//! connects in the usual direction, a forgotten peer is cut off and refused,
//! and a peer that moved is dialed at its new address.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use kythira_raft::{Message, MessageBody};
use kythira_transport::{Backoff, Endpoint, PeerConfig, PeerError, PeerNet, SendError};
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

/// Quick reconnects, so that a refused dial is retried within the test.
fn config(id: u64, peers: BTreeMap<u64, std::net::SocketAddr>) -> PeerConfig {
    let mut c = PeerConfig::new(id, peers);
    c.backoff = Backoff {
        base: Duration::from_millis(10),
        max: Duration::from_millis(100),
    };
    c
}

/// Polls `check` until it holds; `bounded` turns a hang into a failure.
async fn until(what: &str, check: impl Fn() -> bool) {
    bounded(what, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Sends until one message gets through: a link that just came up may
/// still drop what was queued while it was down.
async fn delivered(from: &PeerNet, to: u64, inbound: &mut mpsc::Receiver<Message>) {
    let us = from.id();
    bounded("a message through a new link", async {
        let mut seq = 0;
        loop {
            seq += 1;
            let _ = from.send(heartbeat(us, to, seq));
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(100), inbound.recv()).await
            {
                assert_eq!((m.from, m.to), (us, to));
                return;
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_are_learned_and_forgotten_at_run_time() {
    let pki = Pki::new();
    let e1 = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let e2 = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let e3 = Endpoint::bind(any_port(), &pki.node(3)).unwrap();
    let (a1, a2, a3) = (
        e1.local_addr().unwrap(),
        e2.local_addr().unwrap(),
        e3.local_addr().unwrap(),
    );
    // 1 and 3 form the cluster; 2 joins knowing both, and they know
    // nothing of it yet.
    let (net3, mut in3) = e3
        .start_peers(config(3, BTreeMap::from([(1, a1)])))
        .unwrap();
    let (net1, mut in1) = e1
        .start_peers(config(1, BTreeMap::from([(3, a3)])))
        .unwrap();
    let (net2, mut in2) = e2
        .start_peers(config(2, BTreeMap::from([(1, a1), (3, a3)])))
        .unwrap();
    assert!(bounded("1-3", net1.wait_connected(3)).await);

    // Node 2 dials 3 (the lower id dials), and 3 refuses a stranger.
    until("3 refuses 2", || net3.stats().refused > 0).await;
    assert_eq!(
        net1.send(heartbeat(1, 2, 0)),
        Err(SendError::UnknownPeer { to: 2 })
    );

    // Node 1 learns of 2 and dials it; 2 accepts its known peer.
    assert!(net1.set_peer(2, a2).unwrap());
    assert!(!net1.set_peer(2, a2).unwrap(), "the same address again");
    assert!(bounded("1-2", net1.wait_connected(2)).await);
    delivered(&net1, 2, &mut in2).await;
    delivered(&net2, 1, &mut in1).await;

    // Node 3 learns of 2 too: 2's retried dial is accepted now.
    assert!(net3.set_peer(2, a2).unwrap());
    assert!(bounded("2-3", net3.wait_connected(2)).await);
    delivered(&net2, 3, &mut in3).await;
    delivered(&net3, 2, &mut in2).await;
    assert_eq!(net3.peers(), BTreeMap::from([(1, a1), (2, a2)]));

    // Node 3 forgets 2: the link goes down, sends are refused, and 2's
    // dials are refused again.
    let refused = net3.stats().refused;
    assert!(net3.remove_peer(2));
    assert!(!net3.remove_peer(2));
    assert_eq!(
        net3.send(heartbeat(3, 2, 0)),
        Err(SendError::UnknownPeer { to: 2 })
    );
    until("2 sees the link to 3 go", || {
        !net2.stats().peers[&3].connected
    })
    .await;
    until("3 refuses 2 again", || net3.stats().refused > refused).await;
    assert!(!net3.stats().peers.contains_key(&2));
    // The others are untouched.
    delivered(&net1, 3, &mut in3).await;
    delivered(&net1, 2, &mut in2).await;

    // Ids that cannot be peers.
    assert!(matches!(
        net1.set_peer(1, a2),
        Err(PeerError::InvalidPeer { id: 1, .. })
    ));
    assert!(matches!(
        net1.set_peer(0, a2),
        Err(PeerError::InvalidPeer { id: 0, .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_moved_is_dialed_at_its_new_address() {
    let pki = Pki::new();
    let e1 = Endpoint::bind(any_port(), &pki.node(1)).unwrap();
    let a1 = e1.local_addr().unwrap();
    let old = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let (net1, _in1) = e1
        .start_peers(config(1, BTreeMap::from([(2, old.local_addr().unwrap())])))
        .unwrap();
    let (_old_net, mut old_in) = old
        .start_peers(config(2, BTreeMap::from([(1, a1)])))
        .unwrap();
    delivered(&net1, 2, &mut old_in).await;

    // Node 2 comes back on another port; node 1 is told, through
    // `set_peers`, which also keeps everything else as it is.
    drop(old);
    let new = Endpoint::bind(any_port(), &pki.node(2)).unwrap();
    let a2 = new.local_addr().unwrap();
    let (_new_net, mut new_in) = new
        .start_peers(config(2, BTreeMap::from([(1, a1)])))
        .unwrap();
    assert!(net1.set_peers(&BTreeMap::from([(1, a1), (2, a2)])).unwrap());
    assert_eq!(net1.peers(), BTreeMap::from([(2, a2)]));
    delivered(&net1, 2, &mut new_in).await;
    // An empty set forgets everyone.
    assert!(net1.set_peers(&BTreeMap::new()).unwrap());
    assert!(net1.peers().is_empty());
}
