//! Read modes against real processes: followers serve linearizable reads
//! themselves (ReadIndex through the leader, no redirect), the leader
//! serves lease reads, and a concurrent history of writes and both kinds of
//! reads is linearizable by the project's checker. A follower refuses a
//! lease read, naming the leader.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kythira::local::{LocalCluster, Options};
use kythira_api::{ApiError, Consistency, Payload, Reply, Request, Response};
use kythira_guest::codec;
use kythira_linearizability::kv::{KvInput, KvModel, KvOutput};
use kythira_linearizability::{Operation, Verdict, check_history};
use kythira_plugin_kv::{Command, Query, Response as KvResponse};
use kythira_transport::rpc::RpcClient;
use kythira_transport::tls::Tls;
use support::*;

const KEYS: u64 = 3;
const WRITERS: u64 = 3;
const WRITES: u64 = 40;
/// One attempt's wait; an answer after it counts as never given.
const ATTEMPT: Duration = Duration::from_secs(20);

type History = Arc<Mutex<Vec<Operation<KvInput, KvOutput>>>>;

fn key_name(key: u64) -> Vec<u8> {
    format!("reg-{key}").into_bytes()
}

fn write(key: u64, value: u64) -> Request {
    Request::Apply {
        machine: "kv".into(),
        command: Payload::Bytes(Bytes::from(
            codec::encode(&Command::Put {
                key: key_name(key),
                value: value.to_string().into_bytes(),
            })
            .unwrap(),
        )),
        session: None,
    }
}

fn read(key: u64, consistency: Consistency) -> Request {
    Request::Query {
        machine: "kv".into(),
        query: Payload::Bytes(Bytes::from(
            codec::encode(&Query::Get { key: key_name(key) }).unwrap(),
        )),
        consistency,
    }
}

fn value(reply: Response) -> Option<u64> {
    let (Response::Queried {
        output: Payload::Bytes(b),
    }
    | Response::Applied {
        output: Payload::Bytes(b),
        ..
    }) = reply
    else {
        panic!("unexpected {reply:?}");
    };
    match codec::decode::<KvResponse>(&b).unwrap() {
        KvResponse::Value(v) => v.map(|v| String::from_utf8(v).unwrap().parse().unwrap()),
        other => panic!("unexpected {other:?}"),
    }
}

/// One connection to one node, without the client library's redirects:
/// what that node answers is what is recorded.
async fn connect(c: &LocalCluster, addr: SocketAddr) -> RpcClient {
    let tls = Tls::load(&c.client_files("app")).unwrap();
    RpcClient::connect(addr, &tls).await.unwrap()
}

/// Microseconds since `start`: one clock for every client of the history.
fn now(start: Instant) -> u64 {
    start.elapsed().as_micros() as u64
}

/// Client `who` whose attempts may wait a minute: a deploy answers once the
/// plugin is compiled (seconds in a debug build on a busy machine), and a
/// membership change or transfer once it has taken effect.
fn patient(c: &LocalCluster, who: &str) -> kythira_client::Client {
    let tls = kythira_transport::tls::Tls::load(&c.client_files(who)).unwrap();
    let mut cfg = kythira_client::ClientConfig::new(c.endpoints(), tls);
    cfg.deadline = std::time::Duration::from_secs(120);
    cfg.attempt_timeout = std::time::Duration::from_secs(60);
    kythira_client::Client::new(cfg).unwrap()
}

/// Deploys the kv plugin as machine `kv`.
async fn deploy_kv(c: &LocalCluster) {
    let component = std::fs::read(plugin("kv")).unwrap();
    patient(c, "admin")
        .deploy("kv", component.into(), kythira_api::DeployLimits::default())
        .await
        .expect("deploy kv");
}

#[derive(Default)]
struct Tally {
    served: u64,
    redirected: u64,
    failed: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_and_lease_reads_are_linearizable() {
    let c = start(Options::default());
    deploy_kv(&c).await;
    let admin = client(&c, "admin");
    let leader = leader(&admin, &c).await;
    let followers: Vec<u64> = c.ids().into_iter().filter(|id| *id != leader).collect();
    // Every follower knows the leader before the history starts: a
    // follower without one answers NotLeader, which is no read at all.
    for id in &followers {
        eventually(Duration::from_secs(30), "followers know the leader", || {
            let (admin, c) = (&admin, &c);
            async move {
                admin
                    .status_of(c.addr(*id))
                    .await
                    .is_ok_and(|s| s.leader == Some(leader))
            }
        })
        .await;
    }

    // A follower refuses a lease read and names the leader.
    let follower = connect(&c, c.addr(followers[0])).await;
    let answer: Reply = follower
        .call(&read(0, Consistency::Lease), ATTEMPT)
        .await
        .unwrap();
    assert!(
        matches!(answer, Err(ApiError::NotLeader { leader: Some(l), .. }) if l == leader),
        "{answer:?}"
    );

    let start = Instant::now();
    let history: History = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tasks = Vec::new();

    // Writers, through the leader: unique values per key.
    for w in 0..WRITERS {
        let conn = connect(&c, c.addr(leader)).await;
        let (history, done) = (history.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..WRITES {
                let key = (w + n) % KEYS;
                let value = w * 1_000_000 + n + 1;
                let call = now(start);
                let answer: Result<Reply, _> = conn.call(&write(key, value), ATTEMPT).await;
                let ret = now(start);
                let (output, ret) = match answer {
                    Ok(Ok(_)) => (Some(KvOutput::Put), Some(ret)),
                    // Refused before it was proposed: it never happened.
                    Ok(Err(ApiError::NotLeader { .. } | ApiError::Unavailable(_))) => continue,
                    // Lost, timed out, outcome unknown: it may have happened.
                    _ => (None, None),
                };
                history.lock().unwrap().push(Operation {
                    client: w,
                    input: KvInput::Put { key, value },
                    call,
                    output,
                    ret,
                });
            }
            done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }

    // Readers: two per follower (linearizable), two at the leader (lease).
    let mut tallies = Vec::new();
    let readers = followers
        .iter()
        .flat_map(|id| [(*id, Consistency::Linearizable); 2])
        .chain([(leader, Consistency::Lease); 2]);
    for (i, (id, consistency)) in readers.enumerate() {
        let conn = connect(&c, c.addr(id)).await;
        let (history, done) = (history.clone(), done.clone());
        let tally = Arc::new(Mutex::new(Tally::default()));
        tallies.push((id, consistency, tally.clone()));
        let client = 100 + i as u64;
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while done.load(std::sync::atomic::Ordering::SeqCst) < WRITERS {
                n += 1;
                let key = n % KEYS;
                let call = now(start);
                let answer: Result<Reply, _> = conn.call(&read(key, consistency), ATTEMPT).await;
                let ret = now(start);
                let mut t = tally.lock().unwrap();
                match answer {
                    Ok(Ok(reply)) => {
                        t.served += 1;
                        history.lock().unwrap().push(Operation {
                            client,
                            input: KvInput::Get { key },
                            call,
                            output: Some(KvOutput::Get(value(reply))),
                            ret: Some(ret),
                        });
                    }
                    // A read that failed changed nothing: left out.
                    Ok(Err(ApiError::NotLeader { .. })) => t.redirected += 1,
                    _ => t.failed += 1,
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("a client failed");
    }

    let history = Arc::try_unwrap(history).unwrap().into_inner().unwrap();
    let writes = history
        .iter()
        .filter(|op| matches!(op.input, KvInput::Put { .. }) && op.ret.is_some())
        .count();
    assert!(
        writes as u64 > WRITERS * WRITES / 2,
        "{writes} writes acknowledged"
    );
    for (id, consistency, tally) in &tallies {
        let t = tally.lock().unwrap();
        // Each follower serves its reads itself: a redirect would be a
        // read the leader has to serve. Under a loaded machine a forwarded
        // read can time out (an election timeout without the leader's
        // answer) and be refused; those must stay rare.
        assert!(
            t.served > 0 && t.redirected + t.failed <= t.served / 10,
            "node {id} ({consistency:?}) served {} reads, redirected {}, failed {}",
            t.served,
            t.redirected,
            t.failed
        );
    }
    // Reads saw writes: the history is not trivially linearizable.
    assert!(
        history
            .iter()
            .any(|op| matches!(op.output, Some(KvOutput::Get(Some(_))))),
        "no read saw a write"
    );
    match check_history(&KvModel, &history, Some(50_000_000)).expect("a well-formed history") {
        Verdict::Linearizable => {}
        Verdict::NotLinearizable(counterexample) => {
            panic!("{}", counterexample.render(&history))
        }
        Verdict::Undecided => panic!("the checker ran out of steps"),
    }
}
