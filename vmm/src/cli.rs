//! The `reapvm` command line: Firecracker's flags (and the jailer's start-time flags).

use std::path::PathBuf;

use clap::Parser;

/// Exit codes, as Firecracker's (`FcExitCode`).
pub mod exit_code {
    pub const OK: i32 = 0;
    pub const GENERIC_ERROR: i32 = 1;
    pub const BAD_CONFIGURATION: i32 = 152;
    pub const ARG_PARSING: i32 = 153;
}

#[derive(Debug, Parser)]
#[command(
    name = "reapvm",
    version,
    about = "A microVM monitor with REAP snapshot restores; speaks Firecracker's flags, config file and API."
)]
pub struct Cli {
    /// Path of the API server's Unix socket.
    #[arg(long, value_name = "PATH", default_value = "/run/firecracker.socket")]
    pub api_sock: PathBuf,
    /// Start the microVM from this Firecracker configuration file.
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,
    /// Run without the API server (needs --config-file).
    #[arg(long)]
    pub no_api: bool,
    /// MicroVM identifier, used in log lines.
    #[arg(long, default_value = "anonymous-instance")]
    pub id: String,
    /// Log the guest's boot time when it signals boot completion (port 0x3f0, value 123).
    #[arg(long)]
    pub boot_timer: bool,
    /// Write the log to this file or named pipe instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_path: Option<PathBuf>,
    /// Log level: Off, Error, Warning, Info, Debug, Trace.
    #[arg(long, default_value = "Info")]
    pub level: String,
    /// Show the level in log lines.
    #[arg(long)]
    pub show_level: bool,
    /// Show the source file and line in log lines.
    #[arg(long)]
    pub show_log_origin: bool,
    /// Write only the log records of modules whose path starts with this (e.g.
    /// `vmm::api`).
    #[arg(long, value_name = "MODULE")]
    pub module: Option<String>,
    /// Where to write metrics.
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
    /// Process start time in CLOCK_MONOTONIC microseconds (set by the jailer).
    #[arg(long, value_name = "US")]
    pub start_time_us: Option<u64>,
    /// Process start CPU time in microseconds (set by the jailer).
    #[arg(long, value_name = "US")]
    pub start_time_cpu_us: Option<u64>,
    /// CPU time the jailer spent before exec, in microseconds.
    #[arg(long, value_name = "US")]
    pub parent_cpu_time_us: Option<u64>,
    /// Seccomp filters in seccompiler's JSON format, one per kind of thread (vmm, api, vcpu,
    /// uffd), instead of the built-in ones (docs/security.md).
    #[arg(long, value_name = "PATH", conflicts_with = "no_seccomp")]
    pub seccomp_filter: Option<PathBuf>,
    /// Install no seccomp filters.
    #[arg(long)]
    pub no_seccomp: bool,
    /// Largest API request body, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = 51200)]
    pub http_api_max_payload_size: usize,
    /// Largest MMDS data store, in bytes (default: --http-api-max-payload-size).
    #[arg(long, value_name = "BYTES")]
    pub mmds_size_limit: Option<usize>,
    /// Put this JSON file's contents in the MMDS data store at start.
    #[arg(long, value_name = "PATH")]
    pub metadata: Option<PathBuf>,
    /// Print the format version of a snapshot's vmstate file (after checking it whole) and
    /// exit, as Firecracker's flag of that name.
    #[arg(long, value_name = "PATH")]
    pub describe_snapshot: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_style_flags_parse() {
        let cli = Cli::try_parse_from([
            "reapvm",
            "--no-api",
            "--config-file",
            "/tmp/vm.json",
            "--boot-timer",
            "--id",
            "fn-1",
            "--level",
            "Debug",
            "--start-time-us",
            "123",
            "--module",
            "vmm::api",
        ])
        .unwrap();
        assert!(cli.no_api && cli.boot_timer);
        assert_eq!(cli.module.as_deref(), Some("vmm::api"));
        assert_eq!(cli.config_file.unwrap(), PathBuf::from("/tmp/vm.json"));
        assert_eq!((cli.id.as_str(), cli.start_time_us), ("fn-1", Some(123)));
        assert_eq!(cli.api_sock, PathBuf::from("/run/firecracker.socket"));
    }

    #[test]
    fn unknown_flags_fail() {
        assert!(Cli::try_parse_from(["reapvm", "--bogus"]).is_err());
    }
}
