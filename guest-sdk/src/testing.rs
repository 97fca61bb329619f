//! Native test harness.
