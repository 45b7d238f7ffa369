//! What the VMM thread does with API requests: before InstanceStart it edits the VM's
//! configuration (each PUT validated at once, as Firecracker does); afterwards it serves
//! the requests a running VM supports from the event loop.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::legacy::I8042Device;
use devices::mmds::{MmdsStore, StoreError};
use devices::virtio::block::Block;
use devices::virtio::net::Net;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::json;

use super::request::{
    Action, ApiRequest, DriveUpdate, MachineConfigUpdate, NetworkInterfaceUpdate, VmStateChange,
};
use super::server::{ApiInbox, ApiResponse};
use crate::builder::{build_and_start, StartOptions};
use crate::config::{DriveConfig, NetworkInterfaceConfig, VmConfig};
use crate::logger;
use crate::memory::host_ram_bytes;
use crate::metrics;
use crate::microvm::{MicroVm, PauseHandle};
use crate::persist::{SnapshotKind, SnapshotSource};
use crate::restore;

/// The Firecracker API version reapvm speaks (for clients that gate features on it).
pub const FIRECRACKER_API_VERSION: &str = "1.10.1";

const NOT_AFTER_START: &str =
    "The requested operation is not supported after starting the microVM.";

fn instance_info(id: &str, state: &str) -> ApiResponse {
    ApiResponse::ok(json!({
        "app_name": "reapvm",
        "id": id,
        "state": state,
        "vmm_version": env!("CARGO_PKG_VERSION"),
    }))
}

fn version() -> ApiResponse {
    ApiResponse::ok(json!({
        "firecracker_version": FIRECRACKER_API_VERSION,
        "reapvm_version": env!("CARGO_PKG_VERSION"),
    }))
}

fn to_json<T: serde::Serialize>(value: &T) -> ApiResponse {
    match serde_json::to_value(value) {
        Ok(v) => ApiResponse::ok(v),
        Err(e) => ApiResponse::fault(format!("cannot encode the configuration: {e}")),
    }
}

fn put_logger(cfg: &crate::config::LoggerConfig) -> ApiResponse {
    let level = match cfg.level.as_deref().map(logger::parse_level).transpose() {
        Ok(level) => level,
        Err(e) => return ApiResponse::fault(e),
    };
    match logger::reconfigure(
        level,
        cfg.log_path.as_deref(),
        cfg.show_level,
        cfg.show_log_origin,
        cfg.module.clone(),
    ) {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::fault(e),
    }
}

fn put_metrics(cfg: &crate::config::MetricsConfig) -> ApiResponse {
    match metrics::init(&cfg.metrics_path) {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::fault(e),
    }
}

fn flush_metrics() -> ApiResponse {
    match metrics::flush() {
        Ok(()) => ApiResponse::no_content(),
        Err(e) => ApiResponse::fault(e),
    }
}

fn check_readable(what: &str, path: &std::path::Path) -> Result<(), ApiResponse> {
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|e| ApiResponse::fault(format!("cannot open {what} {}: {e}", path.display())))
}

fn upsert_drive(drives: &mut Vec<DriveConfig>, drive: DriveConfig) {
    match drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
        Some(slot) => *slot = drive,
        None => drives.push(drive),
    }
}

fn upsert_interface(ifaces: &mut Vec<NetworkInterfaceConfig>, iface: NetworkInterfaceConfig) {
    match ifaces.iter_mut().find(|n| n.iface_id == iface.iface_id) {
        Some(slot) => *slot = iface,
        None => ifaces.push(iface),
    }
}

fn patch_machine(config: &mut VmConfig, update: MachineConfigUpdate) -> ApiResponse {
    let mut mc = config.machine_config.clone();
    if let Some(v) = update.vcpu_count {
        mc.vcpu_count = v;
    }
    if let Some(v) = update.mem_size_mib {
        mc.mem_size_mib = v;
    }
    if let Some(v) = update.smt {
        mc.smt = v;
    }
    if let Some(v) = update.track_dirty_pages {
        mc.track_dirty_pages = v;
    }
    let new_template = update.cpu_template.is_some();
    if new_template {
        mc.cpu_template = update.cpu_template;
    }
    if update.huge_pages.is_some() {
        mc.huge_pages = update.huge_pages;
    }
    match mc.validate(host_ram_bytes()) {
        Ok(()) => {
            config.machine_config = mc;
            if new_template {
                config.cpu_config = None;
            }
            ApiResponse::no_content()
        }
        Err(e) => ApiResponse::fault(e),
    }
}

/// The MMDS data store, shared by the API and the network interfaces MMDS is reachable
/// through.
pub type SharedMmds = Arc<Mutex<MmdsStore>>;

/// `PUT`, `PATCH` and `GET /mmds`, the same before and after boot.
fn mmds_request(mmds: &SharedMmds, request: ApiRequest) -> ApiResponse {
    let mut store = lock(mmds);
    let result = match request {
        ApiRequest::GetMmds => return ApiResponse::ok(store.data()),
        ApiRequest::PutMmds(data) => store.put(data),
        ApiRequest::PatchMmds(patch) => store.patch(&patch),
        _ => return ApiResponse::fault("not an MMDS request (internal error)"),
    };
    match result {
        Ok(()) => ApiResponse::no_content(),
        Err(e @ StoreError::TooLarge { .. }) => ApiResponse::fault_with(413, e),
        Err(e) => ApiResponse::fault(e),
    }
}

/// Firecracker's refusal, word for word: clients match on it.
const LOAD_AFTER_BOOT_CONFIG: &str =
    "Loading a microVM snapshot not allowed after configuring boot-specific resources.";

/// A `PATCH /drives` on the configuration: false when it names no drive there.
fn patch_drive_config(drives: &mut [DriveConfig], update: &DriveUpdate) -> bool {
    let Some(drive) = drives.iter_mut().find(|d| d.drive_id == update.drive_id) else {
        return false;
    };
    if let Some(path) = &update.path_on_host {
        drive.path_on_host = path.clone();
    }
    if let Some(limiter) = update.rate_limiter {
        drive.rate_limiter = Some(drive.rate_limiter.unwrap_or_default().patched(limiter));
    }
    true
}

/// A `PATCH /network-interfaces` on the configuration: false when it names no interface.
fn patch_interface_config(
    ifaces: &mut [NetworkInterfaceConfig],
    update: &NetworkInterfaceUpdate,
) -> bool {
    let Some(iface) = ifaces.iter_mut().find(|n| n.iface_id == update.iface_id) else {
        return false;
    };
    if let Some(rx) = update.rx_rate_limiter {
        iface.rx_rate_limiter = Some(iface.rx_rate_limiter.unwrap_or_default().patched(rx));
    }
    if let Some(tx) = update.tx_rate_limiter {
        iface.tx_rate_limiter = Some(iface.tx_rate_limiter.unwrap_or_default().patched(tx));
    }
    true
}

fn no_drive(id: &str) -> ApiResponse {
    ApiResponse::fault(format!(
        "Invalid block device ID: no drive {id:?} is attached."
    ))
}

fn no_interface(id: &str) -> ApiResponse {
    ApiResponse::fault(format!(
        "Invalid network interface ID: no network interface {id:?} is attached."
    ))
}

/// Whether `request` configures what a boot uses (Firecracker's "boot path"); the logger
/// and metrics do not.
fn configures_boot(request: &ApiRequest) -> bool {
    matches!(
        request,
        ApiRequest::PutMachineConfig(_)
            | ApiRequest::PatchMachineConfig(_)
            | ApiRequest::PutBootSource(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PatchDrive(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PatchNetworkInterface(_)
            | ApiRequest::PutEntropy(_)
            | ApiRequest::PutVsock(_)
            | ApiRequest::PutMmdsConfig(_)
    )
}

/// Serves pre-boot API requests until an InstanceStart or a snapshot load succeeds: the VM
/// and the configuration it runs with; None if the API thread died. A failed start or load
/// leaves the VMM waiting for a corrected request.
pub fn serve_preboot(
    inbox: &ApiInbox,
    id: &str,
    mmds: &SharedMmds,
    opts: &dyn Fn() -> StartOptions,
) -> Option<(MicroVm, VmConfig)> {
    let mut config = VmConfig::default();
    // As Firecracker: once a boot resource is configured, this VMM boots; it loads no
    // snapshot, whose own configuration would silently replace what was set.
    let mut boot_configured = false;
    loop {
        let message = inbox.requests.recv().ok()?;
        let _ = inbox.wake.read();
        let started = match &message.request {
            ApiRequest::LoadSnapshot(_) if boot_configured => Err(LOAD_AFTER_BOOT_CONFIG.into()),
            ApiRequest::LoadSnapshot(params) => {
                restore::load_snapshot(params, opts()).map_err(|e| e.to_string())
            }
            ApiRequest::Action(Action::InstanceStart) => build_and_start(&config, opts())
                .map(|vm| (vm, config.clone()))
                .map_err(|e| e.to_string()),
            _ => {
                let configures_boot = configures_boot(&message.request);
                let response = handle_preboot(&mut config, id, mmds, message.request);
                boot_configured |= configures_boot && response.status == 204;
                let _ = message.reply.send(response);
                continue;
            }
        };
        match started {
            Ok(started) => {
                let _ = message.reply.send(ApiResponse::no_content());
                return Some(started);
            }
            Err(fault) => {
                log::error!("{:?} failed: {fault}", message.request);
                let _ = message.reply.send(ApiResponse::fault(fault));
            }
        }
    }
}

/// Applies one pre-boot request to `config`. InstanceStart and LoadSnapshot are
/// `serve_preboot`'s.
fn handle_preboot(
    config: &mut VmConfig,
    id: &str,
    mmds: &SharedMmds,
    request: ApiRequest,
) -> ApiResponse {
    match request {
        ApiRequest::GetInstanceInfo => instance_info(id, "Not started"),
        ApiRequest::GetVersion => version(),
        ApiRequest::GetMachineConfig => to_json(&config.machine_config),
        ApiRequest::GetVmConfig => to_json(config),
        ApiRequest::PutMachineConfig(mut mc) => match mc.validate(host_ram_bytes()) {
            Ok(()) => {
                // As Firecracker: a PUT without cpu_template keeps the template; one with
                // it replaces a custom template too (the last one set wins).
                match mc.cpu_template {
                    None => mc.cpu_template = config.machine_config.cpu_template.take(),
                    Some(_) => config.cpu_config = None,
                }
                config.machine_config = mc;
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::fault(e),
        },
        ApiRequest::PutCpuConfig(template) => {
            config.cpu_config = Some(crate::config::CpuConfigSource::Inline(template));
            config.machine_config.cpu_template = None;
            ApiResponse::no_content()
        }
        ApiRequest::PatchMachineConfig(update) => patch_machine(config, update),
        ApiRequest::PutBootSource(boot) => {
            if let Err(r) = check_readable("kernel image", &boot.kernel_image_path) {
                return r;
            }
            if let Some(initrd) = &boot.initrd_path {
                if let Err(r) = check_readable("initrd", initrd) {
                    return r;
                }
            }
            if let Err(e) = crate::loader::build_cmdline(boot.boot_args()) {
                return ApiResponse::fault(e);
            }
            config.boot_source = Some(boot);
            ApiResponse::no_content()
        }
        ApiRequest::PutDrive(drive) => {
            if let Err(r) =
                check_readable(&format!("drive {}", drive.drive_id), &drive.path_on_host)
            {
                return r;
            }
            let mut candidate = config.clone();
            upsert_drive(&mut candidate.drives, drive);
            match candidate.validate_devices() {
                Ok(()) => {
                    *config = candidate;
                    ApiResponse::no_content()
                }
                Err(e) => ApiResponse::fault(e),
            }
        }
        ApiRequest::PutNetworkInterface(iface) => {
            let mut candidate = config.clone();
            upsert_interface(&mut candidate.network_interfaces, iface);
            match candidate.validate_devices() {
                Ok(()) => {
                    *config = candidate;
                    ApiResponse::no_content()
                }
                Err(e) => ApiResponse::fault(e),
            }
        }
        ApiRequest::PatchDrive(update) => {
            if !config.drives.iter().any(|d| d.drive_id == update.drive_id) {
                return no_drive(&update.drive_id);
            }
            if let Some(path) = &update.path_on_host {
                if let Err(r) = check_readable(&format!("drive {}", update.drive_id), path) {
                    return r;
                }
            }
            if patch_drive_config(&mut config.drives, &update) {
                ApiResponse::no_content()
            } else {
                no_drive(&update.drive_id)
            }
        }
        ApiRequest::PatchNetworkInterface(update) => {
            if patch_interface_config(&mut config.network_interfaces, &update) {
                ApiResponse::no_content()
            } else {
                no_interface(&update.iface_id)
            }
        }
        ApiRequest::PutEntropy(entropy) => {
            config.entropy = Some(entropy);
            ApiResponse::no_content()
        }
        ApiRequest::PutVsock(vsock) => match vsock.validate() {
            Ok(()) => {
                config.vsock = Some(vsock);
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::fault(e),
        },
        ApiRequest::PutMmdsConfig(mmds_config) => {
            match mmds_config.validate(&config.network_interfaces) {
                Ok(()) => {
                    config.mmds_config = Some(mmds_config);
                    ApiResponse::no_content()
                }
                Err(e) => ApiResponse::fault(e),
            }
        }
        request @ (ApiRequest::PutMmds(_) | ApiRequest::PatchMmds(_) | ApiRequest::GetMmds) => {
            mmds_request(mmds, request)
        }
        ApiRequest::PutLogger(cfg) => put_logger(&cfg),
        ApiRequest::PutMetrics(cfg) => put_metrics(&cfg),
        ApiRequest::Action(Action::FlushMetrics) => flush_metrics(),
        ApiRequest::Action(Action::SendCtrlAltDel | Action::FinishWsRecording) => {
            ApiResponse::fault("The microVM is not running yet.")
        }
        ApiRequest::Action(Action::InstanceStart) => {
            ApiResponse::fault("InstanceStart is handled by the VMM thread (internal error)")
        }
        ApiRequest::PatchVm(_) | ApiRequest::CreateSnapshot(_) => {
            ApiResponse::fault("The microVM is not running yet.")
        }
        ApiRequest::LoadSnapshot(_) => {
            ApiResponse::fault("LoadSnapshot is handled by the VMM thread (internal error)")
        }
    }
}

/// Serves the API of a running microVM from the event loop.
pub struct RunningApi {
    inbox: ApiInbox,
    config: VmConfig,
    id: String,
    i8042: Arc<Mutex<I8042Device>>,
    pause: PauseHandle,
    snapshots: SnapshotSource,
    mmds: SharedMmds,
}

impl RunningApi {
    pub fn new(
        inbox: ApiInbox,
        config: VmConfig,
        id: String,
        mmds: SharedMmds,
        microvm: &MicroVm,
    ) -> Self {
        Self {
            inbox,
            config,
            id,
            mmds,
            i8042: microvm.i8042(),
            pause: microvm.pause_handle(),
            snapshots: microvm.snapshot_source(),
        }
    }

    fn handle(&mut self, request: ApiRequest) -> ApiResponse {
        let started = std::time::Instant::now();
        match request {
            ApiRequest::GetInstanceInfo => instance_info(
                &self.id,
                if self.pause.is_paused() {
                    "Paused"
                } else {
                    "Running"
                },
            ),
            ApiRequest::PatchVm(VmStateChange::Paused) => match self.pause.pause() {
                Ok(()) => {
                    metrics::metrics()
                        .latencies_us
                        .pause_vm
                        .set_elapsed_us(started);
                    log::info!("the microVM is paused");
                    ApiResponse::no_content()
                }
                Err(e) => ApiResponse::fault(e),
            },
            ApiRequest::PatchVm(VmStateChange::Resumed) => match self.pause.resume() {
                Ok(()) => {
                    metrics::metrics()
                        .latencies_us
                        .resume_vm
                        .set_elapsed_us(started);
                    log::info!("the microVM is resumed");
                    ApiResponse::no_content()
                }
                Err(e) => ApiResponse::fault(e),
            },
            ApiRequest::GetVersion => version(),
            ApiRequest::GetMachineConfig => to_json(&self.config.machine_config),
            ApiRequest::GetVmConfig => to_json(&self.config),
            ApiRequest::PutLogger(cfg) => put_logger(&cfg),
            ApiRequest::Action(Action::SendCtrlAltDel) => {
                self.i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send_ctrl_alt_del();
                ApiResponse::no_content()
            }
            ApiRequest::Action(Action::InstanceStart) => {
                ApiResponse::fault("The microVM is already running.")
            }
            ApiRequest::Action(Action::FinishWsRecording) => {
                if self.pause.finish_ws_recording("the API asked") {
                    ApiResponse::no_content()
                } else {
                    ApiResponse::fault("No REAP working set is being recorded.")
                }
            }
            ApiRequest::PutMetrics(cfg) => put_metrics(&cfg),
            ApiRequest::Action(Action::FlushMetrics) => flush_metrics(),
            ApiRequest::CreateSnapshot(params) => {
                let kind = match params.snapshot_type.as_deref() {
                    None | Some("Full") => SnapshotKind::Full,
                    Some("Diff") => SnapshotKind::Diff,
                    Some(other) => {
                        return ApiResponse::fault(format!(
                            "snapshot_type {other:?} is not one of Full, Diff"
                        ))
                    }
                };
                match self
                    .snapshots
                    .create(kind, &params.snapshot_path, &params.mem_file_path)
                {
                    Ok(()) => {
                        let latencies = &metrics::metrics().latencies_us;
                        match kind {
                            SnapshotKind::Full => &latencies.full_create_snapshot,
                            SnapshotKind::Diff => &latencies.diff_create_snapshot,
                        }
                        .set_elapsed_us(started);
                        log::info!(
                            "{kind:?} snapshot written to {} and {}",
                            params.snapshot_path.display(),
                            params.mem_file_path.display()
                        );
                        ApiResponse::no_content()
                    }
                    Err(e) => ApiResponse::fault(e),
                }
            }
            ApiRequest::PatchDrive(update) => self.patch_drive(&update),
            ApiRequest::PatchNetworkInterface(update) => self.patch_interface(&update),
            request @ (ApiRequest::PutMmds(_) | ApiRequest::PatchMmds(_) | ApiRequest::GetMmds) => {
                mmds_request(&self.mmds, request)
            }
            ApiRequest::LoadSnapshot(_) => ApiResponse::fault(NOT_AFTER_START),
            ApiRequest::PutMachineConfig(_)
            | ApiRequest::PatchMachineConfig(_)
            | ApiRequest::PutBootSource(_)
            | ApiRequest::PutDrive(_)
            | ApiRequest::PutNetworkInterface(_)
            | ApiRequest::PutEntropy(_)
            | ApiRequest::PutVsock(_)
            | ApiRequest::PutMmdsConfig(_)
            | ApiRequest::PutCpuConfig(_) => ApiResponse::fault(NOT_AFTER_START),
        }
    }
}

impl RunningApi {
    /// The attached device `id`, if it is a `D`.
    fn device<D: Send + 'static>(
        &self,
        id: &str,
    ) -> Option<(Arc<Mutex<D>>, &crate::device_manager::AttachedDevice)> {
        // A drive and a network interface may share an id: the one of type D.
        self.snapshots
            .attached
            .iter()
            .filter(|a| a.slot.id == id)
            .find_map(|a| Some((a.device_as::<D>()?, a)))
    }

    /// `PATCH /drives/{id}` on a running (or paused) VM: a new backing file, which the guest
    /// learns of through a configuration change (it reads the new capacity), and new rate
    /// limiter buckets. What changed is what later snapshots and `GET /vm/config` show.
    fn patch_drive(&mut self, update: &DriveUpdate) -> ApiResponse {
        let Some((block, attached)) = self.device::<Block>(&update.drive_id) else {
            return no_drive(&update.drive_id);
        };
        if let Some(path) = &update.path_on_host {
            // The device first, then the transport: never both locks at once (a vCPU
            // reading the configuration takes them the other way round).
            let swapped = lock(&block).swap_file(path);
            if let Err(e) = swapped {
                return ApiResponse::fault(e);
            }
            lock(&attached.transport).signal_config_change();
            log::info!(
                "drive {} is now backed by {}",
                update.drive_id,
                path.display()
            );
        }
        if let Some(limiter) = update.rate_limiter {
            lock(&block).update_rate_limiter(limiter);
        }
        patch_drive_config(&mut self.config.drives, update);
        patch_drive_config(&mut self.snapshots.config.drives, update);
        ApiResponse::no_content()
    }

    /// `PATCH /network-interfaces/{id}` on a running (or paused) VM: new rate limiter
    /// buckets.
    fn patch_interface(&mut self, update: &NetworkInterfaceUpdate) -> ApiResponse {
        let Some((net, _)) = self.device::<Net>(&update.iface_id) else {
            return no_interface(&update.iface_id);
        };
        lock(&net).update_rate_limiters(update.rx_rate_limiter, update.tx_rate_limiter);
        patch_interface_config(&mut self.config.network_interfaces, update);
        patch_interface_config(&mut self.snapshots.config.network_interfaces, update);
        ApiResponse::no_content()
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MutEventSubscriber for RunningApi {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.inbox.wake, EventSet::IN)) {
            log::error!("API: cannot watch for requests: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() != self.inbox.wake.as_raw_fd() {
            return;
        }
        let _ = self.inbox.wake.read();
        while let Ok(message) = self.inbox.requests.try_recv() {
            let response = self.handle(message.request);
            // The API thread may have given up on a closed connection; nothing to do then.
            let _ = message.reply.send(response);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::request::parse;

    fn store() -> SharedMmds {
        Arc::new(Mutex::new(MmdsStore::new(200)))
    }

    fn put(config: &mut VmConfig, path: &str, body: &str) -> ApiResponse {
        handle_preboot(
            config,
            "t",
            &store(),
            parse("PUT", path, body.as_bytes()).unwrap(),
        )
    }

    #[test]
    fn preboot_configuration_is_validated_per_request() {
        let mut config = VmConfig::default();
        let r = put(
            &mut config,
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(config.machine_config.vcpu_count, 2);
        let r = put(
            &mut config,
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 256}"#,
        );
        assert_eq!(r.status, 400);
        assert_eq!(
            config.machine_config.vcpu_count, 2,
            "a refused PUT changes nothing"
        );
        let r = handle_preboot(
            &mut config,
            "t",
            &store(),
            parse("PATCH", "/machine-config", br#"{"mem_size_mib": 512}"#).unwrap(),
        );
        assert_eq!((r.status, config.machine_config.mem_size_mib), (204, 512));

        let r = put(
            &mut config,
            "/boot-source",
            r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
        );
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/vmlinux"));
        let r = put(
            &mut config,
            "/boot-source",
            r#"{"kernel_image_path": "/proc/self/exe"}"#,
        );
        assert_eq!(r.status, 204);

        let drive =
            r#"{"drive_id": "d1", "path_on_host": "/proc/self/exe", "is_root_device": true}"#;
        assert_eq!(put(&mut config, "/drives/d1", drive).status, 204);
        assert_eq!(
            put(&mut config, "/drives/d1", drive).status,
            204,
            "PUT replaces"
        );
        assert_eq!(config.drives.len(), 1);
        let second_root =
            r#"{"drive_id": "d2", "path_on_host": "/proc/self/exe", "is_root_device": true}"#;
        assert_eq!(put(&mut config, "/drives/d2", second_root).status, 400);
        assert_eq!(config.drives.len(), 1);

        let iface = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert_eq!(
            put(&mut config, "/network-interfaces/eth0", iface).status,
            204
        );
        let same_tap = r#"{"iface_id": "eth1", "host_dev_name": "tap0"}"#;
        assert_eq!(
            put(&mut config, "/network-interfaces/eth1", same_tap).status,
            400
        );

        let r = put(
            &mut config,
            "/vsock",
            r#"{"guest_cid": 2, "uds_path": "/v.sock"}"#,
        );
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("guest_cid 2"));
        assert!(config.vsock.is_none());
        let vsock = r#"{"vsock_id": "vsock0", "guest_cid": 3, "uds_path": "/v.sock"}"#;
        assert_eq!(put(&mut config, "/vsock", vsock).status, 204);

        // CPU templates: the one set last wins; a PUT without cpu_template keeps it.
        let custom = r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0, "modifiers": [{"register": "eax", "bitmap": "0b1"}]}]}"#;
        assert_eq!(put(&mut config, "/cpu-config", custom).status, 204);
        assert!(config.cpu_config.is_some());
        let t2 = r#"{"vcpu_count": 2, "mem_size_mib": 512, "cpu_template": "T2"}"#;
        assert_eq!(put(&mut config, "/machine-config", t2).status, 204);
        assert!(
            config.cpu_config.is_none(),
            "a static template replaces the custom one"
        );
        let keep = r#"{"vcpu_count": 2, "mem_size_mib": 512}"#;
        assert_eq!(put(&mut config, "/machine-config", keep).status, 204);
        assert_eq!(config.machine_config.cpu_template.as_deref(), Some("T2"));
        assert_eq!(put(&mut config, "/cpu-config", custom).status, 204);
        assert_eq!(config.machine_config.cpu_template, None);
        let bad = r#"{"vcpu_count": 2, "mem_size_mib": 512, "cpu_template": "T9"}"#;
        assert_eq!(put(&mut config, "/machine-config", bad).status, 400);
        assert!(parse("PUT", "/cpu-config", br#"{"vcpu_features": []}"#).is_err());

        let r = handle_preboot(&mut config, "t", &store(), ApiRequest::GetVmConfig);
        let body = r.body.unwrap();
        assert_eq!(body["vsock"]["guest_cid"], 3);
        assert_eq!(body["cpu-config"]["cpuid_modifiers"][0]["leaf"], "0x1");
        assert_eq!(body["machine-config"]["mem_size_mib"], 512);
        assert_eq!(body["drives"][0]["drive_id"], "d1");
        let r = handle_preboot(&mut config, "vm-7", &store(), ApiRequest::GetInstanceInfo);
        assert_eq!(r.body.unwrap()["state"], "Not started");
    }

    fn patch(config: &mut VmConfig, path: &str, body: &str) -> ApiResponse {
        handle_preboot(
            config,
            "t",
            &store(),
            parse("PATCH", path, body.as_bytes()).unwrap(),
        )
    }

    /// Before boot a PATCH edits the configured drive or interface: the fields given, and
    /// of a rate limiter the buckets given; what names nothing configured is refused.
    #[test]
    fn preboot_patches_change_what_they_name() {
        let mut config = VmConfig::default();
        let drive = r#"{"drive_id": "d1", "path_on_host": "/proc/self/exe", "is_root_device": false,
            "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#;
        assert_eq!(put(&mut config, "/drives/d1", drive).status, 204);
        let r = patch(
            &mut config,
            "/drives/d1",
            r#"{"drive_id": "d1", "path_on_host": "/proc/self/cmdline", "rate_limiter": {"ops": {"size": 5, "refill_time": 10}}}"#,
        );
        assert_eq!(r.status, 204);
        let d = &config.drives[0];
        assert_eq!(d.path_on_host, std::path::Path::new("/proc/self/cmdline"));
        let limiter = d.rate_limiter.unwrap();
        assert_eq!(limiter.bandwidth.unwrap().size, 1000, "kept");
        assert_eq!(limiter.ops.unwrap().size, 5, "added");
        let r = patch(
            &mut config,
            "/drives/d1",
            r#"{"drive_id": "d1", "path_on_host": "/nonexistent/disk"}"#,
        );
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/disk"));
        assert_eq!(
            config.drives[0].path_on_host,
            std::path::Path::new("/proc/self/cmdline"),
            "a refused PATCH changes nothing"
        );
        let r = patch(&mut config, "/drives/d9", r#"{"drive_id": "d9"}"#);
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("\"d9\""));

        let iface = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert_eq!(
            put(&mut config, "/network-interfaces/eth0", iface).status,
            204
        );
        let r = patch(
            &mut config,
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 100, "refill_time": 1}}}"#,
        );
        assert_eq!(r.status, 204);
        let n = &config.network_interfaces[0];
        assert!(n.rx_rate_limiter.is_none());
        assert_eq!(n.tx_rate_limiter.unwrap().bandwidth.unwrap().size, 100);
        let r = patch(
            &mut config,
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1"}"#,
        );
        assert_eq!(r.status, 400);
        // A PATCH configures the boot: a snapshot load is refused after it.
        assert!(configures_boot(
            &parse("PATCH", "/drives/d1", br#"{"drive_id": "d1"}"#).unwrap()
        ));
    }

    /// MMDS before boot: the configuration is checked against the interfaces; the data
    /// store answers PUT, PATCH and GET with Firecracker's statuses.
    #[test]
    fn preboot_mmds_requests() {
        let mut config = VmConfig::default();
        let mmds = store();
        let ask = |config: &mut VmConfig, method: &str, path: &str, body: &str| {
            handle_preboot(
                config,
                "t",
                &mmds,
                parse(method, path, body.as_bytes()).unwrap(),
            )
        };
        let with_eth0 = r#"{"version": "V2", "network_interfaces": ["eth0"]}"#;
        let r = ask(&mut config, "PUT", "/mmds/config", with_eth0);
        assert_eq!(r.status, 400, "no interface eth0 yet");
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("\"eth0\""));
        let iface = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert_eq!(
            ask(&mut config, "PUT", "/network-interfaces/eth0", iface).status,
            204
        );
        assert_eq!(
            ask(&mut config, "PUT", "/mmds/config", with_eth0).status,
            204
        );
        assert!(configures_boot(
            &parse("PUT", "/mmds/config", with_eth0.as_bytes()).unwrap()
        ));
        assert!(!configures_boot(&parse("PUT", "/mmds", b"{}").unwrap()));
        let r = ask(&mut config, "GET", "/mmds", "");
        assert_eq!((r.status, r.body.unwrap()), (200, json!({})));
        let r = ask(&mut config, "PATCH", "/mmds", r#"{"a": 1}"#);
        assert_eq!(r.status, 400, "nothing to patch yet");
        assert_eq!(
            ask(&mut config, "PUT", "/mmds", r#"{"a": {"b": 1}}"#).status,
            204
        );
        assert_eq!(
            ask(&mut config, "PATCH", "/mmds", r#"{"a": {"c": 2}}"#).status,
            204
        );
        let r = ask(&mut config, "GET", "/mmds", "");
        assert_eq!(r.body.unwrap(), json!({"a": {"b": 1, "c": 2}}));
        let big = format!(r#"{{"big": "{}"}}"#, "x".repeat(300));
        let r = ask(&mut config, "PUT", "/mmds", &big);
        assert_eq!(r.status, 413);
        assert!(r.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .contains("limit of 200"));
        let r = ask(&mut config, "GET", "/vm/config", "");
        assert_eq!(r.body.unwrap()["mmds-config"]["version"], "V2");
    }
}
