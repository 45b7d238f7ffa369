//! `reapvm`: starts one microVM, as `firecracker` does.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vmm::api::controller::{handle_preboot, RunningApi};
use vmm::api::request::LoadSnapshotParams;
use vmm::api::server::{ApiInbox, ApiResponse};
use vmm::api::{Action, ApiRequest};
use vmm::builder::{
    build_and_start, restore_from_snapshot, BuildError, MemoryBackend, RestoreParams, StartOptions,
};
use vmm::cli::{exit_code, Cli};
use vmm::config::VmConfig;
use vmm::persist::read_vmstate;
use vmm::reap::ReapOptions;
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
    let opts = || StartOptions {
        console_out: Box::new(std::io::stdout()),
        console_in: true,
        boot_timer: cli.boot_timer,
        start_time,
        ready: None,
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
        let (inbox, _api_thread) =
            match api::server::start(&cli.api_sock, cli.http_api_max_payload_size) {
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
            None => match configure_through_api(&inbox, &cli.id, &opts) {
                Some(started) => started,
                None => {
                    return fail(
                        exit_code::GENERIC_ERROR,
                        "the API thread stopped before InstanceStart",
                    )
                }
            },
        };
        let api = RunningApi::new(inbox, config, cli.id.clone(), &microvm);
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

/// Removes the API socket when the process ends normally.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves pre-boot API requests until an InstanceStart succeeds; None if the API thread died.
fn configure_through_api(
    inbox: &ApiInbox,
    id: &str,
    opts: &dyn Fn() -> StartOptions,
) -> Option<(MicroVm, VmConfig)> {
    let mut config = VmConfig::default();
    loop {
        let message = inbox.requests.recv().ok()?;
        let _ = inbox.wake.read();
        if let ApiRequest::LoadSnapshot(params) = &message.request {
            match load_snapshot(params, opts()) {
                Ok((vm, loaded_config)) => {
                    let _ = message.reply.send(ApiResponse::no_content());
                    return Some((vm, loaded_config));
                }
                Err(fault) => {
                    log::error!("LoadSnapshot failed: {fault}");
                    let _ = message.reply.send(ApiResponse::fault(fault));
                }
            }
        } else if message.request == ApiRequest::Action(Action::InstanceStart) {
            // A failed start leaves the VMM waiting for a corrected configuration.
            match build_and_start(&config, opts()) {
                Ok(vm) => {
                    let _ = message.reply.send(ApiResponse::no_content());
                    return Some((vm, config));
                }
                Err(e) => {
                    log::error!("InstanceStart failed: {e}");
                    let _ = message.reply.send(ApiResponse::fault(e));
                }
            }
        } else {
            let response = handle_preboot(&mut config, id, message.request);
            let _ = message.reply.send(response);
        }
    }
}

/// `PUT /snapshot/load`: reads and checks the vmstate, then builds the VM from it.
fn load_snapshot(
    params: &LoadSnapshotParams,
    opts: StartOptions,
) -> Result<(MicroVm, VmConfig), String> {
    let backend = match (&params.mem_backend, &params.mem_file_path) {
        (Some(b), None) => match b.backend_type.as_str() {
            "File" => MemoryBackend::File(b.backend_path.clone()),
            "OnDemand" => MemoryBackend::OnDemand(b.backend_path.clone()),
            "Uffd" => MemoryBackend::Uffd(b.backend_path.clone()),
            "Reap" => {
                let options = b.reap_options.unwrap_or_default();
                if options.merge_misses && options.chunked_install {
                    return Err(
                        "reap_options: merge_misses does not work with chunked_install".into(),
                    );
                }
                if options.rerecord_threshold.is_some() && !options.merge_misses {
                    return Err("reap_options: rerecord_threshold needs merge_misses".into());
                }
                MemoryBackend::Reap {
                    mem_path: b.backend_path.clone(),
                    ws_path: b.ws_path.clone().unwrap_or_else(|| {
                        let mut p = b.backend_path.clone().into_os_string();
                        p.push(".ws");
                        p.into()
                    }),
                    options: ReapOptions {
                        o_direct: options.o_direct,
                        fetch_in_parallel: options.fetch_in_parallel,
                        chunked_install: options.chunked_install,
                        merge_misses: options.merge_misses,
                        rerecord_threshold: options.rerecord_threshold,
                    },
                }
            }
            other => {
                return Err(format!(
                    "memory backend {other:?} is not supported (File, Uffd, OnDemand, Reap)"
                ))
            }
        },
        (None, Some(path)) => MemoryBackend::File(path.clone()),
        (Some(_), Some(_)) => return Err("give mem_backend or mem_file_path, not both".into()),
        (None, None) => return Err("mem_backend (or mem_file_path) is missing".into()),
    };
    if params
        .mem_backend
        .as_ref()
        .is_some_and(|b| b.backend_type != "Reap")
        && params
            .mem_backend
            .as_ref()
            .is_some_and(|b| b.ws_path.is_some() || b.reap_options.is_some())
    {
        return Err("ws_path and reap_options belong to the Reap backend".into());
    }
    let started = Instant::now();
    // Beyond the paper: the WS file is read while the vmstate, KVM and devices are restored.
    let ws_prefetch = match &backend {
        MemoryBackend::Reap {
            ws_path, options, ..
        } if options.fetch_in_parallel => {
            let (path, direct) = (ws_path.clone(), options.o_direct);
            Some(
                std::thread::Builder::new()
                    .name("fc_ws_fetch".into())
                    .spawn(move || vmm::reap::fetch(&path, direct))
                    .map_err(|e| format!("cannot start the WS reader: {e}"))?,
            )
        }
        _ => None,
    };
    let (state, vmstate_checksum) =
        read_vmstate(&params.snapshot_path).map_err(|e| e.to_string())?;
    let restore = RestoreParams {
        backend,
        network_overrides: params
            .network_overrides
            .iter()
            .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
            .collect(),
        resume: params.resume_vm,
        track_dirty_pages: params.enable_diff_snapshots || params.track_dirty_pages,
        vmstate_load: started.elapsed(),
        vmstate_checksum,
        ws_prefetch,
    };
    let track_dirty_pages = restore.track_dirty_pages;
    let vmstate_load = restore.vmstate_load;
    let vm = restore_from_snapshot(&state, restore, opts).map_err(|e| e.to_string())?;
    metrics::metrics()
        .latencies_us
        .load_snapshot
        .set_elapsed_us(started);
    log::info!(
        "snapshot loaded in {} us (vmstate read and checked in {} us)",
        started.elapsed().as_micros(),
        vmstate_load.as_micros()
    );
    let mut config = state.config;
    config.machine_config.track_dirty_pages = track_dirty_pages;
    Ok((vm, config))
}
