//! `reapvm`: starts one microVM, as `firecracker` does.

use std::process::ExitCode;

use clap::Parser;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm::api::controller::{serve_preboot, RunningApi};
use vmm::builder::{build_and_start, BuildError, StartOptions};
use vmm::cli::{exit_code, Cli};
use vmm::config::VmConfig;
use vmm::{api, logger, metrics, MicroVm, VmExitReason};

fn fail(code: i32, message: impl std::fmt::Display) -> ExitCode {
    log::error!("{message}");
    eprintln!("reapvm: error: {message}");
    ExitCode::from(code as u8)
}

fn main() -> ExitCode {
    let start_time = devices::legacy::start_time_now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit_code::ARG_PARSING
            } else {
                exit_code::OK
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    if let Some(path) = &cli.describe_snapshot {
        return match vmm::persist::read_vmstate(path) {
            Ok(_) => {
                println!("v{}.0.0", vmm::persist::VMSTATE_VERSION);
                ExitCode::from(exit_code::OK as u8)
            }
            Err(e) => fail(exit_code::GENERIC_ERROR, e),
        };
    }
    let config = match cli
        .config_file
        .as_deref()
        .map(VmConfig::from_file)
        .transpose()
    {
        Ok(config) => config,
        Err(e) => return fail(exit_code::BAD_CONFIGURATION, e),
    };
    let logger_config = config.as_ref().and_then(|c| c.logger.clone());
    let level = logger_config
        .as_ref()
        .and_then(|l| l.level.clone())
        .unwrap_or_else(|| cli.level.clone());
    let level = match logger::parse_level(&level) {
        Ok(level) => level,
        Err(e) => return fail(exit_code::ARG_PARSING, e),
    };
    let log_path = logger_config
        .as_ref()
        .and_then(|l| l.log_path.clone())
        .or_else(|| cli.log_path.clone());
    let show_level = logger_config
        .as_ref()
        .and_then(|l| l.show_level)
        .unwrap_or(cli.show_level);
    let show_origin = logger_config
        .as_ref()
        .and_then(|l| l.show_log_origin)
        .unwrap_or(cli.show_log_origin);
    let module = logger_config
        .as_ref()
        .and_then(|l| l.module.clone())
        .or_else(|| cli.module.clone());
    if let Err(e) = logger::init(
        &cli.id,
        level,
        log_path.as_deref(),
        show_level,
        show_origin,
        module,
    ) {
        return fail(exit_code::ARG_PARSING, e);
    }
    if let Err(e) = vmm::seccomp::init(cli.no_seccomp, cli.seccomp_filter.as_deref()) {
        return fail(exit_code::BAD_CONFIGURATION, e);
    }
    // Before any other thread starts, so that every thread leaves the signals to it.
    if let Err(e) = vmm::terminate::handle_termination_signals() {
        return fail(exit_code::GENERIC_ERROR, e);
    }
    let metrics_path = config
        .as_ref()
        .and_then(|c| c.metrics.as_ref())
        .map(|m| m.metrics_path.clone())
        .or_else(|| cli.metrics_path.clone());
    if let Some(path) = metrics_path {
        if let Err(e) = metrics::init(&path) {
            return fail(exit_code::ARG_PARSING, e);
        }
    }

    let start_time = match cli.start_time_us {
        Some(wall_us) => devices::legacy::StartTime {
            wall_us,
            cpu_us: cli.start_time_cpu_us.unwrap_or(start_time.cpu_us),
        },
        None => start_time,
    };
    let mmds = std::sync::Arc::new(std::sync::Mutex::new(devices::mmds::MmdsStore::new(
        cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size),
    )));
    metrics::metrics().mmds.set(mmds.clone());
    if let Some(path) = &cli.metadata {
        if let Err(e) = vmm::config::read_metadata(path).and_then(|data| {
            mmds.lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(data)
                .map_err(|e| e.to_string())
        }) {
            return fail(
                exit_code::BAD_CONFIGURATION,
                format!("--metadata {}: {e}", path.display()),
            );
        }
    }
    let opts = || StartOptions {
        console_out: Box::new(std::io::stdout()),
        console_in: true,
        boot_timer: cli.boot_timer,
        start_time,
        ready: None,
        mmds: mmds.clone(),
    };
    let start = |config: &VmConfig| -> Result<MicroVm, ExitCode> {
        build_and_start(config, opts()).map_err(|e| match e {
            e @ BuildError::Config(_) => fail(exit_code::BAD_CONFIGURATION, e),
            e => fail(exit_code::GENERIC_ERROR, e),
        })
    };

    // Lives until main returns: the socket file goes away with the process.
    let mut _socket = None;
    let microvm = if cli.no_api {
        let Some(config) = config else {
            return fail(exit_code::ARG_PARSING, "--no-api needs --config-file");
        };
        match start(&config) {
            Ok(vm) => vm,
            Err(code) => return code,
        }
    } else {
        vmm::terminate::remove_on_termination(cli.api_sock.clone());
        let (inbox, _api_thread) = match api::server::start(
            &cli.api_sock,
            api::server::ApiLimits::new(cli.http_api_max_payload_size),
        ) {
            Ok(api) => api,
            Err(e) => return fail(exit_code::GENERIC_ERROR, e),
        };
        _socket = Some(SocketFile(cli.api_sock.clone()));
        metrics::metrics().api_server.process_startup_time_us.set(
            devices::legacy::start_time_now()
                .wall_us
                .saturating_sub(start_time.wall_us),
        );
        let (mut microvm, config) = match config {
            // With a config file the VM starts at once, and the API serves the running VM.
            Some(config) => match start(&config) {
                Ok(vm) => (vm, config),
                Err(code) => return code,
            },
            None => match serve_preboot(&inbox, &cli.id, &mmds, &opts) {
                Some(started) => started,
                None => {
                    return fail(
                        exit_code::GENERIC_ERROR,
                        "the API thread stopped before InstanceStart",
                    )
                }
            },
        };
        let api = RunningApi::new(inbox, config, cli.id.clone(), mmds.clone(), &microvm);
        microvm.add_subscriber(Arc::new(Mutex::new(api)));
        microvm
    };
    let mut microvm = microvm;
    match metrics::PeriodicFlush::new() {
        Ok(timer) => microvm.add_subscriber(Arc::new(Mutex::new(timer))),
        Err(e) => log::warn!("metrics will not be written periodically: {e}"),
    }
    let outcome = microvm.run();
    metrics::flush_if_configured();
    match outcome {
        // A guest that shuts the machine down ends the VM as a reset does (Firecracker's
        // exit code too); the log and `vcpu.exit_shutdown` tell the two apart.
        Ok(reason @ (VmExitReason::GuestReset | VmExitReason::GuestShutdown { .. })) => {
            log::info!("{reason}; exiting");
            ExitCode::from(exit_code::OK as u8)
        }
        Ok(
            reason
            @ (VmExitReason::Vcpu(_) | VmExitReason::GuestMemory(_) | VmExitReason::Error(_)),
        ) => fail(
            exit_code::GENERIC_ERROR,
            format!("the VM stopped: {reason}"),
        ),
        Err(e) => fail(exit_code::GENERIC_ERROR, e),
    }
}

/// Removes the API socket when the process ends normally.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
