//! Builds and starts a microVM from a configuration, in the order KVM requires: VM and
//! interrupt controllers, memory, devices, kernel and boot structures, then vCPUs.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::legacy::{
    BootTimer, ConsoleSignalFilter, I8042Args, I8042Device, I8042State, InvocationSignal,
    ReplayControl, ReplayReport, SerialArgs, SerialDevice, SerialSnapshot, BOOT_TIMER_PORT,
    COM1_IRQ, COM1_PORT, COM1_PORT_LEN, I8042_PORT, I8042_PORT_LEN, REPLAY_CONTROL_ADDR,
    REPLAY_CONTROL_LEN,
};
use devices::virtio::block::{Block, BlockError};
use devices::virtio::net::{Net, NetError};
use devices::virtio::rng::{Rng, RngError};
use devices::virtio::vsock::{Vsock, VsockError};

use crate::arch::cpu_template::{self, CpuTemplateError, CustomCpuTemplate};
use crate::config::CpuConfigSource;
use devices::{Bus, EventFdTrigger, Persist};
use kvm_ioctls::{Cap, Kvm};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::cpuid::Topology;
use crate::arch::{boot_params, mptable};
use crate::config::{ConfigError, DriveConfig, VmConfig};
use crate::console::StdinToSerial;
use crate::device_manager::{DeviceManagerError, MmioDeviceManager};
use crate::loader::{self, LoaderError};
use crate::memory::{self, MemoryError};

use crate::microvm::{MicroVm, Subscriber};
use crate::reap::Recorder;
use crate::uffd::StopHandlersOnDrop;
use crate::vcpu::{ExitSignal, RunControl, Vcpu, VcpuError, VcpuGroup};
use crate::vm::{Vm, VmError};

const I8042_KBD_IRQ: u32 = 1;
/// The entropy device's id on the MMIO bus and in snapshots (it is attached after the
/// network interfaces).
pub(crate) const ENTROPY_ID: &str = "entropy";
/// The vsock device's id in snapshots (Firecracker's `vsock_id` is deprecated and ignored).
pub(crate) const VSOCK_ID: &str = "vsock";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open /dev/kvm: {0} (is KVM available, and may this user use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error("this host's KVM lacks {0}, which reapvm needs")]
    MissingCapability(&'static str),
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("boot parameters: {0}")]
    BootParams(#[from] boot_params::BootParamsError),
    #[error("MP table: {0}")]
    Mptable(#[from] mptable::MptableError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Serial(#[from] devices::legacy::SerialError),
    #[error("cannot list the MSRs to save: {0}")]
    MsrList(crate::vstate::VcpuStateError),
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Rng(#[from] RngError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(transparent)]
    CpuTemplate(#[from] CpuTemplateError),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error("root drive {id} at {path} is not an ext2/3/4 filesystem (no ext superblock magic)")]
    RootNotExt4 { id: String, path: PathBuf },
    #[error("cannot read the superblock of root drive {id} at {path}: {source}")]
    RootRead {
        id: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an event fd for {what}: {source}")]
    EventFd {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot place {what} on the I/O bus: {source}")]
    Bus {
        what: &'static str,
        source: devices::BusError,
    },
}

/// How the VMM process around the VM behaves.
pub struct StartOptions {
    /// Where the guest's serial console goes.
    pub console_out: Box<dyn Write + Send>,
    /// Forward the VMM's stdin to the serial console.
    pub console_in: bool,
    /// Log `Guest-boot-time` when the guest signals boot completion.
    pub boot_timer: bool,
    /// When the VMM started (or the jailer's `--start-time-us`), for the boot time.
    pub start_time: devices::legacy::StartTime,
    /// Receives the boot time when the guest signals boot completion.
    pub ready: Option<Sender<Duration>>,
    /// The MMDS data store the API fills and the interfaces of `mmds-config` serve.
    pub mmds: crate::api::controller::SharedMmds,
}

fn event_fd(what: &'static str) -> Result<EventFd, BuildError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(|source| BuildError::EventFd { what, source })
}

/// Checks the configuration, builds the VM and starts its vCPUs. On error nothing is left
/// running: everything built so far is dropped.
pub fn build_and_start(config: &VmConfig, opts: StartOptions) -> Result<MicroVm, BuildError> {
    config.validate(memory::host_ram_bytes())?;
    let boot_source = config
        .boot_source
        .as_ref()
        .ok_or(ConfigError::MissingBootSource)?;
    // Open the images before touching KVM, so a wrong path fails first and cheaply.
    let kernel_path: PathBuf = boot_source.kernel_image_path.clone();
    let mut kernel_file = loader::open("kernel image", &kernel_path)?;
    let mut initrd = match &boot_source.initrd_path {
        Some(path) => Some((loader::open("initrd", path)?, path.clone())),
        None => None,
    };
    let mut cmdline = loader::build_cmdline(boot_source.boot_args())?;
    // Drives and taps are opened now too: a missing file or tap fails before KVM is touched.
    let (blocks, mut nets) = open_devices(config)?;
    connect_mmds(config, nets.iter_mut(), &opts.mmds)?;
    let vsock = match &config.vsock {
        Some(v) => Some(Vsock::new(u64::from(v.guest_cid), &v.uds_path)?),
        None => None,
    };
    // A template for the other vendor (or a file that does not parse) fails here too.
    let template = cpu_template_of(config)?;

    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::MissingCapability(name));
        }
    }
    let vcpu_count = config.vcpu_count();
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(vcpu_count) > max_vcpus {
        return Err(BuildError::TooManyVcpus {
            requested: vcpu_count,
            max: max_vcpus,
        });
    }
    let mut supported_cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(BuildError::SupportedCpuid)?;
    if let Some(template) = &template {
        template.check_kvm(&kvm)?;
        // Before reapvm's own normalisation, which owns topology, APIC ids and the like.
        template.apply_cpuid(&mut supported_cpuid)?;
    }
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);

    let vm = Vm::new(&kvm)?;
    let ram_size = config.mem_size_bytes();
    let guest_memory = memory::create_guest_memory(ram_size)?;
    vm.register_memory(&guest_memory, config.machine_config.track_dirty_pages)?;

    let legacy = legacy_devices(
        &vm,
        opts.console_out,
        opts.start_time,
        opts.boot_timer,
        opts.ready,
        None,
    )?;
    let pio_bus = legacy.bus.clone();
    let mut mmio = MmioDeviceManager::new();
    for block in blocks {
        let id = block.id().to_string();
        mmio.attach(&vm, &guest_memory, &id, Arc::new(Mutex::new(block)), None)?;
    }
    for net in nets {
        let id = net.id().to_string();
        mmio.attach(&vm, &guest_memory, &id, Arc::new(Mutex::new(net)), None)?;
    }
    if let Some(entropy) = &config.entropy {
        let rng = Rng::new(entropy.rate_limiter.unwrap_or_default())?;
        mmio.attach(
            &vm,
            &guest_memory,
            ENTROPY_ID,
            Arc::new(Mutex::new(rng)),
            None,
        )?;
    }
    if let Some(vsock) = vsock {
        mmio.attach(
            &vm,
            &guest_memory,
            VSOCK_ID,
            Arc::new(Mutex::new(vsock)),
            None,
        )?;
    }
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        let mode = if root.is_read_only { "ro" } else { "rw" };
        let device = match &root.partuuid {
            Some(uuid) => format!("PARTUUID={uuid}"),
            None => "/dev/vda".to_string(),
        };
        cmdline
            .insert_str(format!("root={device} {mode}"))
            .map_err(LoaderError::Cmdline)?;
    }
    for entry in mmio.cmdline_entries() {
        cmdline.insert_str(entry).map_err(LoaderError::Cmdline)?;
    }
    let mmio_bus = vcpu_mmio_bus(mmio.bus(), &legacy, config)?;

    // Kernel, command line, initrd, zero page, MP table.
    let kernel = loader::load_kernel(&guest_memory, &mut kernel_file, &kernel_path)?;
    let cmdline_size = loader::load_cmdline(&guest_memory, &cmdline)?;
    let initrd_placement = match initrd.as_mut() {
        Some((file, path)) => {
            let addr_max = kernel
                .setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|max| *max != 0)
                .unwrap_or(u64::MAX);
            Some(loader::load_initrd(
                &guest_memory,
                file,
                path,
                kernel.end,
                addr_max,
            )?)
        }
        None => None,
    };
    let params = boot_params::build(
        ram_size,
        kernel.setup_header,
        cmdline_size,
        initrd_placement,
    )?;
    boot_params::write(&guest_memory, &params)?;
    mptable::setup_mptable(&guest_memory, vcpu_count)?;

    let threads_per_core = if config.machine_config.smt && vcpu_count > 1 {
        2
    } else {
        1
    };
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    let mut msrs_to_save = None;
    for index in 0..vcpu_count {
        let mut vcpu = Vcpu::new(vm.fd(), index, pio_bus.clone(), mmio_bus.clone())?;
        vcpu.set_reset_line(legacy.reset_line()?);
        let topology = Topology {
            cpu_index: index,
            vcpu_count,
            threads_per_core,
        };
        vcpu.configure_for_boot(
            &guest_memory,
            &supported_cpuid,
            topology,
            tsc_deadline,
            kernel.entry,
        )?;
        give_msr_list(&kvm, &mut vcpu, &mut msrs_to_save)?;
        vcpus.push(vcpu);
    }
    if let Some(template) = &template {
        apply_template_msrs(template, &mut vcpus, msrs_to_save.as_deref())?;
    }

    let microvm = assemble(
        kvm,
        vm,
        guest_memory,
        legacy,
        mmio,
        vcpus,
        config.clone(),
        opts.console_in,
        RunControl::new(),
        exit_signal()?,
        None,
    )?;
    log::info!(
        "started: {} vCPU(s), {} MiB, kernel {} entry {:#x}",
        vcpu_count,
        ram_size >> 20,
        kernel_path.display(),
        kernel.entry
    );
    Ok(microvm)
}

/// The CPU template the configuration asks for: a custom one (`cpu-config`), else a static
/// one (`machine-config.cpu_template`) for this host's CPU.
fn cpu_template_of(config: &VmConfig) -> Result<Option<CustomCpuTemplate>, CpuTemplateError> {
    if let Some(source) = &config.cpu_config {
        return Ok(Some(match source {
            CpuConfigSource::Inline(template) => template.clone(),
            CpuConfigSource::Path(path) => CustomCpuTemplate::from_file(path)?,
        }));
    }
    match config.machine_config.cpu_template.as_deref() {
        None | Some("None") => Ok(None),
        Some(name) => {
            let (vendor, fms) = cpu_template::host_cpu();
            cpu_template::static_template(name, vendor, fms).map(Some)
        }
    }
}

/// Writes the template's MSRs, as vCPU 0 has them with its CPUID set and masked, to every
/// vCPU (the boot MSRs stay the boot's), and keeps them in the vCPUs' snapshot list.
fn apply_template_msrs(
    template: &CustomCpuTemplate,
    vcpus: &mut [Vcpu],
    msrs_to_save: Option<&Vec<u32>>,
) -> Result<(), BuildError> {
    let Some(first) = vcpus.first() else {
        return Ok(());
    };
    let boot: Vec<u32> = crate::arch::msr::boot_msr_entries()
        .iter()
        .map(|e| e.index)
        .collect();
    let entries = template.msr_entries(first.fd(), &boot)?;
    for vcpu in vcpus.iter() {
        cpu_template::set_msrs(vcpu.fd(), &entries)?;
    }
    if let Some(saved) = msrs_to_save {
        let mut list = saved.clone();
        for addr in template.msr_addrs() {
            if !list.contains(&addr) {
                list.push(addr);
            }
        }
        let list = Arc::new(list);
        for vcpu in vcpus.iter_mut() {
            vcpu.set_msrs_to_save(list.clone());
        }
    }
    Ok(())
}

/// The port I/O devices: serial (COM1), i8042 and the boot timer, with their irqfds.
pub(crate) struct LegacyDevices {
    pub bus: Bus,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub i8042: Arc<Mutex<I8042Device>>,
    /// The agent's "invocation answered" signal, seen in the console output.
    pub invocation_signal: InvocationSignal,
    pub reset_evt: EventFd,
    /// The replay guest's control page (an MMIO device; see `vcpu_mmio_bus`).
    pub replay: Arc<Mutex<ReplayControl>>,
}

impl LegacyDevices {
    /// A handle on the i8042's reset line, for a vCPU.
    pub(crate) fn reset_line(&self) -> Result<EventFd, BuildError> {
        self.reset_evt
            .try_clone()
            .map_err(|source| BuildError::EventFd {
                what: "the i8042 reset line",
                source,
            })
    }
}

/// The MMIO bus the vCPUs get: the virtio devices', and the replay control page when the
/// configuration asks for it (`replay-control`).
pub(crate) fn vcpu_mmio_bus(
    bus: &Bus,
    legacy: &LegacyDevices,
    config: &VmConfig,
) -> Result<Bus, BuildError> {
    let mut bus = bus.clone();
    if config.replay_control {
        bus.insert(
            legacy.replay.clone(),
            REPLAY_CONTROL_ADDR,
            REPLAY_CONTROL_LEN,
        )
        .map_err(|source| BuildError::Bus {
            what: "the replay control page",
            source,
        })?;
    }
    Ok(bus)
}

pub(crate) fn legacy_devices(
    vm: &Vm,
    console_out: Box<dyn Write + Send>,
    start_time: devices::legacy::StartTime,
    boot_timer: bool,
    ready: Option<Sender<Duration>>,
    saved: Option<(&SerialSnapshot, &I8042State)>,
) -> Result<LegacyDevices, BuildError> {
    let mut bus = Bus::new();
    let invocation_signal = InvocationSignal::default();
    let console_out: Box<dyn Write + Send> = Box::new(ConsoleSignalFilter::new(
        console_out,
        invocation_signal.clone(),
    ));
    let serial_irq = event_fd("the serial interrupt")?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let serial = match saved {
        Some((state, _)) => {
            let args = SerialArgs {
                interrupt: EventFdTrigger::new(serial_irq),
                out: console_out,
            };
            SerialDevice::restore(args, state)?
        }
        None => SerialDevice::new(EventFdTrigger::new(serial_irq), console_out),
    };
    let serial = Arc::new(Mutex::new(serial));
    bus.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)
        .map_err(|source| BuildError::Bus {
            what: "the serial port",
            source,
        })?;
    let reset_evt = event_fd("the i8042 reset line")?;
    let kbd_irq = event_fd("the keyboard interrupt")?;
    vm.register_irqfd(&kbd_irq, I8042_KBD_IRQ)?;
    let reset_trigger =
        EventFdTrigger::new(
            reset_evt
                .try_clone()
                .map_err(|source| BuildError::EventFd {
                    what: "the i8042 reset line",
                    source,
                })?,
        );
    let i8042 = match saved {
        Some((_, state)) => {
            let args = I8042Args {
                reset: reset_trigger,
                kbd_interrupt: EventFdTrigger::new(kbd_irq),
            };
            let Ok(i8042) = I8042Device::restore(args, state);
            i8042
        }
        None => I8042Device::new(reset_trigger, EventFdTrigger::new(kbd_irq)),
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    bus.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
        .map_err(|source| BuildError::Bus {
            what: "the i8042 controller",
            source,
        })?;
    let timer = Arc::new(Mutex::new(BootTimer::new(start_time, boot_timer, ready)));
    bus.insert(timer, BOOT_TIMER_PORT, 1)
        .map_err(|source| BuildError::Bus {
            what: "the boot timer",
            source,
        })?;
    // A restored replay guest goes at once; a booted one waits to be snapshotted.
    let report = ReplayReport::default();
    crate::metrics::metrics().replay.set(report.clone());
    crate::metrics::metrics()
        .agent
        .set(invocation_signal.clone());
    let replay = Arc::new(Mutex::new(ReplayControl::new(
        saved.is_some(),
        invocation_signal.clone(),
        report,
    )));
    Ok(LegacyDevices {
        bus,
        serial,
        i8042,
        invocation_signal,
        reset_evt,
        replay,
    })
}

/// What the VM's parts report their reason to stop to (the event loop wakes on it).
pub(crate) fn exit_signal() -> Result<Arc<ExitSignal>, BuildError> {
    ExitSignal::new()
        .map(Arc::new)
        .map_err(|source| BuildError::EventFd {
            what: "VM exits",
            source,
        })
}

/// Puts the parts together and starts the vCPU threads (running, or parked when `control`
/// says so).
#[allow(clippy::too_many_arguments)]
pub(crate) fn assemble(
    kvm: Kvm,
    vm: Vm,
    guest_memory: devices::GuestMemoryMmap,
    legacy: LegacyDevices,
    mut mmio: MmioDeviceManager,
    vcpus: Vec<Vcpu>,
    config: VmConfig,
    console_in: bool,
    control: RunControl,
    exit: Arc<ExitSignal>,
    restored: Option<(StopHandlersOnDrop, Option<Arc<Recorder>>)>,
) -> Result<MicroVm, BuildError> {
    let (memory_handlers, ws_recorder) = match restored {
        Some((handlers, recorder)) => (Some(handlers), recorder),
        None => (None, None),
    };
    let control = Arc::new(control);
    let mut subscribers: Vec<Subscriber> = mmio.take_subscribers();
    if console_in {
        subscribers.push(Arc::new(Mutex::new(StdinToSerial::new(
            legacy.serial.clone(),
        ))));
    }
    let cpu_vendor = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map(|c| format!("{:?}", crate::arch::cpuid::vendor_of(&c)))
        .map_err(BuildError::SupportedCpuid)?;
    let microvm = MicroVm {
        vcpus: Arc::new(VcpuGroup::new(control.clone())),
        exit: exit.clone(),
        reset_evt: legacy.reset_evt,
        i8042: legacy.i8042,
        serial: legacy.serial,
        devices: mmio.devices(),
        attached: mmio.attached(),
        subscribers,
        config,
        cpu_vendor,
        vm: Arc::new(vm),
        guest_memory,
        ws_recorder,
        _memory_handlers: memory_handlers,
        _kvm: kvm,
    };
    for vcpu in vcpus {
        // If a later thread fails to start, dropping `microvm` stops the ones already running.
        microvm
            .vcpus
            .push(vcpu.start(control.clone(), exit.clone())?);
    }
    Ok(microvm)
}

/// The drives in the order they are attached: the root first, so it becomes /dev/vda.
pub(crate) fn drives_in_order(config: &VmConfig) -> Vec<&DriveConfig> {
    let mut drives: Vec<_> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    drives
}

/// A root drive given by device name must hold an ext filesystem.
pub(crate) fn check_root_drive(drive: &DriveConfig) -> Result<(), BuildError> {
    if drive.is_root_device && drive.partuuid.is_none() {
        check_ext_superblock(&drive.drive_id, &drive.path_on_host)?;
    }
    Ok(())
}

/// Makes MMDS reachable through the interfaces `mmds-config` names, with its version.
pub(crate) fn connect_mmds<'a>(
    config: &VmConfig,
    nets: impl Iterator<Item = &'a mut Net>,
    store: &crate::api::controller::SharedMmds,
) -> Result<(), BuildError> {
    let Some(mmds) = &config.mmds_config else {
        return Ok(());
    };
    store
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .configure(mmds.version, mmds.imds_compat);
    for net in nets.filter(|n| mmds.serves(n.id())) {
        let stack = devices::mmds::MmdsStack::new(mmds.ipv4(), store.clone());
        net.set_mmds(stack)?;
        log::info!(
            "MMDS {:?} at {} through network interface {}",
            mmds.version,
            mmds.ipv4(),
            net.id()
        );
    }
    Ok(())
}

/// Opens every drive (root first) and every tap.
fn open_devices(config: &VmConfig) -> Result<(Vec<Block>, Vec<Net>), BuildError> {
    let drives = drives_in_order(config);
    let mut blocks = Vec::with_capacity(drives.len());
    for d in drives {
        check_root_drive(d)?;
        blocks.push(Block::new(
            &d.drive_id,
            &d.path_on_host,
            d.is_read_only,
            d.rate_limiter.unwrap_or_default(),
        )?);
    }
    let mut nets = Vec::with_capacity(config.network_interfaces.len());
    for n in &config.network_interfaces {
        nets.push(Net::new(
            &n.iface_id,
            &n.host_dev_name,
            n.guest_mac.as_deref(),
            n.rx_rate_limiter.unwrap_or_default(),
            n.tx_rate_limiter.unwrap_or_default(),
        )?);
    }
    Ok((blocks, nets))
}

/// A root drive that is not an ext filesystem would only make the guest kernel panic
/// ("VFS: Unable to mount root fs"); say so before booting.
fn check_ext_superblock(id: &str, path: &std::path::Path) -> Result<(), BuildError> {
    use std::os::unix::fs::FileExt;
    const EXT_MAGIC_OFFSET: u64 = 1024 + 56;
    const EXT_MAGIC: u16 = 0xef53;
    let file = std::fs::File::open(path).map_err(|source| BlockError::Open {
        id: id.to_string(),
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 2];
    match file.read_exact_at(&mut magic, EXT_MAGIC_OFFSET) {
        Ok(()) if u16::from_le_bytes(magic) == EXT_MAGIC => Ok(()),
        Ok(()) => Err(BuildError::RootNotExt4 {
            id: id.to_string(),
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(BuildError::RootNotExt4 {
            id: id.to_string(),
            path: path.to_path_buf(),
        }),
        Err(source) => Err(BuildError::RootRead {
            id: id.to_string(),
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Gives `vcpu` the list of MSRs its saved state carries. Which MSRs can be read depends on
/// the CPUID the vCPU now has, so the list is probed on the first vCPU and shared.
pub(crate) fn give_msr_list(
    kvm: &Kvm,
    vcpu: &mut Vcpu,
    cache: &mut Option<Arc<Vec<u32>>>,
) -> Result<(), BuildError> {
    let msrs = match cache {
        Some(msrs) => msrs.clone(),
        None => {
            let msrs = Arc::new(
                crate::vstate::vcpu_state::msrs_to_save(kvm, vcpu.fd())
                    .map_err(BuildError::MsrList)?,
            );
            *cache = Some(msrs.clone());
            msrs
        }
    };
    vcpu.set_msrs_to_save(msrs);
    Ok(())
}
