//! A model with the default single partition: a FIFO queue, whose state is a
//! sequence rather than a register.

use std::collections::VecDeque;

use kythira_linearizability::{Model, Operation, Outcome, check};

struct Queue;

#[derive(Clone, Debug)]
enum QueueInput {
    Enqueue(u64),
    Dequeue,
}

#[derive(Clone, Debug)]
enum QueueOutput {
    Enqueued,
    Dequeued(Option<u64>),
}

impl Model for Queue {
    type State = VecDeque<u64>;
    type Input = QueueInput;
    type Output = QueueOutput;

    fn init(&self) -> VecDeque<u64> {
        VecDeque::new()
    }

    fn step(
        &self,
        state: &VecDeque<u64>,
        input: &QueueInput,
        output: Option<&QueueOutput>,
    ) -> Option<VecDeque<u64>> {
        let mut next = state.clone();
        match (input, output) {
            (QueueInput::Enqueue(v), None | Some(QueueOutput::Enqueued)) => {
                next.push_back(*v);
                Some(next)
            }
            (QueueInput::Dequeue, None) => {
                next.pop_front();
                Some(next)
            }
            (QueueInput::Dequeue, Some(QueueOutput::Dequeued(got))) => {
                (next.pop_front() == *got).then_some(next)
            }
            _ => None,
        }
    }
}

fn op(
    client: u64,
    input: QueueInput,
    call: u64,
    ret: u64,
    output: QueueOutput,
) -> Operation<QueueInput, QueueOutput> {
    Operation {
        client,
        input,
        call,
        output: Some(output),
        ret: Some(ret),
    }
}

#[test]
fn concurrent_enqueues_fix_the_dequeue_order() {
    use QueueInput::*;
    use QueueOutput::*;
    let ok = [
        op(0, Enqueue(1), 0, 10, Enqueued),
        op(1, Enqueue(2), 0, 10, Enqueued),
        op(2, Dequeue, 11, 12, Dequeued(Some(2))),
        op(2, Dequeue, 13, 14, Dequeued(Some(1))),
        op(2, Dequeue, 15, 16, Dequeued(None)),
    ];
    assert_eq!(check(&Queue, &ok, None), Outcome::Linearizable);

    // Sequential enqueues must come out in order.
    let reordered = [
        op(0, Enqueue(1), 0, 1, Enqueued),
        op(1, Enqueue(2), 2, 3, Enqueued),
        op(2, Dequeue, 4, 5, Dequeued(Some(2))),
    ];
    assert_eq!(
        check(&Queue, &reordered, None),
        Outcome::NotLinearizable { partition: 0 }
    );
}

#[test]
fn pending_dequeue_may_have_consumed_an_element() {
    use QueueInput::*;
    use QueueOutput::*;
    let history = [
        op(0, Enqueue(1), 0, 1, Enqueued),
        op(0, Enqueue(2), 2, 3, Enqueued),
        Operation {
            client: 1,
            input: Dequeue,
            call: 4,
            output: None,
            ret: None,
        },
        op(2, Dequeue, 5, 6, Dequeued(Some(2))),
    ];
    assert_eq!(check(&Queue, &history, None), Outcome::Linearizable);
}
