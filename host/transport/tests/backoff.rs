//! Properties of the pure reconnect schedule.

use std::time::Duration;

use kythira_transport::Backoff;
use proptest::prelude::*;

fn backoff() -> impl Strategy<Value = Backoff> {
    (1u64..10_000, 1u64..100_000).prop_map(|(base_ms, extra_ms)| Backoff {
        base: Duration::from_millis(base_ms),
        max: Duration::from_millis(base_ms + extra_ms),
    })
}

proptest! {
    #[test]
    fn never_above_max_never_below_half_the_capped_delay(
        b in backoff(), attempt in any::<u32>(), jitter in 0.0f64..1.0,
    ) {
        let d = b.delay(attempt, jitter);
        prop_assert!(d <= b.max);
        let capped = b.base.saturating_mul(2u32.saturating_pow(attempt.min(31))).min(b.max);
        prop_assert!(d >= capped / 2, "{d:?} < half of {capped:?}");
        prop_assert!(d >= b.base / 2);
    }

    #[test]
    fn the_bound_grows_with_the_attempt(b in backoff(), attempt in 0u32..64) {
        // With the same jitter, a later attempt never waits less.
        for jitter in [0.0, 0.5, 0.999] {
            prop_assert!(b.delay(attempt + 1, jitter) >= b.delay(attempt, jitter));
        }
    }

    #[test]
    fn jitter_moves_the_delay_monotonically(b in backoff(), attempt in 0u32..64, x in 0.0f64..1.0, y in 0.0f64..1.0) {
        let (lo, hi) = if x <= y { (x, y) } else { (y, x) };
        prop_assert!(b.delay(attempt, lo) <= b.delay(attempt, hi));
    }

    #[test]
    fn out_of_range_jitter_is_clamped(b in backoff(), attempt in 0u32..64) {
        prop_assert_eq!(b.delay(attempt, -3.0), b.delay(attempt, 0.0));
        prop_assert_eq!(b.delay(attempt, f64::NAN), b.delay(attempt, 0.0));
        prop_assert!(b.delay(attempt, 7.0) <= b.max);
    }
}

#[test]
fn doubles_until_the_cap() {
    let b = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(1),
    };
    let no_jitter: Vec<u64> = (0..6).map(|a| b.delay(a, 0.0).as_millis() as u64).collect();
    assert_eq!(no_jitter, [50, 100, 200, 400, 500, 500]);
    let top = b.delay(3, 0.999_999);
    assert!(top > Duration::from_millis(799) && top <= Duration::from_millis(800));
    // Huge attempts saturate instead of overflowing.
    assert!(b.delay(u32::MAX, 0.5) <= b.max);
    // A max below base is treated as base.
    let odd = Backoff {
        base: Duration::from_secs(2),
        max: Duration::from_secs(1),
    };
    assert!(odd.delay(0, 0.9) <= Duration::from_secs(2));
}
