//! reapd's work: deploying functions (boot, warm up, snapshot), invoking them on warm
//! instances or cold-started ones, stopping idle instances, and cleaning up after itself
//! and after a reapd that died.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;
use serde::Serialize;

use crate::agent::{self, AgentError};
use crate::breakdown::Breakdown;
use crate::db::{Db, DbError, Function, InstanceRow, Invocation};
use crate::metrics::{FunctionLabels, Metrics, PhaseLabels, StartLabels};
use crate::netns::{self, NetNs, NetNsError};
use crate::pool::{Lease, Pool, PoolError};
use crate::spec::{ColdStart, DeploySpec, SpecError};
use crate::vmm::{boot_config, Vmm, VmmError};

/// Where reapd finds reapvm and the guest, and keeps its state.
#[derive(Debug, Clone)]
pub struct Paths {
    pub reapvm: PathBuf,
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Requests that may wait for an instance, per function.
    pub queue_depth: usize,
    /// How long a booting guest may take to answer (deploys and `boot` cold starts).
    pub boot_timeout: Duration,
    /// How long a restored guest may take to accept a connection.
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("no function named {0:?} is deployed")]
    NotFound(String),
    #[error("a function named {0:?} is already deployed")]
    Exists(String),
    #[error("a deploy or removal of {0:?} is under way")]
    InProgress(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Busy(#[from] PoolError),
    #[error("{what} {path} does not exist")]
    MissingFile { what: &'static str, path: String },
    #[error("deploy of {name} failed: {reason}")]
    Deploy { name: String, reason: String },
    #[error("instance {instance} of {name}: {reason}")]
    Instance {
        name: String,
        instance: u64,
        reason: String,
    },
    /// The instance's reapvm ended under a cold start or an invocation (killed, or the
    /// guest shut down): the invocation is tried once more on a new instance.
    #[error("instance {instance} of {name}: its reapvm exited ({status}): {reason}")]
    InstanceDied {
        name: String,
        instance: u64,
        status: String,
        reason: String,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("reapd is stopping")]
    Stopping,
    #[error("{0}")]
    Internal(String),
    #[error("another reapd uses the state dir {0} (it holds reapd.lock there)")]
    Locked(String),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError {
    let path = path.display().to_string();
    move |source| DaemonError::Io { what, path, source }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// A running VM of a function.
pub struct Instance {
    pub id: u64,
    ns: NetNs,
    dir: PathBuf,
    vmm: Vmm,
    /// How it started: `record`, `prefetch`, `file`, `lazy` or `boot`.
    pub mode: &'static str,
    pub started_ms: u64,
    pub invocations: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    Idle,
    Busy,
}

/// A deployed function and its instances.
pub struct Deployed {
    pub function: Function,
    pool: Pool<Arc<Instance>>,
    /// Every live instance and whether it is serving; the instance leaves the map exactly
    /// once (`Daemon::retire`), which gives its pool slot back.
    instances: Mutex<HashMap<u64, (Arc<Instance>, InstanceState)>>,
}

impl Deployed {
    fn vmstate(&self) -> PathBuf {
        self.function.dir.join("vmstate")
    }
    fn memory(&self) -> PathBuf {
        self.function.dir.join("memory")
    }
    fn ws(&self) -> PathBuf {
        self.function.dir.join("memory.ws")
    }
    fn name(&self) -> &str {
        &self.function.spec.name
    }
}

/// What an invocation gave the caller.
#[derive(Debug)]
pub struct Outcome {
    pub status: u16,
    pub body: Bytes,
    pub instance: u64,
    pub cold: bool,
    pub mode: Option<&'static str>,
    pub latency: Duration,
    pub breakdown: Option<Breakdown>,
}

#[derive(Debug, Serialize)]
pub struct InstanceView {
    pub id: u64,
    pub state: InstanceState,
    pub pid: u32,
    pub started_as: &'static str,
    pub invocations: u64,
    pub netns: String,
}

#[derive(Debug, Serialize)]
pub struct FunctionView {
    #[serde(flatten)]
    pub spec: DeploySpec,
    pub snapshot_dir: PathBuf,
    pub deployed_at_ms: u64,
    pub vmstate_bytes: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub ws_bytes: Option<u64>,
    pub cold_starts: u64,
    pub warm_starts: u64,
    pub waiting: usize,
    pub instances: Vec<InstanceView>,
}

pub struct Daemon {
    paths: Paths,
    limits: Limits,
    db: Db,
    /// Network namespaces of this state dir's instances start with it, so that a later
    /// reapd finds those a crashed one left.
    netns_prefix: String,
    functions: Mutex<HashMap<String, Arc<Deployed>>>,
    /// Names being deployed or removed: nobody else may deploy or remove them meanwhile.
    deploying: Mutex<Vec<String>>,
    /// Set by `stop_all`: waiters then hear that reapd stops, not that their function is gone.
    stopping: std::sync::atomic::AtomicBool,
    /// Invocation attempts running (each its own task); `stop_all` waits for them.
    attempts: AtomicU64,
    attempts_done: tokio::sync::Notify,
    pub metrics: Metrics,
    /// Held while reapd runs: a second reapd on the same state dir would take the first's
    /// VMs for leftovers and stop them.
    _lock: std::fs::File,
}

/// How long `stop_all` waits for invocation attempts under way.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// Counts an invocation attempt while it runs.
/// Counted from before its task is spawned, so `stop_all` cannot look between the lease
/// and the task's first poll and miss it.
struct Attempt(Arc<Daemon>);

impl Attempt {
    fn begin(daemon: Arc<Daemon>) -> Self {
        daemon.attempts.fetch_add(1, Ordering::SeqCst);
        Self(daemon)
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.0.attempts.fetch_sub(1, Ordering::SeqCst);
        self.0.attempts_done.notify_waiters();
    }
}

/// Holds a name taken by `reserve` and gives it back when dropped, a panic included.
struct Reserved {
    daemon: Arc<Daemon>,
    name: String,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        self.daemon.unreserve(&self.name);
    }
}

/// FNV-1a: a stable short tag for the state dir (netns names must stay short).
fn tag(text: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in text.bytes() {
        h ^= b as u32;
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

impl Daemon {
    /// Opens the state, stops what a previous reapd left running and loads the deployed
    /// functions.
    pub async fn open(paths: Paths, limits: Limits) -> Result<Arc<Self>, DaemonError> {
        for dir in [
            &paths.state_dir,
            &paths.state_dir.join("functions"),
            &paths.state_dir.join("instances"),
        ] {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        }
        let lock = lock_state_dir(&paths.state_dir)?;
        let db = Db::open(&paths.state_dir.join("reapd.db"))?;
        let netns_prefix = format!("rd{}-", tag(&paths.state_dir.to_string_lossy()));
        let daemon = Arc::new(Self {
            paths,
            limits,
            db,
            netns_prefix,
            functions: Mutex::new(HashMap::new()),
            deploying: Mutex::new(Vec::new()),
            stopping: std::sync::atomic::AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            attempts_done: tokio::sync::Notify::new(),
            metrics: Metrics::new(),
            _lock: lock,
        });
        daemon.clean_up_leftovers().await?;
        let mut map = daemon.functions.lock().unwrap_or_else(|p| p.into_inner());
        for function in daemon.db.functions()? {
            let pool = Pool::new(function.spec.max_instances, daemon.limits.queue_depth);
            map.insert(
                function.spec.name.clone(),
                Arc::new(Deployed {
                    function,
                    pool,
                    instances: Mutex::new(HashMap::new()),
                }),
            );
        }
        drop(map);
        Ok(daemon)
    }

    /// VMs, namespaces and folders of instances a previous reapd did not stop (it was
    /// killed), and the folders of deploys it did not finish.
    async fn clean_up_leftovers(&self) -> Result<(), DaemonError> {
        for row in self.db.instances()? {
            if row.pid > 0 && process_is_instance(row.pid, &row.dir) {
                log::warn!(
                    "stopping reapvm {} of instance {} left by a previous reapd",
                    row.pid,
                    row.id
                );
                kill_and_wait(row.pid).await;
            }
            let _ = NetNs {
                name: row.netns.clone(),
            }
            .remove()
            .await;
            let _ = std::fs::remove_dir_all(&row.dir);
            self.db.remove_instance(row.id)?;
        }
        for name in netns::list().await.unwrap_or_default() {
            if name.starts_with(&self.netns_prefix) {
                log::warn!("removing network namespace {name} left by a previous reapd");
                let _ = NetNs { name }.remove().await;
            }
        }
        let deployed: Vec<String> = self
            .db
            .functions()?
            .into_iter()
            .map(|f| f.spec.name)
            .collect();
        for dir in [
            self.paths.state_dir.join("functions"),
            self.paths.state_dir.join("instances"),
        ] {
            let entries = std::fs::read_dir(&dir).map_err(io_err("read", &dir))?;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_instances = dir.ends_with("instances");
                if is_instances || !deployed.contains(&name) {
                    log::warn!(
                        "removing {} left by a previous reapd",
                        entry.path().display()
                    );
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> Result<Arc<Deployed>, DaemonError> {
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::NotFound(name.to_string()))
    }

    fn check_guest_files(&self) -> Result<(), DaemonError> {
        for (what, path) in [
            ("reapvm", &self.paths.reapvm),
            ("the guest kernel", &self.paths.kernel),
            ("the guest rootfs", &self.paths.rootfs),
        ] {
            if !path.is_file() {
                return Err(DaemonError::MissingFile {
                    what,
                    path: path.display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Boots the function, invokes it once, snapshots it (Full) and stops it; then it can
    /// be invoked. A failure leaves nothing behind.
    pub async fn deploy(
        self: &Arc<Self>,
        spec: DeploySpec,
        warm_up: Vec<u8>,
    ) -> Result<FunctionView, DaemonError> {
        spec.check()?;
        self.check_guest_files()?;
        let reserved = self.reserve(&spec.name)?;
        // Its own task: a client that hangs up does not stop a deploy half-way.
        let daemon = self.clone();
        tokio::spawn(async move {
            let result = daemon.deploy_unlisted(&spec, warm_up).await;
            if let Ok(function) = &result {
                let deployed = Arc::new(Deployed {
                    pool: Pool::new(spec.max_instances, daemon.limits.queue_depth),
                    function: function.clone(),
                    instances: Mutex::new(HashMap::new()),
                });
                daemon
                    .functions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(spec.name.clone(), deployed);
            }
            // Listed first, then let go: no moment where the name looks free.
            drop(reserved);
            result.and_then(|_| daemon.show(&spec.name))
        })
        .await
        .unwrap_or_else(|e| {
            Err(DaemonError::Internal(format!(
                "the deploy task failed: {e}"
            )))
        })
    }

    /// Takes `name` for a deploy: refused while it is deployed, or being deployed or
    /// removed.
    fn reserve(self: &Arc<Self>, name: &str) -> Result<Reserved, DaemonError> {
        let mut deploying = self.deploying.lock().unwrap_or_else(|p| p.into_inner());
        if deploying.iter().any(|n| n == name) {
            return Err(DaemonError::InProgress(name.to_string()));
        }
        if self.get(name).is_ok() {
            return Err(DaemonError::Exists(name.to_string()));
        }
        deploying.push(name.to_string());
        Ok(Reserved {
            daemon: self.clone(),
            name: name.to_string(),
        })
    }

    fn unreserve(&self, name: &str) {
        self.deploying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|n| n != name);
    }

    async fn deploy_unlisted(
        &self,
        spec: &DeploySpec,
        warm_up: Vec<u8>,
    ) -> Result<Function, DaemonError> {
        let dir = self.paths.state_dir.join("functions").join(&spec.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let fail = |reason: String| DaemonError::Deploy {
            name: spec.name.clone(),
            reason,
        };
        let made = async {
            let (row, ns) = self
                .new_instance_place(&spec.name)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let config = boot_config(
                &self.paths.kernel,
                &self.paths.rootfs,
                &spec.function,
                spec.vcpus,
                spec.mem_mib,
            );
            let result = async {
                let vmm = Vmm::spawn(&self.paths.reapvm, &row.dir, &ns, Some(&config))
                    .await
                    .map_err(|e| fail(e.to_string()))?;
                self.db.set_instance_pid(row.id, vmm.pid)?;
                vmm.wait_for_api().await.map_err(|e| fail(e.to_string()))?;
                let booted = self.warm_up(&vmm, &ns, spec, warm_up).await;
                let snapshot = match booted {
                    Ok(()) if spec.cold_start == ColdStart::Boot => Ok(()),
                    Ok(()) => async {
                        vmm.wait_for_invocation_signals(1, Duration::from_secs(60))
                            .await?;
                        vmm.pause().await?;
                        vmm.snapshot(&dir.join("vmstate"), &dir.join("memory"))
                            .await
                    }
                    .await
                    .map_err(|e| fail(format!("snapshot: {e}"))),
                    Err(e) => Err(e),
                };
                vmm.stop().await;
                snapshot
            }
            .await;
            self.remove_instance_place(&row, &ns).await;
            result
        }
        .await;
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let function = Function {
            spec: spec.clone(),
            dir: dir.clone(),
            deployed_at_ms: now_ms(),
        };
        if let Err(e) = self.db.insert_function(&function) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e.into());
        }
        Ok(function)
    }

    /// Waits for the booted guest's agent and invokes the function once.
    async fn warm_up(
        &self,
        vmm: &Vmm,
        ns: &NetNs,
        spec: &DeploySpec,
        data: Vec<u8>,
    ) -> Result<(), DaemonError> {
        let fail = |reason: String| DaemonError::Deploy {
            name: spec.name.clone(),
            reason,
        };
        // What became of the VM, for a failure after the boot.
        let vm_state = || async {
            let state = match vmm.exited_within(Duration::from_millis(500)).await {
                Some(status) => format!("reapvm exited ({status})"),
                None => "reapvm still ran".to_string(),
            };
            format!("{state}; its log ends:\n{}", vmm.log_tail(30))
        };
        let mut exit = vmm.exit_watch();
        let ready = tokio::select! {
            r = agent::wait_ready(ns, self.limits.boot_timeout) => r,
            _ = exit.wait_for(Option::is_some) => {
                let status = vmm.exit_status().unwrap_or_default();
                return Err(fail(vmm.exited_error(status, "while the guest booted").to_string()));
            }
        };
        if let Err(e) = ready {
            return Err(fail(format!("{e}; {}", vm_state().await)));
        }
        let answer = match agent::connect(ns, self.limits.connect_timeout).await {
            Ok((stream, _)) => agent::invoke(stream, &spec.function, data).await,
            Err(e) => Err(e),
        };
        let answer = match answer {
            Ok(a) => a,
            Err(e) => {
                return Err(fail(format!(
                    "warm-up invocation: {e}; {}",
                    vm_state().await
                )))
            }
        };
        if answer.status != 200 {
            return Err(fail(format!(
                "the warm-up invocation of {} answered {}: {}",
                spec.function,
                answer.status,
                answer.text().trim()
            )));
        }
        Ok(())
    }

    /// A database row, a folder and a network namespace for a new VM.
    async fn new_instance_place(
        &self,
        function: &str,
    ) -> Result<(InstanceRow, NetNs), DaemonError> {
        let row = self.db.insert_instance(
            function,
            &self.netns_prefix,
            &self.paths.state_dir.join("instances"),
        )?;
        let made = async {
            std::fs::create_dir_all(&row.dir).map_err(io_err("create", &row.dir))?;
            NetNs::create(&row.netns)
                .await
                .map_err(|e: NetNsError| DaemonError::Instance {
                    name: function.to_string(),
                    instance: row.id,
                    reason: e.to_string(),
                })
        }
        .await;
        match made {
            Ok(ns) => Ok((row, ns)),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&row.dir);
                let _ = self.db.remove_instance(row.id);
                Err(e)
            }
        }
    }

    async fn remove_instance_place(&self, row: &InstanceRow, ns: &NetNs) {
        if let Err(e) = ns.remove().await {
            log::warn!("{e}");
        }
        let _ = std::fs::remove_dir_all(&row.dir);
        if let Err(e) = self.db.remove_instance(row.id) {
            log::warn!("{e}");
        }
    }

    /// Invokes `name` with `data` on an idle instance, or a new one.
    ///
    /// Only the wait for a lease belongs to the caller (a client that goes away leaves the
    /// queue); once a lease is held the attempt runs as its own task, so a caller that is
    /// dropped half-way (hyper drops a handler whose client hung up) cannot leave a slot
    /// taken, an instance marked busy or a namespace behind.
    pub async fn invoke(self: &Arc<Self>, name: &str, data: Bytes) -> Result<Outcome, DaemonError> {
        let deployed = self.get(name)?;
        let start = Instant::now();
        // An instance that dies under an invocation (its reapvm killed) is replaced once.
        let mut retried = false;
        loop {
            let lease = deployed.pool.acquire().await.map_err(|e| match e {
                PoolError::Closed if self.stopping.load(Ordering::Relaxed) => DaemonError::Stopping,
                PoolError::Closed => DaemonError::NotFound(name.to_string()),
                other => other.into(),
            })?;
            let counted = Attempt::begin(self.clone());
            let attempt = tokio::spawn({
                let (daemon, deployed, data) = (self.clone(), deployed.clone(), data.clone());
                async move {
                    let _counted = counted;
                    let outcome = match lease {
                        Lease::Warm(instance) => {
                            daemon.invoke_warm(&deployed, instance, data, start).await
                        }
                        Lease::Cold => daemon.invoke_cold(&deployed, data, start).await,
                    };
                    if let Ok(outcome) = &outcome {
                        daemon.account(&deployed, outcome);
                    }
                    outcome
                }
            })
            .await
            .unwrap_or_else(|e| {
                Err(DaemonError::Internal(format!(
                    "the invocation task failed: {e}"
                )))
            });
            match attempt {
                Ok(outcome) => return Ok(outcome),
                Err(e) if matches!(e, DaemonError::InstanceDied { .. }) && !retried => {
                    log::warn!("{e}; retrying once");
                    retried = true;
                }
                Err(e) => {
                    self.metrics
                        .failed_invocations
                        .get_or_create(&FunctionLabels {
                            function: name.to_string(),
                        })
                        .inc();
                    return Err(e);
                }
            }
        }
    }

    fn account(&self, deployed: &Deployed, outcome: &Outcome) {
        let start = if outcome.cold { "cold" } else { "warm" };
        let labels = StartLabels {
            function: deployed.name().to_string(),
            start: start.to_string(),
        };
        self.metrics.invocations.get_or_create(&labels).inc();
        self.metrics
            .latency
            .get_or_create(&labels)
            .observe(outcome.latency.as_secs_f64());
        if let Some(b) = &outcome.breakdown {
            // The times, not the page counts.
            for (phase, micros, _) in b.fields().into_iter().filter(|(_, _, unit)| *unit == "us") {
                self.metrics
                    .cold_start_phases
                    .get_or_create(&PhaseLabels {
                        function: deployed.name().to_string(),
                        phase: phase.to_string(),
                    })
                    .observe(micros as f64 / 1e6);
            }
        }
        let record = Invocation {
            at_ms: now_ms(),
            instance: outcome.instance,
            start: start.to_string(),
            mode: outcome.mode.map(str::to_string),
            status: outcome.status,
            latency_us: us(outcome.latency),
            breakdown: outcome.breakdown.clone(),
        };
        if let Err(e) = self.db.insert_invocation(deployed.name(), &record) {
            log::warn!("{e}");
        }
    }

    fn set_state(&self, deployed: &Deployed, id: u64, state: InstanceState) {
        if let Some(entry) = deployed
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            entry.1 = state;
        }
    }

    /// Gives a served instance back to the pool, unless it died meanwhile (then `retire`
    /// has taken it out already).
    fn release(&self, deployed: &Deployed, instance: Arc<Instance>) {
        let mut map = deployed.instances.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&instance.id) {
            if instance.vmm.exit_status().is_none() {
                entry.1 = InstanceState::Idle;
                deployed.pool.release(instance);
            }
        }
    }

    async fn invoke_warm(
        self: &Arc<Self>,
        deployed: &Arc<Deployed>,
        instance: Arc<Instance>,
        data: Bytes,
        start: Instant,
    ) -> Result<Outcome, DaemonError> {
        self.set_state(deployed, instance.id, InstanceState::Busy);
        let result = agent::unless_exited(instance.vmm.exit_watch(), async {
            let (stream, _) = agent::connect(&instance.ns, self.limits.connect_timeout).await?;
            agent::invoke(stream, &deployed.function.spec.function, data.to_vec()).await
        })
        .await;
        self.finish(deployed, instance, result, start, None, false)
            .await
    }

    /// Hands the answer (or the failure) back, and the instance to the pool or out.
    async fn finish(
        self: &Arc<Self>,
        deployed: &Arc<Deployed>,
        instance: Arc<Instance>,
        result: Result<crate::http::Answer, AgentError>,
        start: Instant,
        breakdown: Option<Breakdown>,
        cold: bool,
    ) -> Result<Outcome, DaemonError> {
        match result {
            Ok(answer) => {
                instance.invocations.fetch_add(1, Ordering::Relaxed);
                let id = instance.id;
                let mode = cold.then_some(instance.mode);
                self.release(deployed, instance);
                Ok(Outcome {
                    status: answer.status,
                    body: answer.body,
                    instance: id,
                    cold,
                    mode,
                    latency: start.elapsed(),
                    breakdown,
                })
            }
            Err(e) => {
                let died = instance.vmm.exited_within(Duration::from_millis(500)).await;
                let (name, id) = (deployed.name().to_string(), instance.id);
                self.retire(deployed, instance).await;
                Err(match died {
                    Some(status) => DaemonError::InstanceDied {
                        name,
                        instance: id,
                        status,
                        reason: format!("during the invocation: {e}"),
                    },
                    None => DaemonError::Instance {
                        name,
                        instance: id,
                        reason: format!("{e}; the instance is stopped"),
                    },
                })
            }
        }
    }

    async fn invoke_cold(
        self: &Arc<Self>,
        deployed: &Arc<Deployed>,
        data: Bytes,
        start: Instant,
    ) -> Result<Outcome, DaemonError> {
        let instance = self.start_instance(deployed).await?;
        let mut breakdown = Breakdown {
            load_vmm_us: us(instance.vmm.started.elapsed()),
            ..Breakdown::default()
        };
        let result = agent::unless_exited(instance.vmm.exit_watch(), async {
            let (stream, took) = agent::connect(&instance.ns, self.limits.connect_timeout).await?;
            breakdown.connect_func_client_us = us(took);
            let sent = Instant::now();
            let answer =
                agent::invoke(stream, &deployed.function.spec.function, data.to_vec()).await;
            breakdown.func_invocation_us = us(sent.elapsed());
            breakdown.total_us = us(start.elapsed());
            answer
        })
        .await;
        if result.is_ok() {
            self.read_restore_metrics(deployed, &instance, &mut breakdown)
                .await;
        }
        self.finish(deployed, instance, result, start, Some(breakdown), true)
            .await
    }

    /// The restore's own figures; a recording's once its WS file is written, so that the
    /// next cold start prefetches it.
    async fn read_restore_metrics(
        &self,
        deployed: &Deployed,
        instance: &Instance,
        breakdown: &mut Breakdown,
    ) {
        if instance.mode == "record" {
            let waited = Instant::now();
            while !deployed.ws().exists()
                && instance.vmm.exit_status().is_none()
                && waited.elapsed() < Duration::from_secs(60)
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !deployed.ws().exists() {
                log::warn!(
                    "instance {}: no WS file {} 60 s after its first answer",
                    instance.id,
                    deployed.ws().display()
                );
            }
        }
        match instance.vmm.metrics().await {
            Ok(m) => breakdown.take_restore_metrics(&m),
            Err(e) => log::warn!("instance {}: {e}", instance.id),
        }
    }

    /// Cold-starts an instance of `deployed` (its pool slot already taken): a fresh
    /// reapvm in a fresh namespace, restoring the snapshot or booting. A failure gives
    /// the slot back.
    async fn start_instance(
        self: &Arc<Self>,
        deployed: &Arc<Deployed>,
    ) -> Result<Arc<Instance>, DaemonError> {
        let spec = &deployed.function.spec;
        let (row, ns) = match self.new_instance_place(&spec.name).await {
            Ok(place) => place,
            Err(e) => {
                deployed.pool.slot_ended();
                return Err(e);
            }
        };
        let fail = |e: String| DaemonError::Instance {
            name: spec.name.clone(),
            instance: row.id,
            reason: e,
        };
        let died = |status: String, reason: String| DaemonError::InstanceDied {
            name: spec.name.clone(),
            instance: row.id,
            status,
            reason,
        };
        let started = async {
            let mode = match spec.cold_start {
                ColdStart::Reap if deployed.ws().exists() => "prefetch",
                ColdStart::Reap => "record",
                other => other.as_str(),
            };
            let config = (spec.cold_start == ColdStart::Boot).then(|| {
                boot_config(
                    &self.paths.kernel,
                    &self.paths.rootfs,
                    &spec.function,
                    spec.vcpus,
                    spec.mem_mib,
                )
            });
            let vmm = Vmm::spawn(&self.paths.reapvm, &row.dir, &ns, config.as_ref())
                .await
                .map_err(|e| fail(e.to_string()))?;
            self.db.set_instance_pid(row.id, vmm.pid)?;
            match vmm.wait_for_api().await {
                Ok(()) => {}
                Err(VmmError::Exited { status, when, log }) => {
                    return Err(died(status, format!("{when}; its log ends:\n{log}")))
                }
                Err(e) => return Err(fail(e.to_string())),
            }
            let loaded: Result<(), String> = if spec.cold_start == ColdStart::Boot {
                let mut exit = vmm.exit_watch();
                tokio::select! {
                    ready = agent::wait_ready(&ns, self.limits.boot_timeout) => ready
                        .map_err(|e| format!("{e}; reapvm's log ends:\n{}", vmm.log_tail(30))),
                    _ = exit.wait_for(Option::is_some) => Err(format!(
                        "the guest did not boot; reapvm's log ends:\n{}",
                        vmm.log_tail(30)
                    )),
                }
            } else {
                vmm.load_snapshot(
                    spec.cold_start,
                    &deployed.vmstate(),
                    &deployed.memory(),
                    &deployed.ws(),
                )
                .await
                .map_err(|e| e.to_string())
            };
            if let Err(reason) = loaded {
                return Err(match vmm.exited_within(Duration::from_millis(500)).await {
                    Some(status) => died(status, reason),
                    None => fail(reason),
                });
            }
            Ok::<_, DaemonError>((vmm, mode))
        }
        .await;
        let (vmm, mode) = match started {
            Ok(v) => v,
            Err(e) => {
                self.remove_instance_place(&row, &ns).await;
                deployed.pool.slot_ended();
                return Err(e);
            }
        };
        let instance = Arc::new(Instance {
            id: row.id,
            ns,
            dir: row.dir.clone(),
            vmm,
            mode,
            started_ms: now_ms(),
            invocations: AtomicU64::new(0),
        });
        deployed
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(instance.id, (instance.clone(), InstanceState::Busy));
        self.metrics
            .instances
            .get_or_create(&FunctionLabels {
                function: spec.name.clone(),
            })
            .inc();
        self.watch_exit(deployed.clone(), instance.clone());
        // Removed (or reapd stopping) while this instance started: `remove` and `stop_all`
        // close the pool before they retire what the map holds, so it is caught here.
        if deployed.pool.is_closed() {
            self.retire(deployed, instance).await;
            return Err(if self.stopping.load(Ordering::Relaxed) {
                DaemonError::Stopping
            } else {
                DaemonError::NotFound(spec.name.clone())
            });
        }
        Ok(instance)
    }

    /// Notices an instance whose reapvm ends on its own and takes it out.
    fn watch_exit(self: &Arc<Self>, deployed: Arc<Deployed>, instance: Arc<Instance>) {
        let daemon = Arc::downgrade(self);
        let mut exit = instance.vmm.exit_watch();
        tokio::spawn(async move {
            let _ = exit.wait_for(Option::is_some).await;
            if let Some(daemon) = daemon.upgrade() {
                let known = deployed
                    .instances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains_key(&instance.id);
                if known {
                    log::warn!(
                        "instance {} of {}: reapvm exited ({}); removing it",
                        instance.id,
                        deployed.name(),
                        instance.vmm.exit_status().unwrap_or_default()
                    );
                    daemon.retire(&deployed, instance).await;
                }
            }
        });
    }

    /// Takes an instance out (once), stops its VM and removes its namespace and files.
    async fn retire(&self, deployed: &Deployed, instance: Arc<Instance>) {
        let removed = {
            let mut map = deployed.instances.lock().unwrap_or_else(|p| p.into_inner());
            let removed = map.remove(&instance.id).is_some();
            deployed.pool.take_idle(|i| i.id == instance.id);
            removed
        };
        if !removed {
            return;
        }
        instance.vmm.stop().await;
        if let Err(e) = instance.ns.remove().await {
            log::warn!("{e}");
        }
        let _ = std::fs::remove_dir_all(&instance.dir);
        if let Err(e) = self.db.remove_instance(instance.id) {
            log::warn!("{e}");
        }
        self.metrics
            .instances
            .get_or_create(&FunctionLabels {
                function: deployed.name().to_string(),
            })
            .dec();
        deployed.pool.slot_ended();
    }

    /// Stops every idle instance of `name`; returns (stopped, still busy).
    pub async fn scale_to_zero(
        self: &Arc<Self>,
        name: &str,
    ) -> Result<(usize, usize), DaemonError> {
        let deployed = self.get(name)?;
        let daemon = self.clone();
        // Its own task: the idle instances are out of the pool once taken, and must all go.
        tokio::spawn(async move {
            let idle = deployed.pool.take_idle_for(Duration::ZERO);
            let stopped = idle.len();
            for instance in idle {
                daemon.retire(&deployed, instance).await;
            }
            let busy = deployed
                .instances
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len();
            (stopped, busy)
        })
        .await
        .map_err(|e| DaemonError::Internal(format!("the scale-to-zero task failed: {e}")))
    }

    fn deployed_all(&self) -> Vec<Arc<Deployed>> {
        self.functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Stops the instances idle longer than their function's keep-alive.
    pub async fn stop_expired(&self) {
        let all = self.deployed_all();
        for deployed in all {
            let keep_alive = Duration::from_secs(deployed.function.spec.keep_alive_s);
            for instance in deployed.pool.take_idle_for(keep_alive) {
                log::info!(
                    "instance {} of {}: idle for {keep_alive:?}, stopping it",
                    instance.id,
                    deployed.name()
                );
                self.retire(&deployed, instance).await;
            }
        }
    }

    /// Removes a function: its instances (busy ones too), its snapshot and its records.
    /// The name stays taken until all of it is gone, so a new deploy cannot start in the
    /// folder being removed.
    pub async fn remove(self: &Arc<Self>, name: &str) -> Result<usize, DaemonError> {
        let deployed = {
            let mut deploying = self.deploying.lock().unwrap_or_else(|p| p.into_inner());
            if deploying.iter().any(|n| n == name) {
                return Err(DaemonError::InProgress(name.to_string()));
            }
            let deployed = self
                .functions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name)
                .ok_or_else(|| DaemonError::NotFound(name.to_string()))?;
            deploying.push(name.to_string());
            deployed
        };
        let reserved = Reserved {
            daemon: self.clone(),
            name: name.to_string(),
        };
        let (daemon, name) = (self.clone(), name.to_string());
        tokio::spawn(async move {
            let _reserved = reserved;
            deployed.pool.close();
            let stopped = daemon.retire_all(&deployed).await;
            let removed = daemon.db.remove_function(&name);
            let _ = std::fs::remove_dir_all(&deployed.function.dir);
            removed.map(|_| stopped).map_err(DaemonError::from)
        })
        .await
        .unwrap_or_else(|e| {
            Err(DaemonError::Internal(format!(
                "the removal task failed: {e}"
            )))
        })
    }

    async fn retire_all(&self, deployed: &Deployed) -> usize {
        let instances: Vec<Arc<Instance>> = deployed
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(i, _)| i.clone())
            .collect();
        let n = instances.len();
        for instance in instances {
            self.retire(deployed, instance).await;
        }
        n
    }

    /// Stops every instance (reapd is ending). The functions stay deployed.
    pub async fn stop_all(&self) -> usize {
        let all = self.deployed_all();
        self.stopping.store(true, Ordering::Relaxed);
        let mut stopped = 0;
        for deployed in &all {
            deployed.pool.close();
            for instance in deployed.pool.take_idle_for(Duration::ZERO) {
                self.retire(deployed, instance).await;
                stopped += 1;
            }
        }
        // Invocations under way may finish (up to STOP_WAIT); a cold start not yet listed
        // finds the pool closed and stops its instance itself. Then everything goes.
        let waited = Instant::now();
        while self.attempts.load(Ordering::SeqCst) > 0 && waited.elapsed() < STOP_WAIT {
            let done = self.attempts_done.notified();
            let _ = tokio::time::timeout(Duration::from_millis(100), done).await;
        }
        for deployed in &all {
            stopped += self.retire_all(deployed).await;
        }
        stopped
    }

    pub fn list(&self) -> Result<Vec<FunctionView>, DaemonError> {
        let mut names: Vec<String> = self
            .functions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        names.sort();
        names.iter().map(|n| self.show(n)).collect()
    }

    pub fn show(&self, name: &str) -> Result<FunctionView, DaemonError> {
        let deployed = self.get(name)?;
        let size = |p: PathBuf| std::fs::metadata(p).ok().map(|m| m.len());
        let (cold_starts, warm_starts) = self.db.start_counts(name)?;
        let mut instances: Vec<InstanceView> = deployed
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|(i, state)| InstanceView {
                id: i.id,
                state: *state,
                pid: i.vmm.pid,
                started_as: i.mode,
                invocations: i.invocations.load(Ordering::Relaxed),
                netns: i.ns.name.clone(),
            })
            .collect();
        instances.sort_by_key(|i| i.id);
        Ok(FunctionView {
            spec: deployed.function.spec.clone(),
            snapshot_dir: deployed.function.dir.clone(),
            deployed_at_ms: deployed.function.deployed_at_ms,
            vmstate_bytes: size(deployed.vmstate()),
            memory_bytes: size(deployed.memory()),
            ws_bytes: size(deployed.ws()),
            cold_starts,
            warm_starts,
            waiting: deployed.pool.counts().2,
            instances,
        })
    }

    pub fn invocations(&self, name: &str, limit: u32) -> Result<Vec<Invocation>, DaemonError> {
        self.get(name)?;
        Ok(self.db.invocations(name, limit)?)
    }
}

fn lock_state_dir(dir: &Path) -> Result<std::fs::File, DaemonError> {
    let path = dir.join("reapd.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // SAFETY: flock(2) on a descriptor this function owns; the lock lives with the file.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        return Err(if err.kind() == std::io::ErrorKind::WouldBlock {
            DaemonError::Locked(dir.display().to_string())
        } else {
            io_err("lock", &path)(err)
        });
    }
    Ok(file)
}

/// Whether `pid` is a reapvm of the instance whose folder is `dir` (its command line names
/// the API socket in that folder): a pid recorded by a dead reapd may have been reused.
fn process_is_instance(pid: u32, dir: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = dir.join("api.sock");
    cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == needle.as_os_str().as_encoded_bytes())
}

async fn kill_and_wait(pid: u32) {
    // SAFETY: kill(2) on a pid checked just before to be one of our instances' reapvm.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(10) {
        // Not our child (its parent died): init reaps it.
        if std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(false)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_dir_tags_are_stable_and_short() {
        assert_eq!(tag("/var/lib/reapd"), tag("/var/lib/reapd"));
        assert_ne!(tag("/var/lib/reapd"), tag("/var/lib/reapd2"));
        assert_eq!(tag("x").len(), 8);
    }

    #[test]
    fn a_reused_pid_is_not_taken_for_an_instance() {
        // This test process is not a reapvm of any instance folder.
        assert!(!process_is_instance(
            std::process::id(),
            Path::new("/state/instances/hello-1")
        ));
        assert!(!process_is_instance(u32::MAX, Path::new("/x")));
    }
}
