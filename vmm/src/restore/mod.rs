//! Restoring a microVM from a snapshot, top to bottom: read and check the vmstate
//! ([`load_snapshot`]), set up memory from the chosen backend ([`memory::guest_memory`]),
//! then KVM, devices and vCPUs as saved ([`restore_vm`]). The boot path's counterpart is
//! `builder::build_and_start`; both end in `builder::assemble`.

pub mod backend;
pub mod memory;

pub use backend::{LoadSnapshotParams, MemoryBackend, NetworkOverride, VsockOverride};
pub use memory::{MemoryRestoreContext, MemoryRestoreError, RestoredMemory};

use std::sync::{Arc, Mutex};
use std::time::Instant;

use devices::virtio::block::{Block, BlockArgs};
use devices::virtio::net::{Net, NetArgs};
use devices::virtio::rng::Rng;
use devices::virtio::vsock::{Vsock, VsockArgs};
use devices::virtio::VirtioDeviceState;
use devices::Persist;
use kvm_ioctls::{Cap, Kvm};

use crate::arch::cpuid::Topology;
use crate::builder::{self, BuildError, StartOptions};
use crate::config::{ConfigError, VmConfig};
use crate::device_manager::{MmioDeviceManager, MmioSlot};
use crate::metrics;
use crate::microvm::MicroVm;
use crate::persist::{self, DeviceState, MicrovmState, PersistError};
use crate::reap;
use crate::vcpu::{RunControl, Vcpu};
use crate::vm::Vm;
use crate::vstate::{VcpuStateError, VmStateError};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Vmstate(#[from] PersistError),
    #[error("cannot start the WS reader: {0}")]
    WsReader(std::io::Error),
    #[error(transparent)]
    Memory(#[from] MemoryRestoreError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the snapshot's configuration is not valid: {0}")]
    Config(ConfigError),
    #[error("the snapshot's memory regions {saved} are not those of its {mem_size_mib} MiB configuration ({expected})")]
    MemoryLayout {
        saved: String,
        expected: String,
        mem_size_mib: u64,
    },
    #[error("vsock_override is given, but the snapshot has no vsock device")]
    VsockOverride,
    #[error("network_overrides names {iface_id}, which the snapshot does not have")]
    UnknownOverride { iface_id: String },
    #[error("container_snapshot_path {path} is for the one drive besides the root drive, but the snapshot has {drives} drives besides it")]
    ContainerDrive {
        path: std::path::PathBuf,
        drives: usize,
    },
    #[error("the snapshot holds {saved} vCPU states for {configured} vCPUs")]
    VcpuCount { saved: usize, configured: u8 },
    #[error("the snapshot was taken on a {snapshot} CPU, this host is {host}")]
    CpuVendor { snapshot: String, host: String },
    #[error("this host's CPU lacks features the snapshot's vCPUs had: {}", .0.join(", "))]
    CpuFeatures(Vec<String>),
    #[error("cannot restore the VM's KVM state: {0}")]
    VmState(#[from] VmStateError),
    #[error("cannot restore vCPU {index}: {source}")]
    VcpuState {
        index: usize,
        source: VcpuStateError,
    },
    #[error(
        "device order differs: the snapshot has {saved} where the configuration has {configured}"
    )]
    DeviceOrder { saved: String, configured: String },
    #[error("the snapshot has no state for device {0}")]
    DeviceMissing(String),
    #[error("the snapshot has a device {0} the configuration lacks")]
    DeviceExtra(String),
    #[error("the configuration's {configured} {id} is the snapshot's {saved}")]
    DeviceMismatch {
        id: String,
        configured: &'static str,
        saved: String,
    },
    #[error("device {id} landed at {addr:#x} IRQ {irq}, the snapshot had it at {saved_addr:#x} IRQ {saved_irq}")]
    DeviceSlot {
        id: String,
        addr: u64,
        irq: u32,
        saved_addr: u64,
        saved_irq: u32,
    },
}

/// `PUT /snapshot/load`: reads and checks the vmstate, then builds the VM from it. Returns
/// the VM and the configuration it now runs with.
pub fn load_snapshot(
    params: &LoadSnapshotParams,
    opts: StartOptions,
) -> Result<(MicroVm, VmConfig), RestoreError> {
    let started = Instant::now();
    // Beyond the paper: the WS file is read while the vmstate, KVM and devices are restored.
    let ws_prefetch = match params.mem_backend.reap() {
        Some((ws_path, options)) if options.reads_in_parallel() => {
            let ws_limit = params.mem_backend.mem_path().map_or(0, reap::ws_size_limit);
            Some(
                reap::spawn_fetch(ws_path, options.o_direct, ws_limit, options.streaming)
                    .map_err(RestoreError::WsReader)?,
            )
        }
        _ => None,
    };
    let (state, vmstate_checksum) = persist::read_vmstate(&params.snapshot_path)?;
    let vmstate_load = started.elapsed();
    let context = MemoryRestoreContext {
        vmstate_load,
        vmstate_checksum,
        ws_prefetch,
    };
    let (vm, config) = restore_vm(&state, params, context, opts)?;
    metrics::metrics()
        .latencies_us
        .load_snapshot
        .set_elapsed_us(started);
    log::info!(
        "snapshot loaded in {} us (vmstate read and checked in {} us)",
        started.elapsed().as_micros(),
        vmstate_load.as_micros()
    );
    Ok((vm, config))
}

/// Builds a VM from a snapshot's state: KVM and device state as saved, memory from the
/// backend, taps renamed by the overrides. Nothing is left running on error.
pub fn restore_vm(
    state: &MicrovmState,
    params: &LoadSnapshotParams,
    context: MemoryRestoreContext,
    opts: StartOptions,
) -> Result<(MicroVm, VmConfig), RestoreError> {
    let config = restored_config(state, params)?;
    // Drives and taps first: a missing file, or a tap that cannot be made, fails before
    // KVM is touched.
    let mut devices = restore_devices(&config, state)?;
    // The data store is not in the snapshot (Firecracker's rule: a clone is given its own
    // data); the configuration is.
    builder::connect_mmds(
        &config,
        devices.nets.iter_mut().map(|(net, _)| net),
        &opts.mmds,
    )?;

    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    check_cpu(&kvm, state)?;
    let vm = Vm::new(&kvm).map_err(BuildError::from)?;
    // Before memory: a fault loop that cannot serve a page stops the VM through it.
    let exit = builder::exit_signal()?;
    let memory = memory::guest_memory(&params.mem_backend, state, context, &exit)?;
    vm.register_memory(
        &memory.guest_memory,
        config.machine_config.track_dirty_pages,
    )
    .map_err(BuildError::from)?;
    state.vm.restore(vm.fd())?;

    let legacy = builder::legacy_devices(
        &vm,
        opts.console_out,
        opts.start_time,
        opts.boot_timer,
        opts.ready,
        Some((&state.serial, &state.i8042)),
    )?;
    let mut mmio = MmioDeviceManager::new();
    for (block, saved) in devices.blocks {
        attach_saved(&mut mmio, &vm, &memory.guest_memory, saved, block)?;
    }
    for (net, saved) in devices.nets {
        attach_saved(&mut mmio, &vm, &memory.guest_memory, saved, net)?;
    }
    if let Some((rng, saved)) = devices.rng {
        attach_saved(&mut mmio, &vm, &memory.guest_memory, saved, rng)?;
    }
    if let Some((vsock, saved)) = devices.vsock {
        attach_saved(&mut mmio, &vm, &memory.guest_memory, saved, vsock)?;
    }

    let mmio_bus = builder::vcpu_mmio_bus(mmio.bus(), &legacy, &config)?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    let mut msrs_to_save = None;
    for (index, vcpu_state) in state.vcpus.iter().enumerate() {
        let mut vcpu = Vcpu::new(vm.fd(), index as u8, legacy.bus.clone(), mmio_bus.clone())
            .map_err(BuildError::from)?;
        vcpu.set_reset_line(legacy.reset_line()?);
        vcpu.restore_state(vcpu_state)
            .map_err(|source| RestoreError::VcpuState { index, source })?;
        builder::give_msr_list(&kvm, &mut vcpu, &mut msrs_to_save)?;
        // What the snapshot carried stays in the next one (a CPU template's MSR that KVM's
        // list lacks).
        if let Some(list) = &msrs_to_save {
            let extra: Vec<u32> = vcpu_state
                .msrs
                .iter()
                .map(|e| e.index)
                .filter(|i| !list.contains(i))
                .collect();
            if !extra.is_empty() {
                let mut all = (**list).clone();
                all.extend(extra);
                vcpu.set_msrs_to_save(Arc::new(all));
            }
        }
        vcpus.push(vcpu);
    }
    let control = if params.resume_vm {
        RunControl::new()
    } else {
        // Paused means the devices too: none may touch guest memory (a frame from the tap,
        // a vsock event) before PATCH /vm Resumed.
        for device in mmio.devices() {
            device.lock().unwrap_or_else(|p| p.into_inner()).pause();
        }
        RunControl::new_paused()
    };
    let recorder = memory.recorder.clone();
    legacy.invocation_signal.set_hook(Box::new(move || {
        metrics::metrics().memory_restore.invocation_answered();
        if let Some(recorder) = &recorder {
            recorder.stop("the guest answered an invocation");
        }
    }));
    // Before the vCPUs start: the restore time is what first_response_us counts from, and a
    // fast guest may answer (or a replay guest finish) before assemble returns.
    metrics::metrics()
        .memory_restore
        .set(memory.report, memory.live_faults);
    let microvm = builder::assemble(
        kvm,
        vm,
        memory.guest_memory,
        legacy,
        mmio,
        vcpus,
        config.clone(),
        opts.console_in,
        control,
        exit,
        Some((memory.handlers, memory.recorder)),
    )?;
    log::info!(
        "restored from a snapshot: {} vCPU(s), {} MiB, memory backend {:?} ({})",
        state.vcpus.len(),
        state.config.machine_config.mem_size_mib,
        params.mem_backend,
        if params.resume_vm {
            "running"
        } else {
            "paused"
        }
    );
    Ok((microvm, config))
}

/// The saved configuration with this load's dirty page tracking and tap overrides.
fn restored_config(
    state: &MicrovmState,
    params: &LoadSnapshotParams,
) -> Result<VmConfig, RestoreError> {
    check_saved_state(state)?;
    let mut config = state.config.clone();
    config.machine_config.track_dirty_pages = params.track_dirty_pages;
    for o in &params.network_overrides {
        let iface = config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == o.iface_id)
            .ok_or_else(|| RestoreError::UnknownOverride {
                iface_id: o.iface_id.clone(),
            })?;
        iface.host_dev_name = o.host_dev_name.clone();
    }
    if let Some(o) = &params.vsock_override {
        let vsock = config.vsock.as_mut().ok_or(RestoreError::VsockOverride)?;
        vsock.uds_path = o.uds_path.clone();
    }
    if let Some(path) = &params.container_snapshot_path {
        back_container_drive(&mut config, path)?;
    }
    Ok(config)
}

/// vHive's `container_snapshot_path`: `path` backs the one drive that is not the root drive.
fn back_container_drive(config: &mut VmConfig, path: &std::path::Path) -> Result<(), RestoreError> {
    let mut container = config.drives.iter_mut().filter(|d| !d.is_root_device);
    match (container.next(), container.next()) {
        (Some(drive), None) => {
            drive.path_on_host = path.to_path_buf();
            Ok(())
        }
        _ => Err(RestoreError::ContainerDrive {
            path: path.to_path_buf(),
            drives: config.drives.iter().filter(|d| !d.is_root_device).count(),
        }),
    }
}

/// A vmstate is untrusted input: its configuration is checked as a new one would be, its
/// memory must be laid out as that configuration lays it out, and it must hold one state
/// per configured vCPU. Needs no KVM: the fuzz target `vmstate` runs it.
pub fn check_saved_state(state: &MicrovmState) -> Result<(), RestoreError> {
    state
        .config
        .validate(crate::memory::host_ram_bytes())
        .map_err(RestoreError::Config)?;
    check_memory_layout(&state.config, &state.memory)?;
    if state.vcpus.len() != usize::from(state.config.vcpu_count()) {
        return Err(RestoreError::VcpuCount {
            saved: state.vcpus.len(),
            configured: state.config.vcpu_count(),
        });
    }
    Ok(())
}

/// The saved memory regions must be those the builder gives the saved configuration.
fn check_memory_layout(
    config: &VmConfig,
    saved: &[persist::MemoryRegionState],
) -> Result<(), RestoreError> {
    let ranges = crate::memory::ram_ranges(config.mem_size_bytes());
    let expected = persist::layout_of(ranges.iter().map(|(a, len)| (a.0, *len as u64)));
    if saved != expected.as_slice() {
        return Err(RestoreError::MemoryLayout {
            saved: format!("{saved:?}"),
            expected: format!("{expected:?}"),
            mem_size_mib: config.machine_config.mem_size_mib,
        });
    }
    Ok(())
}

/// The saved vCPUs' vendor and CPU features must be this host's.
fn check_cpu(kvm: &Kvm, state: &MicrovmState) -> Result<(), RestoreError> {
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    let host = format!("{:?}", crate::arch::cpuid::vendor_of(&supported));
    if host != state.cpu_vendor {
        return Err(RestoreError::CpuVendor {
            snapshot: state.cpu_vendor.clone(),
            host,
        });
    }
    let Some(saved) = state.vcpus.first() else {
        return Ok(());
    };
    let vcpu_count = state.config.vcpu_count();
    let topology = Topology {
        cpu_index: 0,
        vcpu_count,
        threads_per_core: if state.config.machine_config.smt && vcpu_count > 1 {
            2
        } else {
            1
        },
    };
    let mut normalized = supported.clone();
    crate::arch::cpuid::normalize(
        &mut normalized,
        topology,
        kvm.check_extension(Cap::TscDeadlineTimer),
    );
    let host_features = crate::arch::cpuid::host_cpu_features();
    let mut missing =
        crate::arch::cpuid::missing_features(&saved.cpuid, normalized.as_slice(), &host_features);
    if !missing.is_empty() && host_features.is_empty() {
        // No /sys to tell a kvm-pvm host (in a jail, say): ask one of this host's vCPUs
        // what it reports. On hardware KVM that is the supported set again.
        if let Ok(reported) = crate::arch::cpuid::vcpu_reported_features(kvm, &supported) {
            missing = crate::arch::cpuid::missing_features(
                &saved.cpuid,
                normalized.as_slice(),
                &reported,
            );
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(RestoreError::CpuFeatures(missing))
    }
}

/// The configured devices, each built from its saved state, in the order they were
/// attached (the root drive, the other drives, the network interfaces) with that state.
struct RestoredDevices<'a> {
    blocks: Vec<(Block, &'a DeviceState)>,
    nets: Vec<(Net, &'a DeviceState)>,
    rng: Option<(Rng, &'a DeviceState)>,
    vsock: Option<(Vsock, &'a DeviceState)>,
}

fn restore_devices<'a>(
    config: &VmConfig,
    state: &'a MicrovmState,
) -> Result<RestoredDevices<'a>, RestoreError> {
    let mut saved = state.devices.iter();
    let mut blocks = Vec::with_capacity(config.drives.len());
    for drive in builder::drives_in_order(config) {
        builder::check_root_drive(drive)?;
        let id = &drive.drive_id;
        let dev = next_saved(&mut saved, id)?;
        let block = match &dev.device {
            Some(VirtioDeviceState::Block(s)) if &s.id == id => {
                let args = BlockArgs {
                    path: drive.path_on_host.clone(),
                };
                Block::restore(args, s).map_err(BuildError::from)?
            }
            // A vmstate from before devices saved their own state.
            None => Block::new(
                id,
                &drive.path_on_host,
                drive.is_read_only,
                drive.rate_limiter.unwrap_or_default(),
            )
            .map_err(BuildError::from)?,
            Some(other) => return Err(device_mismatch(id, "drive", other)),
        };
        blocks.push((block, dev));
    }
    let mut nets = Vec::with_capacity(config.network_interfaces.len());
    for iface in &config.network_interfaces {
        let id = &iface.iface_id;
        let dev = next_saved(&mut saved, id)?;
        let net = match &dev.device {
            Some(VirtioDeviceState::Net(s)) if &s.id == id => {
                let args = NetArgs {
                    tap_name: iface.host_dev_name.clone(),
                };
                Net::restore(args, s).map_err(BuildError::from)?
            }
            None => Net::new(
                id,
                &iface.host_dev_name,
                iface.guest_mac.as_deref(),
                iface.rx_rate_limiter.unwrap_or_default(),
                iface.tx_rate_limiter.unwrap_or_default(),
            )
            .map_err(BuildError::from)?,
            Some(other) => return Err(device_mismatch(id, "network interface", other)),
        };
        nets.push((net, dev));
    }
    let rng = match &config.entropy {
        None => None,
        Some(entropy) => {
            let dev = next_saved(&mut saved, builder::ENTROPY_ID)?;
            let rng = match &dev.device {
                Some(VirtioDeviceState::Rng(s)) => Rng::restore((), s),
                None => Rng::new(entropy.rate_limiter.unwrap_or_default()),
                Some(other) => {
                    return Err(device_mismatch(
                        builder::ENTROPY_ID,
                        "entropy device",
                        other,
                    ))
                }
            }
            .map_err(BuildError::from)?;
            Some((rng, dev))
        }
    };
    let vsock = match &config.vsock {
        None => None,
        Some(vsock) => {
            let dev = next_saved(&mut saved, builder::VSOCK_ID)?;
            let args = VsockArgs {
                uds_path: vsock.uds_path.clone(),
            };
            let device = match &dev.device {
                Some(VirtioDeviceState::Vsock(s)) => Vsock::restore(args, s),
                None => return Err(RestoreError::DeviceMissing(builder::VSOCK_ID.into())),
                Some(other) => {
                    return Err(device_mismatch(builder::VSOCK_ID, "vsock device", other))
                }
            }
            .map_err(BuildError::from)?;
            Some((device, dev))
        }
    };
    if let Some(extra) = saved.next() {
        return Err(RestoreError::DeviceExtra(extra.id.clone()));
    }
    Ok(RestoredDevices {
        blocks,
        nets,
        rng,
        vsock,
    })
}

fn device_mismatch(id: &str, configured: &'static str, saved: &VirtioDeviceState) -> RestoreError {
    let saved = match saved {
        VirtioDeviceState::Block(s) => format!("drive {}", s.id),
        VirtioDeviceState::Net(s) => format!("network interface {}", s.id),
        VirtioDeviceState::Rng(_) => "entropy device".to_string(),
        VirtioDeviceState::Vsock(_) => "vsock device".to_string(),
    };
    RestoreError::DeviceMismatch {
        id: id.to_string(),
        configured,
        saved,
    }
}

fn next_saved<'a>(
    saved: &mut std::slice::Iter<'a, DeviceState>,
    id: &str,
) -> Result<&'a DeviceState, RestoreError> {
    match saved.next() {
        Some(dev) if dev.id == id => Ok(dev),
        Some(dev) => Err(RestoreError::DeviceOrder {
            saved: dev.id.clone(),
            configured: id.to_string(),
        }),
        None => Err(RestoreError::DeviceMissing(id.to_string())),
    }
}

/// Attaches a restored device with its transport's saved state; it must land at the MMIO
/// slot it had.
fn attach_saved<D>(
    mmio: &mut MmioDeviceManager,
    vm: &Vm,
    mem: &devices::GuestMemoryMmap,
    saved: &DeviceState,
    device: D,
) -> Result<(), RestoreError>
where
    D: devices::virtio::VirtioDevice + Persist + event_manager::MutEventSubscriber + Send + 'static,
    D::State: Into<VirtioDeviceState>,
{
    let slot = mmio
        .attach(
            vm,
            mem,
            &saved.id,
            Arc::new(Mutex::new(device)),
            Some(&saved.transport),
        )
        .map_err(BuildError::from)?;
    check_slot(&slot, saved)
}

fn check_slot(slot: &MmioSlot, saved: &DeviceState) -> Result<(), RestoreError> {
    if slot.addr != saved.addr || slot.irq != saved.irq {
        return Err(RestoreError::DeviceSlot {
            id: slot.id.clone(),
            addr: slot.addr,
            irq: slot.irq,
            saved_addr: saved.addr,
            saved_irq: saved.irq,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::layout::{MMIO_GAP_START, RAM_ABOVE_GAP_START};
    use persist::MemoryRegionState;

    fn config(mem_size_mib: u64) -> VmConfig {
        let mut config = VmConfig::default();
        config.machine_config.mem_size_mib = mem_size_mib;
        config
    }

    #[test]
    fn the_container_path_backs_the_one_drive_besides_the_root() {
        let drive = |id: &str, root: bool| crate::config::DriveConfig {
            drive_id: id.into(),
            path_on_host: format!("/old/{id}").into(),
            is_root_device: root,
            is_read_only: false,
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        let new = std::path::Path::new("/dev/mapper/snap-7");
        let mut one = config(128);
        one.drives = vec![drive("rootfs", true), drive("ctr", false)];
        back_container_drive(&mut one, new).unwrap();
        assert_eq!(one.drives[1].path_on_host, new);
        assert_eq!(
            one.drives[0].path_on_host,
            std::path::Path::new("/old/rootfs")
        );
        for drives in [
            vec![drive("rootfs", true)],
            vec![drive("rootfs", true), drive("a", false), drive("b", false)],
        ] {
            let mut c = config(128);
            c.drives = drives;
            let before = c.clone();
            let e = back_container_drive(&mut c, new).unwrap_err().to_string();
            let others = before.drives.len() - 1;
            assert!(
                e.contains("/dev/mapper/snap-7") && e.contains(&format!("has {others} drives")),
                "{e}"
            );
            assert_eq!(c, before, "a refused path changes nothing");
        }
    }

    #[test]
    fn saved_memory_must_be_laid_out_as_its_configuration_says() {
        let small = [MemoryRegionState {
            guest_addr: 0,
            size: 128 << 20,
            file_offset: 0,
        }];
        check_memory_layout(&config(128), &small).unwrap();
        // Memory on both sides of the MMIO gap.
        let above = (4096 << 20) - MMIO_GAP_START;
        let large = [
            MemoryRegionState {
                guest_addr: 0,
                size: MMIO_GAP_START,
                file_offset: 0,
            },
            MemoryRegionState {
                guest_addr: RAM_ABOVE_GAP_START,
                size: above,
                file_offset: MMIO_GAP_START,
            },
        ];
        check_memory_layout(&config(4096), &large).unwrap();
        // Forged: a region larger than the configuration, one moved, one shifted in the
        // file, one more, one fewer.
        let mut bigger = small;
        bigger[0].size += 4096;
        let mut moved = small;
        moved[0].guest_addr = 0x1000;
        let mut shifted = large;
        shifted[1].file_offset += 4096;
        for (cfg, saved) in [
            (128, &bigger[..]),
            (128, &moved[..]),
            (4096, &shifted[..]),
            (128, &large[..]),
            (4096, &large[..1]),
        ] {
            assert!(
                matches!(
                    check_memory_layout(&config(cfg), saved),
                    Err(RestoreError::MemoryLayout { .. })
                ),
                "{saved:?} accepted for {cfg} MiB"
            );
        }
    }
}
