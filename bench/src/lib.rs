//! reapvm's benchmarks' shared code: the vSwarm suite benchmark (boot, snapshot, REAP
//! recording, cold restores per memory backend; tables, CSV and charts) and the replay
//! guest's VMs on this host's own KVM. The benchmark commands are vmm's bench targets
//! (tests/benches), which also build the `reapvm` binary they drive.

pub mod replay_compute;
pub mod replay_vm;
pub mod suite;
