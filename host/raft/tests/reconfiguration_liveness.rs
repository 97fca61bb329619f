//! Liveness after reconfiguration: every cluster that has a majority of
//! each configuration connected elects a leader again.

mod common;

use common::*;
use kythira_raft::{EntryKind, Membership, Message, MessageBody, NodeId, Persisted, Raft, Role};

fn members(voters: &[NodeId], learners: &[NodeId]) -> Membership {
    Membership::new(voters.iter().copied(), learners.iter().copied()).unwrap()
}

fn is_final_config_to(m: &Message, to: NodeId) -> bool {
    m.to == to
        && matches!(&m.body, MessageBody::Append { entries, .. }
            if entries.iter().any(|e| e.kind == EntryKind::Config
                && !Membership::decode(&e.data).unwrap().is_joint()))
}

/// {1,2,3} -> {1,2,4} (3 replaced by a new node 4). J reaches 1, 3, 4 (commits
/// on {1,3} and {1,4}), C(new) reaches 1 and 4 only (commits on {1,4}); 2 never
/// hears of any of it. Then 1 crashes for good. 2, 3, 4 are a majority of
/// every configuration involved and the network among them is perfect, yet:
/// 3 (a voter of J) campaigns and raises 2's term; 4 ignores 3's requests
/// "term and all" (3 is not a voter of C(new) and its log is behind), and 2
/// silently drops 4's lower-term vote requests; 2 never sends 4 anything (4
/// is not in 2's configuration). Nobody can win: 2 and 3 lack votes, and 4,
/// the only node that could, never learns the term it needs.
#[test]
fn removed_voter_of_joint_config_starves_the_only_electable_node() {
    // Paper Raft, and check-quorum without pre-vote (a combination the
    // simulator runs reconfigurations with).
    for check_quorum in [false, true] {
        starved(check_quorum);
    }
}

fn starved(check_quorum: bool) {
    let mut net = Network::with_config(&[1, 2, 3], |c| c.check_quorum = check_quorum);
    let mut c4 = config(4, &[]);
    c4.check_quorum = check_quorum;
    net.add(Raft::new(c4, Persisted::default()).unwrap());
    net.elect(1);
    net.cut(1, 2);
    net.drop_if(|m| is_final_config_to(m, 3));
    let p = net
        .get(1)
        .propose_membership(members(&[1, 2, 4], &[]))
        .unwrap();
    net.settle();
    net.tick(1, 3);
    assert!(net.get(3).membership().is_joint());
    assert!(!net.get(4).membership().is_joint());
    assert_eq!(net.get(4).membership_index(), p.index + 1);
    assert_eq!(net.get(2).membership_index(), 0);
    // 1 crashes for good.
    net.heal();
    net.isolate(1);
    let mut leader = None;
    for t in 0..20_000 {
        for id in [2, 3, 4] {
            net.get(id).tick();
        }
        net.settle();
        if let Some(l) = [2, 3, 4]
            .into_iter()
            .find(|&id| net.get(id).role() == Role::Leader)
        {
            leader = Some((l, t));
            break;
        }
    }
    let terms: Vec<_> = [2, 3, 4]
        .iter()
        .map(|&id| (id, net.get(id).term()))
        .collect();
    assert!(
        leader.is_some(),
        "check_quorum {check_quorum}: no leader among 2, 3, 4 after 20000 ticks; terms {terms:?}"
    );
}
