//! Whether the event loop's ticks kept to the clock, for the leader lease.
//!
//! The core counts its lease in ticks: a leader serves lease reads while a
//! quorum acknowledged it within `election_ticks - lease_drift_ticks` of its
//! own ticks. A tick that comes late is not made up (a paused, throttled or
//! busy process), so the lease would stretch in real time by every delay,
//! large or small, and outlive the followers' election timeout. A lease read
//! is therefore served only while the last `election_ticks` ticks took
//! their nominal time plus half a tick at most, and the last one is recent.
//! Then the lease's ticks (at most `election_ticks - 2`) plus the time since
//! the last tick stay within `election_ticks - 0.5` nominal ticks, below a
//! follower's shortest election timeout with the core's 5 % rate margin.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The times of the last ticks.
#[derive(Debug)]
pub struct TickWindow {
    /// Up to `window + 1` instants: `window` gaps.
    at: VecDeque<Instant>,
    window: usize,
    tick: Duration,
}

impl TickWindow {
    /// A window of `window` ticks of `tick` each.
    pub fn new(window: u32, tick: Duration) -> Self {
        let window = window.max(1) as usize;
        Self {
            at: VecDeque::with_capacity(window + 1),
            window,
            tick,
        }
    }

    /// A tick was handled at `now`.
    pub fn ticked(&mut self, now: Instant) {
        if self.at.len() > self.window {
            self.at.pop_front();
        }
        self.at.push_back(now);
    }

    /// Whether the last ticks kept to the clock well enough for the lease
    /// to be trusted at `now`. False until a whole window was seen.
    pub fn on_time(&self, now: Instant) -> bool {
        let (Some(first), Some(last)) = (self.at.front(), self.at.back()) else {
            return false;
        };
        let slack = self.tick / 2;
        self.at.len() > self.window
            && now.saturating_duration_since(*last) <= self.tick + slack
            && last.duration_since(*first) <= self.tick * self.window as u32 + slack
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    fn window_after(gaps_ms: &[u64]) -> (TickWindow, Instant) {
        let mut w = TickWindow::new(10, TICK);
        let mut now = Instant::now();
        w.ticked(now);
        for gap in gaps_ms {
            now += Duration::from_millis(*gap);
            w.ticked(now);
        }
        (w, now)
    }

    #[test]
    fn ticks_on_time_are_trusted_once_a_window_was_seen() {
        let (w, now) = window_after(&[100; 9]);
        assert!(!w.on_time(now), "nine gaps are not a window");
        let (w, now) = window_after(&[100; 10]);
        assert!(w.on_time(now));
        assert!(w.on_time(now + Duration::from_millis(150)));
        assert!(
            !w.on_time(now + Duration::from_millis(151)),
            "the last tick is old"
        );
    }

    #[test]
    fn a_pause_is_distrusted_until_it_leaves_the_window() {
        let mut gaps = vec![100; 10];
        gaps.push(1_000);
        let (mut w, mut now) = window_after(&gaps);
        assert!(!w.on_time(now));
        for _ in 0..9 {
            now += TICK;
            w.ticked(now);
            assert!(!w.on_time(now));
        }
        now += TICK;
        w.ticked(now);
        assert!(w.on_time(now));
    }

    #[test]
    fn small_delays_that_add_up_are_distrusted() {
        // Each tick 10 ms late: never one late tick, but a second of ticks
        // takes 1.1 s.
        let (w, now) = window_after(&[110; 12]);
        assert!(!w.on_time(now));
        let (w, now) = window_after(&[104; 12]);
        assert!(w.on_time(now), "40 ms over ten ticks is within half a tick");
    }
}
