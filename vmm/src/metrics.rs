//! Firecracker-style metrics: one JSON object per line, appended to the file or FIFO named
//! by `--metrics-path` or `PUT /metrics`, on `FlushMetrics`, every minute, and at exit.
//! Counters report what happened since the previous line (as Firecracker's do); stored
//! values (latencies, the memory restore report) report their latest value.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::ser::{SerializeStruct, Serializer};
use serde::Serialize;

/// How often metrics are written without being asked, as Firecracker does.
pub const PERIODIC_FLUSH_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics are already being written to {0}; they cannot be redirected")]
    AlreadyConfigured(PathBuf),
    #[error("cannot open the metrics file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no metrics file configured (PUT /metrics or --metrics-path first)")]
    NotConfigured,
    #[error("cannot write metrics to {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A counter reported as its increase since the last flush.
#[derive(Debug, Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

impl Serialize for Counter {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let total = self.total.load(Ordering::Relaxed);
        let before = self.flushed.swap(total, Ordering::Relaxed);
        s.serialize_u64(total.saturating_sub(before))
    }
}

/// A value reported as last stored.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Stores the microseconds elapsed since `since`.
    pub fn set_elapsed_us(&self, since: Instant) {
        self.set(since.elapsed().as_micros() as u64);
    }
}

impl Serialize for Gauge {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

#[derive(Debug, Default, Serialize)]
pub struct ApiServerMetrics {
    /// Microseconds from process start to the API socket listening.
    pub process_startup_time_us: Gauge,
    pub requests: Counter,
    pub faults: Counter,
}

#[derive(Debug, Default, Serialize)]
pub struct LatencyMetrics {
    pub full_create_snapshot: Gauge,
    pub diff_create_snapshot: Gauge,
    /// From the PUT /snapshot/load request to a VM restored (and resumed when asked).
    pub load_snapshot: Gauge,
    pub pause_vm: Gauge,
    pub resume_vm: Gauge,
}

#[derive(Debug, Default, Serialize)]
pub struct VcpuMetrics {
    pub exit_io_in: Counter,
    pub exit_io_out: Counter,
    pub exit_mmio_read: Counter,
    pub exit_mmio_write: Counter,
    /// KVM_EXIT_SHUTDOWN (or HLT): the guest shut the machine down, as a triple fault does.
    pub exit_shutdown: Counter,
    pub failures: Counter,
}

/// What a snapshot restore's memory backend did, for comparing backends.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MemoryRestoreReport {
    pub backend: String,
    /// record, prefetch, on-demand or file.
    pub mode: String,
    pub vmstate_load_us: u64,
    pub ws_fetch_us: u64,
    pub ws_install_us: u64,
    pub pages_prefetched: u64,
    pub bytes_read: u64,
    pub faults_on_demand: u64,
    /// Why a REAP restore did not use the WS file it found (it records a new one instead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_error: Option<String>,
    /// Pages recorded into the WS so far (REAP record mode).
    pub ws_pages_recorded: u64,
    /// Chunked REAP install: faults answered from the WS before the installer reached them.
    pub faults_from_ws: u64,
    /// From the restored VM starting to the agent's first answered invocation (0 before).
    pub first_response_us: u64,
    /// The process's minor page faults since the restore: for `File`, the faults the host
    /// kernel served from the page cache (a hot memory file has no major faults).
    pub minor_faults: u64,
}

/// Where a restore's live fault counts come from.
pub trait FaultSource: Send + Sync {
    /// (faults served on demand, bytes read from the memory file) since the restore.
    fn faults_and_bytes(&self) -> (u64, u64);

    /// Pages recorded into a working set so far (REAP record mode only).
    fn recorded_pages(&self) -> u64 {
        0
    }

    /// A chunked or streamed REAP install as it progresses.
    fn prefetch_progress(&self) -> Option<PrefetchProgress> {
        None
    }
}

/// How far a REAP install that goes on while the guest runs has got.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrefetchProgress {
    /// Pages installed, by the installer or for a fault.
    pub pages: u64,
    /// The install's time once it is done (0 before).
    pub install_us: u64,
    /// Of `pages`, those installed for a fault.
    pub from_ws: u64,
    /// The WS read's time once every chunk is read (0 before).
    pub fetch_us: u64,
    /// Bytes of the WS file read so far.
    pub ws_bytes_read: u64,
    /// Why the reading stopped early (the rest is served from the memory file).
    pub error: Option<String>,
}

/// A restore's report and where its fault counts are read live.
type LiveReport = (MemoryRestoreReport, Option<Arc<dyn FaultSource>>);

/// The memory restore report, with its live fault counts read at each flush.
#[derive(Default)]
pub struct MemoryRestoreMetrics {
    inner: Mutex<Option<LiveReport>>,
    minor_faults_at_restore: AtomicU64,
    restored_at: Mutex<Option<Instant>>,
    first_response_us: AtomicU64,
}

impl MemoryRestoreMetrics {
    pub fn set(&self, report: MemoryRestoreReport, live: Option<Arc<dyn FaultSource>>) {
        self.minor_faults_at_restore
            .store(process_faults().minor, Ordering::Relaxed);
        *self.restored_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.first_response_us.store(0, Ordering::Relaxed);
        *self.inner.lock().unwrap_or_else(|p| p.into_inner()) = Some((report, live));
    }

    /// The guest answered an invocation: the first one after the restore sets
    /// `first_response_us`.
    pub fn invocation_answered(&self) {
        let Some(at) = *self.restored_at.lock().unwrap_or_else(|p| p.into_inner()) else {
            return;
        };
        let us = at.elapsed().as_micros().max(1) as u64;
        let first = self
            .first_response_us
            .compare_exchange(0, us, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if let (true, Some(r)) = (first, self.current()) {
            log::info!(
                "restore ({} {}): first invocation answered {us} us after the restore; {} faults served on demand, {} pages prefetched, vmstate {} us, WS fetch {} us, WS install {} us",
                r.backend,
                r.mode,
                r.faults_on_demand,
                r.pages_prefetched,
                r.vmstate_load_us,
                r.ws_fetch_us,
                r.ws_install_us
            );
        }
    }

    /// The report with the fault counts as of now; None before any restore.
    pub fn current(&self) -> Option<MemoryRestoreReport> {
        let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (report, live) = guard.as_ref()?;
        let mut report = report.clone();
        report.first_response_us = self.first_response_us.load(Ordering::Relaxed);
        report.minor_faults = process_faults()
            .minor
            .saturating_sub(self.minor_faults_at_restore.load(Ordering::Relaxed));
        if let Some(live) = live {
            let (faults, bytes) = live.faults_and_bytes();
            report.faults_on_demand = faults;
            report.bytes_read += bytes;
            report.ws_pages_recorded = live.recorded_pages();
            if let Some(p) = live.prefetch_progress() {
                report.pages_prefetched = p.pages;
                report.ws_install_us = p.install_us;
                report.faults_from_ws = p.from_ws;
                if p.fetch_us != 0 {
                    report.ws_fetch_us = p.fetch_us;
                }
                report.bytes_read = report.bytes_read.max(p.ws_bytes_read + bytes);
                if p.error.is_some() {
                    report.ws_error = p.error;
                }
            }
        }
        Some(report)
    }
}

impl std::fmt::Debug for MemoryRestoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MemoryRestoreMetrics")
            .field(&self.current())
            .finish()
    }
}

impl Serialize for MemoryRestoreMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.current().serialize(s)
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub api_server: ApiServerMetrics,
    pub latencies_us: LatencyMetrics,
    pub vcpu: VcpuMetrics,
    pub memory_restore: MemoryRestoreMetrics,
    pub replay: ReplayMetrics,
    pub agent: AgentMetrics,
    pub mmds: MmdsMetrics,
}

/// A device the metrics read from when they are written (set once the device exists).
pub struct DeviceSlot<T>(Mutex<Option<T>>);

impl<T> Default for DeviceSlot<T> {
    fn default() -> Self {
        Self(Mutex::new(None))
    }
}

impl<T> std::fmt::Debug for DeviceSlot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSlot")
    }
}

impl<T> DeviceSlot<T> {
    pub fn set(&self, device: T) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(device);
    }

    fn read<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
        f(self.0.lock().unwrap_or_else(|p| p.into_inner()).as_ref())
    }
}

/// What the guest's agent signalled through the console.
pub type AgentMetrics = DeviceSlot<devices::legacy::InvocationSignal>;

impl Serialize for AgentMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let seen = self.read(|signal| signal.map_or(0, |signal| signal.seen()));
        let mut st = s.serialize_struct("AgentMetrics", 1)?;
        // A total since the VMM started, not a delta: a snapshot waits for it to reach the
        // number of invocations answered.
        st.serialize_field("invocations_signalled", &seen)?;
        st.end()
    }
}

/// What MMDS saw: frames, connections and the guests' requests, totals since the VMM
/// started (not deltas: they live in the data store, beside what they count).
pub type MmdsMetrics = DeviceSlot<crate::api::controller::SharedMmds>;

impl Serialize for MmdsMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let counts = self.read(|store| {
            store.map(|store| store.lock().unwrap_or_else(|p| p.into_inner()).counts())
        });
        counts.unwrap_or_default().serialize(s)
    }
}

/// What the replay guest reported (docs/replay.md): ready, done, its checksum, an error.
pub type ReplayMetrics = DeviceSlot<devices::legacy::ReplayReport>;

impl Serialize for ReplayMetrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let status = self.read(|r| r.map(|r| r.status()).unwrap_or_default());
        let mut st = s.serialize_struct("ReplayMetrics", 4)?;
        st.serialize_field("ready", &status.ready)?;
        st.serialize_field("done", &status.done)?;
        st.serialize_field("checksum", &status.checksum)?;
        st.serialize_field("error", &status.error.unwrap_or_default())?;
        st.end()
    }
}

impl Serialize for Metrics {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut st = s.serialize_struct("Metrics", 8)?;
        st.serialize_field("utc_timestamp_ms", &now_ms)?;
        st.serialize_field("api_server", &self.api_server)?;
        st.serialize_field("latencies_us", &self.latencies_us)?;
        st.serialize_field("vcpu", &self.vcpu)?;
        st.serialize_field("memory_restore", &self.memory_restore)?;
        st.serialize_field("replay", &self.replay)?;
        st.serialize_field("agent", &self.agent)?;
        st.serialize_field("mmds", &self.mmds)?;
        st.end()
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

struct Sink {
    path: PathBuf,
    file: File,
}

fn sink() -> &'static Mutex<Option<Sink>> {
    static SINK: Mutex<Option<Sink>> = Mutex::new(None);
    &SINK
}

/// Starts writing metrics to `path` (a file, appended to, or a FIFO). Once only, as in
/// Firecracker.
pub fn init(path: &Path) -> Result<(), MetricsError> {
    let mut sink = sink().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(current) = sink.as_ref() {
        return Err(MetricsError::AlreadyConfigured(current.path.clone()));
    }
    let file = std::fs::OpenOptions::new()
        // Read too: a FIFO opened for writing alone fails (ENXIO) while nobody reads it.
        .read(true)
        .append(true)
        .create(true)
        // A FIFO whose reader is slow must not block the VMM.
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| MetricsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    *sink = Some(Sink {
        path: path.to_path_buf(),
        file,
    });
    Ok(())
}

pub fn is_configured() -> bool {
    sink().lock().unwrap_or_else(|p| p.into_inner()).is_some()
}

/// Appends one line with the current metrics.
pub fn flush() -> Result<(), MetricsError> {
    let mut sink = sink().lock().unwrap_or_else(|p| p.into_inner());
    let Some(sink) = sink.as_mut() else {
        return Err(MetricsError::NotConfigured);
    };
    let mut line = serde_json::to_vec(metrics()).expect("metrics always encode");
    line.push(b'\n');
    // One write: a line shorter than PIPE_BUF reaches a FIFO whole or not at all (a full
    // pipe drops it rather than leaving half a line).
    match sink.file.write(&line) {
        Ok(n) if n == line.len() => Ok(()),
        Ok(n) => Err(MetricsError::Write {
            path: sink.path.clone(),
            source: std::io::Error::other(format!("only {n} of {} bytes written", line.len())),
        }),
        Err(source) => Err(MetricsError::Write {
            path: sink.path.clone(),
            source,
        }),
    }
}

/// Flushes when a metrics file is configured, logging (not failing) a write error: for the
/// periodic and the final flush.
pub fn flush_if_configured() {
    if is_configured() {
        if let Err(e) = flush() {
            log::warn!("{e}");
        }
    }
}

/// Writes metrics every `PERIODIC_FLUSH_SECS` from the event loop.
pub struct PeriodicFlush {
    timer: vmm_sys_util::timerfd::TimerFd,
}

impl PeriodicFlush {
    pub fn new() -> std::io::Result<Self> {
        let mut timer = vmm_sys_util::timerfd::TimerFd::new()?;
        let every = std::time::Duration::from_secs(PERIODIC_FLUSH_SECS);
        timer.reset(every, Some(every))?;
        Ok(Self { timer })
    }
}

impl event_manager::MutEventSubscriber for PeriodicFlush {
    fn init(&mut self, ops: &mut event_manager::EventOps) {
        if let Err(e) = ops.add(event_manager::Events::new(
            &self.timer,
            event_manager::EventSet::IN,
        )) {
            log::warn!("metrics will not be written periodically: {e}");
        }
    }

    fn process(&mut self, _events: event_manager::Events, _ops: &mut event_manager::EventOps) {
        let _ = self.timer.wait();
        flush_if_configured();
    }
}

/// Page faults of this whole process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFaults {
    /// Served with I/O (for `File`: pages read from the memory file on disk).
    pub major: u64,
    /// Served without I/O (from the page cache, zero pages, userfaultfd-resolved pages).
    pub minor: u64,
}

pub fn process_faults() -> ProcessFaults {
    // SAFETY: rusage is plain data; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, writable rusage pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return ProcessFaults::default();
    }
    ProcessFaults {
        major: usage.ru_majflt as u64,
        minor: usage.ru_minflt as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_report_increments_since_the_last_flush() {
        let c = Counter::default();
        c.add(5);
        assert_eq!(serde_json::to_value(&c).unwrap(), 5);
        assert_eq!(serde_json::to_value(&c).unwrap(), 0);
        c.inc();
        assert_eq!(serde_json::to_value(&c).unwrap(), 1);
        assert_eq!(c.total(), 6);
    }

    struct Fixed;
    impl FaultSource for Fixed {
        fn faults_and_bytes(&self) -> (u64, u64) {
            (7, 7 * 4096)
        }
    }

    #[test]
    fn memory_restore_report_reads_live_counts() {
        let m = MemoryRestoreMetrics::default();
        assert_eq!(serde_json::to_value(&m).unwrap(), serde_json::Value::Null);
        m.set(
            MemoryRestoreReport {
                backend: "OnDemand".into(),
                mode: "on-demand".into(),
                bytes_read: 100,
                ..Default::default()
            },
            Some(Arc::new(Fixed)),
        );
        let v = serde_json::to_value(&m).unwrap();
        assert_eq!(v["faults_on_demand"], 7);
        assert_eq!(v["bytes_read"], 100 + 7 * 4096);
        assert_eq!(v["mode"], "on-demand");
    }

    #[test]
    fn writes_one_json_line_per_flush_and_refuses_a_second_path() {
        let dir = std::env::temp_dir().join(format!("reapvm-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.json");
        assert!(matches!(flush(), Err(MetricsError::NotConfigured)));
        init(&path).unwrap();
        metrics().latencies_us.load_snapshot.set(1234);
        flush().unwrap();
        flush().unwrap();
        assert!(matches!(
            init(&dir.join("other")),
            Err(MetricsError::AlreadyConfigured(_))
        ));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1]["latencies_us"]["load_snapshot"], 1234);
        assert!(lines[0]["utc_timestamp_ms"].as_u64().unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
