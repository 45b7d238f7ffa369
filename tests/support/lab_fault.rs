//! A guest fault of the KVM lab's emulation (docs/kvm-lab.md), told to the one layer that
//! retries: the lab runner (`place.rs`). Code that sees such a fault in the lab announces it
//! and fails; it never retries itself. The runner then gives the test (or the benchmark) more
//! runs in fresh labs than it gives a failure of any other kind.
//!
//! The announcement carries a token that the runner made (one per suite or benchmark it
//! runs, the same in each of its lab runs) and passed in through the environment: a guest's
//! console, which a failing test prints, cannot forge it.

use std::fmt;

use super::{detect_place, Place};

/// The variable through which the runner hands its token into the lab.
pub const TOKEN_ENV: &str = "REAPVM_LAB_FAULT_TOKEN";

/// A guest fault that the lab's emulation causes now and then, and hardware KVM never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabFault {
    /// The guest triple-faulted (reapvm's `vcpu.exit_shutdown`).
    GuestShutdown,
    /// The guest stopped making progress (its vCPU spinning on one nested page fault).
    Stalled,
}

impl fmt::Display for LabFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabFault::GuestShutdown => "the guest shut down (triple fault)",
            LabFault::Stalled => "the guest stalled",
        })
    }
}

/// The line that tells the runner, for `token`.
fn mark(token: &str) -> String {
    format!("[reapvm lab fault {token}]")
}

/// In the lab, tells the runner that `what` failed on a guest fault of the emulation, and
/// returns the words for the failure. Elsewhere (hardware KVM) it only returns them: there
/// the fault is reapvm's or the guest's, and a plain failure.
pub fn announce(fault: LabFault, what: &str) -> String {
    if detect_place() != Place::Lab {
        return format!("{what}: {fault}");
    }
    let token = std::env::var(TOKEN_ENV).unwrap_or_default();
    // On stdout, where the runner reads the lab's output (stderr reaches it too, but stdout
    // is what libtest keeps in order with the "test NAME ..." lines).
    println!(
        "{} {what}: {fault} in the KVM lab, an emulation fault (docs/kvm-lab.md): the lab \
         runner gives this more runs in fresh labs",
        mark(&token)
    );
    format!("{what}: {fault} in the KVM lab (announced to the lab runner)")
}

/// A token for one runner's lab runs: unknown to the guests, different for every runner.
pub fn new_token() -> String {
    let mut bytes = [0u8; 12];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if random.is_err() {
        // Without /dev/urandom, the clock and the process id still differ between runs.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        bytes[..8].copy_from_slice(&(nanos as u64).to_le_bytes());
        bytes[8..].copy_from_slice(&std::process::id().to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `line` of a lab run's output announces a lab fault with `token`.
pub fn announced_in(line: &str, token: &str) -> bool {
    !token.is_empty() && line.contains(&mark(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_runs_own_token_counts() {
        let token = new_token();
        assert_eq!(token.len(), 24);
        assert_ne!(token, new_token());
        let line = format!("test a ... {} a: the guest stalled", mark(&token));
        assert!(announced_in(&line, &token));
        // A guest's console printed by a failing test can say the words, not the token.
        assert!(!announced_in("[reapvm lab fault ] x", &token));
        assert!(!announced_in(&line, &new_token()));
        assert!(!announced_in(&line, ""));
    }

    #[test]
    fn outside_the_lab_a_fault_is_a_plain_failure() {
        // Unit tests run on the host, never with REAPVM_IN_LAB.
        let said = announce(LabFault::GuestShutdown, "boot of helloworld");
        assert_eq!(
            said,
            "boot of helloworld: the guest shut down (triple fault)"
        );
    }
}
