//! Well-formedness of histories and partitions.

use crate::Operation;

/// A history or partitioning the checker cannot interpret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    /// An operation returned before it was called.
    #[error("operation {index} returns at {ret}, before its call at {call}")]
    ReturnBeforeCall {
        /// Index of the operation in the history.
        index: usize,
        /// Its call time.
        call: u64,
        /// Its return time.
        ret: u64,
    },
    /// A completed operation has no output.
    #[error("operation {index} has a return time but no output")]
    MissingOutput {
        /// Index of the operation in the history.
        index: usize,
    },
    /// A pending operation has an output.
    #[error("operation {index} has an output but no return time")]
    OutputWithoutReturn {
        /// Index of the operation in the history.
        index: usize,
    },
    /// The model's partitioning names an operation that does not exist.
    #[error("partition {partition} names operation {index}, but the history has {len}")]
    PartitionIndexOutOfRange {
        /// Index of the partition.
        partition: usize,
        /// The offending operation index.
        index: usize,
        /// Length of the history.
        len: usize,
    },
    /// The model's partitioning names an operation twice.
    #[error("operation {index} appears more than once in the partitioning")]
    DuplicateInPartitions {
        /// The repeated operation index.
        index: usize,
    },
}

pub(crate) fn validate_operations<I, O>(history: &[Operation<I, O>]) -> Result<(), HistoryError> {
    for (index, op) in history.iter().enumerate() {
        match (op.ret, &op.output) {
            (Some(ret), Some(_)) if ret < op.call => {
                return Err(HistoryError::ReturnBeforeCall {
                    index,
                    call: op.call,
                    ret,
                });
            }
            (Some(_), None) => return Err(HistoryError::MissingOutput { index }),
            (None, Some(_)) => return Err(HistoryError::OutputWithoutReturn { index }),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) fn validate_partitions(
    len: usize,
    partitions: &[Vec<usize>],
) -> Result<(), HistoryError> {
    let mut seen = vec![false; len];
    for (partition, indices) in partitions.iter().enumerate() {
        for &index in indices {
            let slot = seen
                .get_mut(index)
                .ok_or(HistoryError::PartitionIndexOutOfRange {
                    partition,
                    index,
                    len,
                })?;
            if std::mem::replace(slot, true) {
                return Err(HistoryError::DuplicateInPartitions { index });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: u64, ret: Option<u64>, output: Option<()>) -> Operation<(), ()> {
        Operation {
            client: 0,
            input: (),
            call,
            output,
            ret,
        }
    }

    #[test]
    fn accepts_completed_pending_and_instantaneous_operations() {
        let history = [
            op(1, Some(2), Some(())),
            op(3, None, None),
            op(4, Some(4), Some(())),
        ];
        assert_eq!(validate_operations(&history), Ok(()));
    }

    #[test]
    fn rejects_malformed_operations() {
        assert_eq!(
            validate_operations(&[op(5, Some(4), Some(()))]),
            Err(HistoryError::ReturnBeforeCall {
                index: 0,
                call: 5,
                ret: 4
            })
        );
        assert_eq!(
            validate_operations(&[op(1, Some(2), Some(())), op(1, Some(2), None)]),
            Err(HistoryError::MissingOutput { index: 1 })
        );
        assert_eq!(
            validate_operations(&[op(1, None, Some(()))]),
            Err(HistoryError::OutputWithoutReturn { index: 0 })
        );
    }

    #[test]
    fn rejects_bad_partitions() {
        assert_eq!(validate_partitions(3, &[vec![0, 2], vec![1]]), Ok(()));
        assert_eq!(validate_partitions(3, &[vec![0], vec![]]), Ok(()));
        assert_eq!(
            validate_partitions(3, &[vec![0], vec![3]]),
            Err(HistoryError::PartitionIndexOutOfRange {
                partition: 1,
                index: 3,
                len: 3
            })
        );
        assert_eq!(
            validate_partitions(3, &[vec![0, 1], vec![1]]),
            Err(HistoryError::DuplicateInPartitions { index: 1 })
        );
    }
}
