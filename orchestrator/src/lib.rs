//! reapd, a vHive-style orchestrator on reapvm, and reapctl, its client (docs/orchestrator.md).

pub mod agent;
pub mod api;
pub mod bench;
pub mod breakdown;
pub mod daemon;
pub mod db;
pub mod http;
pub mod metrics;
pub mod netns;
pub mod pool;
pub mod spec;
pub mod vmm;
