//! Test plugin that computes NaNs from its inputs and answers their raw bits,
//! so the host can check that NaN canonicalization makes every replica produce
//! identical bits (WebAssembly leaves NaN payloads and signs nondeterministic).
//!
//! Wire format (postcard): `Command::Compute` = `[0]` followed by the four
//! fields as varints; the response is [`Bits`]. The operands are raw IEEE-754
//! bits so that callers can pass any NaN payload, signaling NaNs included.

use kythira_guest::{ApplyContext, StateMachine};
use serde::{Deserialize, Serialize};

/// A command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Runs every operation of [`Bits`] on the operands.
    Compute {
        /// `f64` operand `a`, as its bits.
        a: u64,
        /// `f64` operand `b`, as its bits.
        b: u64,
        /// `f32` operand `x`, as its bits.
        x: u32,
        /// `f32` operand `y`, as its bits.
        y: u32,
    },
}

/// A query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// Answers the result of the last `Compute`, if any.
    Last,
}

/// The bits of each result, in a fixed order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bits {
    /// `0/0`, `a+b`, `a-b`, `a*b`, `a/b`, `sqrt(a)`, `a*0`, `(a/b)*(a/b)` on `f64`.
    pub f64_results: [u64; 8],
    /// The same operations on `f32` with `x` and `y`.
    pub f32_results: [u32; 8],
}

/// The last result is kept as state, so NaN bits also reach snapshots.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nan {
    last: Option<Bits>,
}

#[expect(clippy::eq_op, reason = "0/0 is the NaN under test")]
fn f64_ops(a: f64, b: f64) -> [u64; 8] {
    // black_box keeps the compiler from folding 0/0 into a constant, so the
    // division runs on the machine and its NaN is the machine's.
    let zero = std::hint::black_box(0.0_f64);
    let quotient = a / b;
    [
        zero / zero,
        a + b,
        a - b,
        a * b,
        quotient,
        a.sqrt(),
        a * zero,
        quotient * quotient,
    ]
    .map(f64::to_bits)
}

#[expect(clippy::eq_op, reason = "0/0 is the NaN under test")]
fn f32_ops(x: f32, y: f32) -> [u32; 8] {
    let zero = std::hint::black_box(0.0_f32);
    let quotient = x / y;
    [
        zero / zero,
        x + y,
        x - y,
        x * y,
        quotient,
        x.sqrt(),
        x * zero,
        quotient * quotient,
    ]
    .map(f32::to_bits)
}

impl StateMachine for Nan {
    type Command = Command;
    type Response = Bits;
    type Query = Query;
    type QueryResponse = Option<Bits>;
    type Error = String;

    fn apply(&mut self, _ctx: &ApplyContext, command: Command) -> Result<Bits, String> {
        let Command::Compute { a, b, x, y } = command;
        let bits = Bits {
            f64_results: f64_ops(f64::from_bits(a), f64::from_bits(b)),
            f32_results: f32_ops(f32::from_bits(x), f32::from_bits(y)),
        };
        self.last = Some(bits.clone());
        Ok(bits)
    }

    fn query(&self, Query::Last: Query) -> Result<Option<Bits>, String> {
        Ok(self.last.clone())
    }
}

kythira_guest::export!(Nan);

#[cfg(test)]
mod tests {
    use super::*;
    use kythira_guest::testing::Harness;

    #[test]
    fn produces_nans_from_ordinary_and_nan_inputs() {
        let mut harness = Harness::<Nan>::new();
        let bits = harness
            .apply(&Command::Compute {
                a: 1.0_f64.to_bits(),
                b: 0.0_f64.to_bits(),
                x: (-1.0_f32).to_bits(),
                y: 0.0_f32.to_bits(),
            })
            .unwrap();
        // 0/0 is NaN whatever the operands; 1/0 is infinite, not NaN; the
        // square root of -1 is NaN.
        assert!(f64::from_bits(bits.f64_results[0]).is_nan());
        assert_eq!(f64::from_bits(bits.f64_results[4]), f64::INFINITY);
        assert!(f32::from_bits(bits.f32_results[0]).is_nan());
        assert!(f32::from_bits(bits.f32_results[5]).is_nan());

        // A signaling NaN with a payload goes through every operation.
        let signaling = 0x7FF4_0000_0000_0001;
        let bits = harness
            .apply(&Command::Compute {
                a: signaling,
                b: 2.0_f64.to_bits(),
                x: 0x7FA0_0001,
                y: 2.0_f32.to_bits(),
            })
            .unwrap();
        assert!(bits.f64_results.iter().all(|&r| f64::from_bits(r).is_nan()));
        assert!(bits.f32_results.iter().all(|&r| f32::from_bits(r).is_nan()));
        assert_eq!(harness.query(&Query::Last), Ok(Some(bits)));
        harness.assert_snapshot_round_trip();
    }
}
