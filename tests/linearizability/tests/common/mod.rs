//! History builders shared by the integration tests.

#![allow(dead_code)] // each test binary uses a different subset

use kythira_linearizability::Operation;
use kythira_linearizability::kv::{KvInput, KvOutput};

pub type KvOp = Operation<KvInput, KvOutput>;

pub fn put(client: u64, key: u64, value: u64, call: u64, ret: u64) -> KvOp {
    Operation {
        client,
        input: KvInput::Put { key, value },
        call,
        output: Some(KvOutput::Put),
        ret: Some(ret),
    }
}

pub fn get(client: u64, key: u64, read: Option<u64>, call: u64, ret: u64) -> KvOp {
    Operation {
        client,
        input: KvInput::Get { key },
        call,
        output: Some(KvOutput::Get(read)),
        ret: Some(ret),
    }
}

pub fn pending_put(client: u64, key: u64, value: u64, call: u64) -> KvOp {
    Operation {
        client,
        input: KvInput::Put { key, value },
        call,
        output: None,
        ret: None,
    }
}

pub fn pending_get(client: u64, key: u64, call: u64) -> KvOp {
    Operation {
        client,
        input: KvInput::Get { key },
        call,
        output: None,
        ret: None,
    }
}

pub mod generate;
