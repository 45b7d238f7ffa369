//! reapvm-agent: the guest's PID 1. Mounts the kernel filesystems, reports what the guest
//! sees (CPUs, memory), signals boot completion to the VMM, then stays as init (reaping
//! orphans) or reboots, as the kernel command line says (`reapvm.exit=stay|reboot`).

mod boot_signal;
mod report;
mod system;

use std::io::Write;

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        system::mount_kernel_filesystems();
        system::ensure_console();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let exit_action = system::ExitAction::from_cmdline(&cmdline);

    let seen = report::SystemView::read();
    println!("reapvm-agent: {}", seen.summary());
    let _ = std::io::stdout().flush();

    if let Err(e) = boot_signal::signal_boot_complete() {
        eprintln!("reapvm-agent: cannot signal boot completion to the VMM: {e}");
    }

    if !is_init {
        return;
    }
    match exit_action {
        system::ExitAction::Reboot => {
            println!("reapvm-agent: rebooting");
            let _ = std::io::stdout().flush();
            system::reboot();
        }
        system::ExitAction::Stay => system::reap_forever(),
    }
}
