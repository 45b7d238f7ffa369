//! reapvm-agent: the guest's PID 1. Mounts the kernel filesystems, reports what the guest
//! sees, starts the function runtime and the invocation server (HTTP on TCP port 8080, and
//! on vsock port 8080 when the VM has a vsock device), signals
//! readiness to the VMM, then stays as init (reaping orphans) or reboots, as the kernel
//! command line says (`reapvm.exit=stay|reboot`, `reapvm.function=NAME`).

mod boot_signal;
mod http;
mod invocation_signal;
mod netif;
mod report;
mod runtime;
mod server;
mod system;
mod vsock;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

const FUNCTIONS_DIR: &str = "/functions";
const RUN_DIR: &str = "/run/reapvm";
const INVOKE_PORT: u16 = 8080;

fn main() {
    let is_init = std::process::id() == 1;
    if is_init {
        system::mount_kernel_filesystems();
        system::ensure_console();
        system::handle_shutdown_signals();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let exit_action = system::ExitAction::from_cmdline(&cmdline);

    let seen = report::SystemView::read();
    println!("reapvm-agent: {}", seen.summary());

    if let Err(e) = netif::bring_up("lo") {
        eprintln!("reapvm-agent: cannot bring up lo: {e}");
    }
    let default = system::cmdline_value(&cmdline, "reapvm.function");
    let runtime =
        match runtime::Runtime::discover(Path::new(FUNCTIONS_DIR), Path::new(RUN_DIR), default) {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("reapvm-agent: {e}");
                runtime::Runtime::discover(Path::new("/nonexistent"), Path::new(RUN_DIR), None)
                    .expect("empty runtime")
            }
        };
    let failures = runtime.start();
    for failure in &failures {
        eprintln!("reapvm-agent: {failure}");
    }
    let state = Arc::new(server::AgentState::new(runtime, failures.is_empty()));
    match std::net::TcpListener::bind(("0.0.0.0", INVOKE_PORT)) {
        Ok(listener) => {
            let handler = server::handler(state.clone());
            std::thread::spawn(move || http::serve(listener, handler));
        }
        Err(e) => eprintln!("reapvm-agent: cannot listen on port {INVOKE_PORT}: {e}"),
    }
    // Only a VM with a vsock device has a CID to be reached at.
    if let Some(cid) = vsock::local_cid() {
        match vsock::listen(u32::from(INVOKE_PORT)) {
            Ok(listener) => {
                let handler = server::handler(state.clone());
                std::thread::spawn(move || http::serve_fd(listener, handler));
                println!("reapvm-agent: listening on vsock port {INVOKE_PORT} (CID {cid})");
            }
            Err(e) => eprintln!("reapvm-agent: cannot listen on vsock port {INVOKE_PORT}: {e}"),
        }
    }
    println!(
        "reapvm-agent: ready: functions={}",
        state.function_names().join(",")
    );
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
            system::reboot();
        }
        system::ExitAction::Stay => system::reap_forever(),
    }
}
