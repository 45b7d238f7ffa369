//! `reapvm`: starts one microVM, as `firecracker` does.

use std::process::ExitCode;

use clap::Parser;
use vmm::builder::{build_and_start, BuildError, StartOptions};
use vmm::cli::{exit_code, Cli};
use vmm::config::VmConfig;
use vmm::{logger, VmExitReason};

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
    if let Err(e) = logger::init(&cli.id, level, log_path.as_deref(), show_level, show_origin) {
        return fail(exit_code::ARG_PARSING, e);
    }
    if cli.seccomp_filter.is_some() {
        log::warn!("--seccomp-filter given, but reapvm does not install seccomp filters yet");
    }
    if cli.metrics_path.is_some() {
        log::warn!("--metrics-path given, but reapvm writes no metrics yet");
    }

    if !cli.no_api {
        return fail(
            exit_code::GENERIC_ERROR,
            "the API server is not available yet: start with --no-api --config-file FILE",
        );
    }
    let Some(config) = config else {
        return fail(exit_code::ARG_PARSING, "--no-api needs --config-file");
    };

    let start_time = match cli.start_time_us {
        Some(wall_us) => devices::legacy::StartTime {
            wall_us,
            cpu_us: cli.start_time_cpu_us.unwrap_or(start_time.cpu_us),
        },
        None => start_time,
    };
    let opts = StartOptions {
        console_out: Box::new(std::io::stdout()),
        console_in: true,
        boot_timer: cli.boot_timer,
        start_time,
        ready: None,
    };
    let microvm = match build_and_start(&config, opts) {
        Ok(vm) => vm,
        Err(e @ BuildError::Config(_)) => return fail(exit_code::BAD_CONFIGURATION, e),
        Err(e) => return fail(exit_code::GENERIC_ERROR, e),
    };
    match microvm.run() {
        Ok(VmExitReason::GuestReset) => {
            log::info!("the guest reset; exiting");
            ExitCode::from(exit_code::OK as u8)
        }
        Ok(VmExitReason::Error(e)) => {
            fail(exit_code::GENERIC_ERROR, format!("the VM stopped: {e}"))
        }
        Err(e) => fail(exit_code::GENERIC_ERROR, e),
    }
}
