//! reapd: deploys functions as reapvm snapshots and serves invocations on warm or
//! cold-started instances (docs/orchestrator.md).

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::{TcpListener, UnixListener};

use orchestrator::api;
use orchestrator::daemon::{Daemon, Limits, Paths};

#[derive(Parser, Debug)]
#[command(
    name = "reapd",
    version,
    about = "A serverless orchestrator on reapvm, with REAP cold starts"
)]
struct Args {
    /// The API's Unix socket.
    #[arg(long, default_value = "/run/reapd.sock")]
    socket: PathBuf,
    /// Also serve the API on this loopback TCP address (127.0.0.1:PORT or [::1]:PORT).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where the database, snapshots and instance files live.
    #[arg(long, default_value = "/var/lib/reapd")]
    state_dir: PathBuf,
    /// The reapvm binary [default: reapvm beside reapd].
    #[arg(long)]
    reapvm: Option<PathBuf>,
    /// The guest kernel [default: the one scripts/build-guest.sh built].
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// The guest's root filesystem with the functions [default: the suite's, else the core
    /// one, as scripts/build-guest.sh built them].
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// Requests that may wait for an instance, per function (more: 429).
    #[arg(long, default_value_t = 64)]
    queue_depth: usize,
    /// Seconds a booting guest may take to become ready.
    #[arg(long, default_value_t = 300)]
    boot_timeout_s: u64,
    /// Seconds a restored guest may take to accept a connection.
    #[arg(long, default_value_t = 120)]
    connect_timeout_s: u64,
    /// error, warn, info or debug.
    #[arg(long, default_value = "info")]
    log_level: log::LevelFilter,
}

struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }
    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            eprintln!("reapd: {}: {}", record.level(), record.args());
        }
    }
    fn flush(&self) {}
}

/// `KEY=VALUE` lines of the guest build's record (target/guest/guest.env).
fn guest_env() -> Vec<(String, String)> {
    let Ok(exe) = std::env::current_exe() else {
        return Vec::new();
    };
    // reapd lives in target/{debug,release}/; the guest build writes target/guest/.
    let Some(target) = exe.parent().and_then(Path::parent) else {
        return Vec::new();
    };
    std::fs::read_to_string(target.join("guest/guest.env"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn default_paths(args: &Args) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let env = guest_env();
    let value = |key: &str| {
        env.iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| PathBuf::from(v))
    };
    let reapvm = match &args.reapvm {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find reapd's own path: {e}"))?
            .with_file_name("reapvm"),
    };
    let kernel = match &args.kernel {
        Some(p) => p.clone(),
        None => value("REAPVM_KERNEL_DIR")
            .map(|d| d.join("vmlinux"))
            .ok_or("no --kernel, and no built guest kernel (run scripts/build-guest.sh)")?,
    };
    let rootfs = match &args.rootfs {
        Some(p) => p.clone(),
        None => value("REAPVM_SUITE_ROOTFS")
            .filter(|p| p.is_file())
            .or_else(|| value("REAPVM_ROOTFS"))
            .ok_or("no --rootfs, and no built guest rootfs (run scripts/build-guest.sh)")?,
    };
    Ok((reapvm, kernel, rootfs))
}

/// Refuses a socket a live reapd listens on (before touching the state dir).
fn check_socket_free(path: &Path) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(format!("another reapd listens on {}", path.display()));
    }
    Ok(())
}

/// Binds the API socket; a socket file left by a dead reapd is replaced.
fn bind_socket(path: &Path) -> Result<UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!(
                "{} exists and is not a socket: not replacing it",
                path.display()
            ));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot remove the stale socket {}: {e}", path.display()))?;
    }
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    UnixListener::bind(path).map_err(|e| format!("cannot bind {}: {e}", path.display()))
}

async fn run(args: Args) -> Result<(), String> {
    // Before anything is made: a SIGTERM from now on ends reapd through its clean-up.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    let (reapvm, kernel, rootfs) = default_paths(&args)?;
    if let Some(addr) = args.listen {
        if !addr.ip().is_loopback() {
            return Err(format!(
                "--listen {addr}: only loopback addresses (the API has no authentication)"
            ));
        }
    }
    check_socket_free(&args.socket)?;
    let tcp = match args.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    let paths = Paths {
        reapvm,
        kernel,
        rootfs,
        state_dir: args.state_dir.clone(),
    };
    log::info!(
        "state in {}, reapvm {}, kernel {}, rootfs {}",
        paths.state_dir.display(),
        paths.reapvm.display(),
        paths.kernel.display(),
        paths.rootfs.display()
    );
    let limits = Limits {
        queue_depth: args.queue_depth,
        boot_timeout: Duration::from_secs(args.boot_timeout_s),
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
    };
    // The state first (it stops what a killed reapd left), then the socket: a client that
    // can connect finds reapd ready.
    let daemon = Daemon::open(paths, limits)
        .await
        .map_err(|e| e.to_string())?;
    let listener = bind_socket(&args.socket)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Stopped by the watch, never aborted: an abort in the middle of stopping an instance
    // would leave its namespace.
    let keep_alive = {
        let daemon = Arc::downgrade(&daemon);
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let Some(daemon) = daemon.upgrade() else {
                    return;
                };
                daemon.stop_expired().await;
            }
        })
    };
    let app = api::router(daemon.clone());
    let shutdown = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let unix_server = tokio::spawn(
        axum::serve(listener, app.clone())
            .with_graceful_shutdown(shutdown(stop_rx.clone()))
            .into_future(),
    );
    let tcp_server = tcp.map(|l| {
        tokio::spawn(
            axum::serve(l, app)
                .with_graceful_shutdown(shutdown(stop_rx.clone()))
                .into_future(),
        )
    });
    log::info!(
        "serving on {}{}",
        args.socket.display(),
        args.listen.map(|a| format!(" and {a}")).unwrap_or_default()
    );

    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM: stopping every instance"),
        _ = int.recv() => log::info!("SIGINT: stopping every instance"),
    }
    let _ = stop_tx.send(true);
    let _ = keep_alive.await;
    let stopped = daemon.stop_all().await;
    log::info!("stopped {stopped} instances");
    // Connections still open (an invocation waiting on a stopped instance) end with it.
    let _ = tokio::time::timeout(Duration::from_secs(5), unix_server).await;
    if let Some(t) = tcp_server {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    log::set_max_level(args.log_level);
    let _ = log::set_logger(&StderrLogger);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("reapd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("reapd: {e}");
            ExitCode::FAILURE
        }
    }
}
