//! Address entries applied like any other: the same book and the same
//! answers on every replica, refusals included, and a replay ends in the
//! same book.

use std::net::SocketAddr;

use kythira_api::{ApiError, Response};
use kythira_node::addresses::Addresses;
use kythira_node::entry::{Envelope, Op};
use kythira_node::machines::Machines;
use kythira_raft::{Entry, EntryKind};

fn entry(index: u64, op: Op) -> Entry {
    Entry {
        term: 1,
        index,
        kind: EntryKind::Normal,
        data: Envelope::encode(1_000 + index, &op),
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn set(id: u64, peer: u16, client: u16) -> Op {
    Op::SetAddress {
        id,
        peer: addr(peer),
        client: addr(client),
    }
}

#[test]
fn address_entries_give_every_replica_the_same_book_and_answers() {
    let log = vec![
        entry(1, set(4, 7104, 7004)),
        // Node 5 wants node 4's client port: refused.
        entry(2, set(5, 7105, 7004)),
        entry(3, Op::RemoveMember { id: 2 }),
        entry(4, set(5, 7105, 7005)),
        // A removed id is not given out again.
        entry(5, set(2, 7102, 7002)),
        entry(6, Op::RemoveMember { id: 4 }),
        // Node 4's ports are free once it is removed.
        entry(7, set(6, 7104, 7004)),
    ];
    let mut a = Machines::new(kythira_node::engines::Engines::new(None));
    let answers = a.apply(&log);
    assert_eq!(answers.len(), log.len());
    let refused: Vec<u64> = answers
        .iter()
        .filter(|x| x.reply.is_err())
        .map(|x| x.index)
        .collect();
    assert_eq!(refused, [2, 5]);
    assert!(matches!(
        &answers[1].reply,
        Err(ApiError::Membership(why)) if why.contains("127.0.0.1:7004 is already the address of node 4")
    ));
    assert!(matches!(
        &answers[4].reply,
        Err(ApiError::Membership(why)) if why.contains("node 2 was removed")
    ));
    assert!(matches!(
        answers[0].reply,
        Ok(Response::Applied { index: 1, .. })
    ));

    let book = a.addresses();
    assert_eq!(book.removed_at(2), Some(3));
    assert_eq!(book.removed_at(4), Some(6));
    assert_eq!(
        book.get(6),
        Some(Addresses {
            peer: addr(7104),
            client: addr(7004)
        })
    );
    let live: Vec<u64> = book.live().map(|(id, _)| id).collect();
    assert_eq!(live, [5, 6]);

    // Another replica, applying the same log in other batches, agrees.
    let mut b = Machines::new(kythira_node::engines::Engines::new(None));
    let mut again = Vec::new();
    for chunk in log.chunks(3) {
        again.extend(b.apply(chunk));
    }
    assert_eq!(answers, again);
    assert_eq!(a.addresses(), b.addresses());
}
