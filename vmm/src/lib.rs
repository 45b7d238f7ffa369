//! reapvm: a microVM monitor on KVM that speaks Firecracker's interfaces, with REAP
//! (record-and-prefetch) snapshot restores.

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod console;
pub mod device_manager;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod microvm;
pub mod persist;
pub mod reap;
pub mod restore;
pub mod seccomp;
pub mod terminate;
pub mod uffd;
pub mod vcpu;
pub mod vm;
pub mod vstate;

pub use builder::{build_and_start, BuildError, StartOptions};
pub use config::VmConfig;
pub use microvm::MicroVm;
pub use vcpu::VmExitReason;
