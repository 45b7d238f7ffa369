//! Unit tests of the whole-guest suites' shared support code (its logic, on the host; the
//! suites themselves use their own harness, so these run here).

// The suites' helpers are used by the suites, not here.
#[allow(unused_imports)]
mod support;
