//! The virtio-mmio transport (virtio 1.2, 4.2.2): registers, the device-status state
//! machine, feature negotiation, queue set-up, interrupt status and reset.

use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::{BusDevice, Persist};

pub const MMIO_LEN: u64 = 0x1000;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5245_4150; // "REAP"
/// Offset of QueueNotify: the VMM puts an ioeventfd here for each queue.
pub const NOTIFY_OFFSET: u64 = 0x50;
const CONFIG_OFFSET: u64 = 0x100;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("cannot create the notification event of queue {queue}: {source}")]
    QueueEvent {
        queue: usize,
        source: std::io::Error,
    },
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {queue} is invalid: {reason}")]
    BadQueue { queue: usize, reason: String },
    #[error("the device refused its saved queues: {0}")]
    Activate(String),
    #[error(
        "saved driver features {acked:#x} include some the device never offers ({offered:#x})"
    )]
    Features { acked: u64, offered: u64 },
}

/// A queue in a snapshot (virtio-queue's QueueState, which has no serde of its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The transport's registers and its device's queues, in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioTransportState {
    pub device_status: u32,
    pub driver_features: u64,
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    device_status: u32,
    config_generation: u32,
}

fn lock(device: &Mutex<dyn VirtioDevice>) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a restored transport needs besides its state.
pub struct MmioTransportArgs {
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
}

impl Persist for MmioTransport {
    type State = MmioTransportState;
    type ConstructorArgs = MmioTransportArgs;
    type Error = MmioError;

    /// The state to save; taken while the VM is paused. An active device reports its own
    /// queues, whose ring positions have moved on since activation.
    fn save(&self) -> MmioTransportState {
        let live = lock(&self.device).queue_states();
        let queues = live
            .unwrap_or_else(|| self.queues.iter().map(Queue::state).collect())
            .into_iter()
            .map(QueueSnapshot::from)
            .collect();
        MmioTransportState {
            device_status: self.device_status(),
            driver_features: self.driver_features,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// A transport in a saved state. Saved state is untrusted: each queue is checked (sizes,
    /// addresses inside guest memory) before an active device gets it back.
    fn restore(args: MmioTransportArgs, state: &MmioTransportState) -> Result<Self, MmioError> {
        let MmioTransportArgs {
            device,
            mem,
            interrupt,
        } = args;
        let mut transport = Self::new(device, mem, interrupt)?;
        let offered = lock(&transport.device).offered_features() | VIRTIO_F_VERSION_1;
        if state.driver_features & !offered != 0 {
            return Err(MmioError::Features {
                acked: state.driver_features,
                offered,
            });
        }
        if state.queues.len() != transport.queues.len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: transport.queues.len(),
            });
        }
        for (i, (saved, current)) in state
            .queues
            .iter()
            .zip(transport.queues.iter_mut())
            .enumerate()
        {
            if saved.max_size != current.max_size() {
                return Err(MmioError::BadQueue {
                    queue: i,
                    reason: format!(
                        "max size {} differs from the device's {}",
                        saved.max_size,
                        current.max_size()
                    ),
                });
            }
            let queue =
                Queue::try_from(QueueState::from(*saved)).map_err(|e| MmioError::BadQueue {
                    queue: i,
                    reason: e.to_string(),
                })?;
            if queue.ready() && !queue.is_valid(&transport.mem) {
                return Err(MmioError::BadQueue {
                    queue: i,
                    reason: "its rings lie outside guest memory".into(),
                });
            }
            *current = queue;
        }
        transport.device_status = state.device_status;
        transport.driver_features = state.driver_features;
        transport.queue_select = state.queue_select;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.config_generation = state.config_generation;
        transport.interrupt.set_status(state.interrupt_status);
        if state.device_status & status::DRIVER_OK != 0
            && state.device_status & status::DEVICE_NEEDS_RESET == 0
        {
            transport.activate();
            if transport.device_status & status::DEVICE_NEEDS_RESET != 0 {
                return Err(MmioError::Activate(format!(
                    "device {} could not be reactivated",
                    lock(&transport.device).device_type()
                )));
            }
        }
        Ok(transport)
    }
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, MmioError> {
        let max_sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(max_sizes.len());
        let mut queue_evts = Vec::with_capacity(max_sizes.len());
        for (queue, max) in max_sizes.iter().enumerate() {
            // Queue sizes come from our own devices: powers of two up to 32768.
            queues.push(Queue::new(*max).expect("device queue sizes are valid"));
            queue_evts.push(
                EventFd::new(libc::EFD_NONBLOCK)
                    .map_err(|source| MmioError::QueueEvent { queue, source })?,
            );
        }
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            device_status: 0,
            config_generation: 0,
        })
    }

    /// The device's configuration changed on the host's side (a drive swapped for another):
    /// a new configuration generation, and a configuration-change interrupt once the driver
    /// is up (virtio 1.2, 4.2.2 and 2.5.1).
    pub fn signal_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.device_status & status::DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// The notification event of each queue, for the VMM to bind as ioeventfds.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The status the driver reads: its own bits, and DEVICE_NEEDS_RESET once the device
    /// stopped serving.
    pub fn device_status(&self) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            status::DEVICE_NEEDS_RESET
        } else {
            0
        };
        self.device_status | needs_reset
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue registers are read-only once the driver is running.
        if self.device_status & status::DRIVER_OK != 0 {
            log::warn!("virtio-mmio: queue register write after DRIVER_OK ignored");
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => lock(&self.device).device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let features = lock(&self.device).offered_features() | VIRTIO_F_VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => self.device_status(),
            0xfc => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_select = value,
            0x20 => {
                if self.device_status & status::FEATURES_OK != 0 {
                    log::warn!("virtio-mmio: feature write after FEATURES_OK ignored");
                    return;
                }
                match self.driver_features_select {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_select = value,
            0x30 => self.queue_select = value,
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            // Reaches us only when no ioeventfd is bound (e.g. in unit tests).
            NOTIFY_OFFSET => match self.queue_evts.get(value as usize) {
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => log::warn!("virtio-mmio: notify for unknown queue {value}"),
            },
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => log::debug!("virtio-mmio: write of unknown register {offset:#x}"),
        }
    }

    /// The status state machine: 0 resets; otherwise each write may only add the next bit
    /// (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK), or FAILED.
    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        let current = self.device_status();
        if value & FAILED != 0 {
            self.device_status |= FAILED;
            return;
        }
        let added = value & !current;
        let keeps_old_bits = value & current == current;
        let next_allowed = match current {
            0 => ACKNOWLEDGE,
            ACKNOWLEDGE => DRIVER,
            x if x == ACKNOWLEDGE | DRIVER => FEATURES_OK,
            x if x == ACKNOWLEDGE | DRIVER | FEATURES_OK => DRIVER_OK,
            _ => 0,
        };
        if !keeps_old_bits || added != next_allowed {
            log::warn!("virtio-mmio: invalid status transition {current:#x} -> {value:#x} ignored");
            return;
        }
        match added {
            FEATURES_OK => {
                let offered = lock(&self.device).offered_features() | VIRTIO_F_VERSION_1;
                // A legacy driver, or one accepting what we never offered, cannot use us:
                // leave FEATURES_OK unset so the driver sees the refusal.
                if self.driver_features & VIRTIO_F_VERSION_1 == 0
                    || self.driver_features & !offered != 0
                {
                    log::warn!(
                        "virtio-mmio: refusing driver features {:#x} (offered {offered:#x})",
                        self.driver_features
                    );
                    return;
                }
                self.device_status = value;
            }
            DRIVER_OK => {
                self.device_status = value;
                self.activate();
            }
            _ => self.device_status = value,
        }
    }

    fn activate(&mut self) {
        // Every queue the device has must be ready and lie in guest memory: a device
        // serving a queue the driver never set up would read whatever its registers held.
        let mem = &self.mem;
        if let Some((i, _)) = self
            .queues
            .iter()
            .enumerate()
            .find(|(_, q)| !q.is_valid(mem))
        {
            log::error!(
                "virtio-mmio: queue {i} is not ready or not valid (size or addresses); device needs reset"
            );
            self.device_status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let queue_evts: Result<Vec<EventFd>, _> =
            self.queue_evts.iter().map(EventFd::try_clone).collect();
        let queue_evts = match queue_evts {
            Ok(evts) => evts,
            Err(e) => {
                log::error!("virtio-mmio: cannot duplicate queue events: {e}");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        // The device gets its own copies; the transport keeps the configuration it reports.
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect();
        let queues = match queues {
            Ok(q) => q,
            Err(e) => {
                log::error!("virtio-mmio: cannot copy the queue configuration: {e}");
                self.device_status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            queue_evts,
            acked_features: self.driver_features,
        };
        if let Err(e) = lock(&self.device).activate(ctx) {
            log::error!("virtio-mmio: device activation failed: {e}");
            self.device_status |= status::DEVICE_NEEDS_RESET;
            self.interrupt.signal_config_change();
        }
    }

    fn reset(&mut self) {
        if self.device_status & status::DRIVER_OK != 0 {
            lock(&self.device).reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.device_status = 0;
        self.driver_features = 0;
        self.driver_features_select = 0;
        self.device_features_select = 0;
        self.queue_select = 0;
        // After the device's own reset: it cannot flag the queues it no longer serves.
        self.interrupt.clear();
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::warn!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::warn!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        }
        let value = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        self.write_register(offset, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Dummy {
        config: [u8; 8],
        activated: Option<usize>,
        resets: usize,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 32]
        }
        fn offered_features(&self) -> u64 {
            1 << 5
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            if let Some(src) = self.config.get(start..start + data.len()) {
                data.copy_from_slice(src);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            if let Some(dst) = self.config.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), super::super::ActivateError> {
            self.activated = Some(ctx.queues.len());
            Ok(())
        }
        fn reset(&mut self) {
            self.resets += 1;
        }
        fn pause(&mut self) {}
        fn resume(&mut self) {}
        fn queue_states(&self) -> Option<Vec<QueueState>> {
            self.activated.map(|n| {
                (0..n)
                    .map(|i| QueueState {
                        max_size: [16, 32][i],
                        next_avail: 5,
                        next_used: 5,
                        size: 16,
                        ready: true,
                        desc_table: 0x1000 * (i as u64 + 1),
                        avail_ring: 0x1000 * (i as u64 + 1) + 0x100,
                        used_ring: 0x1000 * (i as u64 + 1) + 0x200,
                        ..Default::default()
                    })
                    .collect()
            })
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (MmioTransport::new(dev.clone(), mem, irq).unwrap(), dev)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, base: u64) {
        w(t, 0x30, index);
        w(t, 0x38, 16);
        w(t, 0x80, base as u32);
        w(t, 0x90, (base + 0x100) as u32);
        w(t, 0xa0, (base + 0x200) as u32);
        w(t, 0x44, 1);
    }

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0x00), 0x7472_6976);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), 42);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 32);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0, "no such queue");
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 in the high word");
    }

    #[test]
    fn full_negotiation_activates() {
        let (mut t, dev) = transport();
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, status::FEATURES_OK);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w(&mut t, 0x70, 0xf);
        assert_eq!(dev.lock().unwrap().activated, Some(2));
        assert_eq!(r(&mut t, 0x70), 0xf);
        // Queue registers are frozen now.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 8);
        assert_eq!(t.queues[0].size(), 16);
        // Reset returns to the initial state and tells the device.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(!t.queues[0].ready());
    }

    fn activated() -> (MmioTransport, Arc<Mutex<Dummy>>) {
        let (mut t, dev) = transport();
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w(&mut t, 0x70, 0xf);
        (t, dev)
    }

    #[test]
    fn state_round_trip_reactivates_with_ring_positions() {
        let (t, _) = activated();
        let saved = t.save();
        assert_eq!(
            saved.queues[0].next_avail, 5,
            "the device's live queue, not the transport's copy"
        );
        let json = serde_json::to_string(&saved).unwrap();
        let state: MmioTransportState = serde_json::from_str(&json).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dev = Arc::new(Mutex::new(Dummy::default()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let args = MmioTransportArgs {
            device: dev.clone(),
            mem,
            interrupt: irq,
        };
        let restored = MmioTransport::restore(args, &state).unwrap();
        assert_eq!(
            dev.lock().unwrap().activated,
            Some(2),
            "the device serves again"
        );
        assert_eq!(restored.save(), saved);
    }

    #[test]
    fn corrupt_queue_state_is_refused() {
        let (t, _) = activated();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let args = || MmioTransportArgs {
            device: Arc::new(Mutex::new(Dummy::default())),
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        };
        let mut bad = t.save();
        bad.queues[0].size = 3; // not a power of two
        assert!(matches!(
            MmioTransport::restore(args(), &bad),
            Err(MmioError::BadQueue { queue: 0, .. })
        ));
        let mut bad = t.save();
        bad.queues[1].used_ring = 0xffff_0000;
        assert!(MmioTransport::restore(args(), &bad).is_err());
        let mut bad = t.save();
        bad.driver_features |= 1 << 7;
        assert!(matches!(
            MmioTransport::restore(args(), &bad),
            Err(MmioError::Features { .. })
        ));
        let mut bad = t.save();
        bad.queues.pop();
        assert!(matches!(
            MmioTransport::restore(args(), &bad),
            Err(MmioError::QueueCount {
                saved: 1,
                device: 2
            })
        ));
    }

    #[test]
    fn out_of_order_status_and_bad_features_are_refused() {
        let (mut t, dev) = transport();
        w(&mut t, 0x70, status::DRIVER_OK);
        assert_eq!(r(&mut t, 0x70), 0, "DRIVER_OK before ACKNOWLEDGE");
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        // No VERSION_1: a legacy driver is refused.
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        // A feature never offered is refused too.
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 7);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        assert_eq!(dev.lock().unwrap().activated, None);
    }

    #[test]
    fn invalid_queue_needs_reset() {
        let (mut t, dev) = transport();
        for s in [1, 3] {
            w(&mut t, 0x70, s);
        }
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 0xb);
        // Descriptor table outside guest memory.
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, 0xfff0_0000);
        w(&mut t, 0x44, 1);
        w(&mut t, 0x70, 0xf);
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(dev.lock().unwrap().activated, None);
    }

    #[test]
    fn a_queue_not_ready_at_driver_ok_needs_reset() {
        let (mut t, dev) = transport();
        for s in [1, 3] {
            w(&mut t, 0x70, s);
        }
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, 0xb);
        // Queue 1 is never set up.
        setup_queue(&mut t, 0, 0x1000);
        w(&mut t, 0x70, 0xf);
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(dev.lock().unwrap().activated, None);
    }

    #[test]
    fn a_device_that_stopped_reports_needs_reset_until_the_driver_resets_it() {
        let (mut t, dev) = activated();
        t.interrupt.device_needs_reset();
        assert_eq!(r(&mut t, 0x70), 0xf | status::DEVICE_NEEDS_RESET);
        assert_ne!(r(&mut t, 0x60) & super::super::INT_CONFIG_CHANGE, 0);
        // A snapshot keeps the flag, and the restored device is not served again.
        let saved = t.save();
        assert_ne!(saved.device_status & status::DEVICE_NEEDS_RESET, 0);
        let restored_dev = Arc::new(Mutex::new(Dummy::default()));
        let args = MmioTransportArgs {
            device: restored_dev.clone(),
            mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        };
        let mut restored = MmioTransport::restore(args, &saved).unwrap();
        assert_eq!(restored_dev.lock().unwrap().activated, None);
        assert_ne!(r(&mut restored, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        // Only a reset clears it; the driver may then start over.
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x60), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        assert_eq!(r(&mut t, 0x70), status::ACKNOWLEDGE);
    }

    #[test]
    fn config_space_and_interrupt_ack() {
        let (mut t, _) = transport();
        t.write(0x102, &[0xab]);
        let mut b = [0u8; 1];
        t.read(0x102, &mut b);
        assert_eq!(b[0], 0xab);
        assert_eq!(r(&mut t, 0xfc), 1, "config generation moves on writes");
        t.interrupt.signal_used_queue();
        assert_eq!(r(&mut t, 0x60), 1);
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 0);
    }

    #[test]
    fn notify_without_ioeventfd_reaches_the_queue_event() {
        let (mut t, _) = transport();
        w(&mut t, NOTIFY_OFFSET, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 1);
    }
}
