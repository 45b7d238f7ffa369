//! Places virtio devices on the MMIO bus: one 4 KiB window and one legacy IRQ each, an
//! ioeventfd per queue on QueueNotify, an irqfd for the interrupt, and the kernel
//! command-line entry (`virtio_mmio.device=4K@ADDR:IRQ`) that tells the guest where it is.

use std::any::Any;
use std::sync::{Arc, Mutex};

use devices::virtio::mmio::{
    MmioTransport, MmioTransportArgs, MmioTransportState, MMIO_LEN, NOTIFY_OFFSET,
};
use devices::virtio::{Interrupt, VirtioDevice, VirtioDeviceState};
use devices::{Bus, GuestMemoryMmap, Persist};
use event_manager::MutEventSubscriber;
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::layout::MMIO_GAP_START;
use crate::microvm::Subscriber;
use crate::vm::{Vm, VmError};

/// First device window (Firecracker's guests see their first device here too).
const FIRST_DEVICE_ADDR: u64 = MMIO_GAP_START + 0x1000;
/// Legacy IRQs for devices: 5..=23 (4 is COM1, 1 the keyboard).
const FIRST_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("no IRQ left for device {0}: at most {n} virtio devices", n = LAST_IRQ - FIRST_IRQ + 1)]
    OutOfIrqs(String),
    #[error("cannot create the interrupt event of device {id}: {source}")]
    EventFd { id: String, source: std::io::Error },
    #[error("device {id}: {source}")]
    Transport {
        id: String,
        source: devices::virtio::mmio::MmioError,
    },
    #[error("KVM_IOEVENTFD for queue {queue} of device {id} failed: {source}")]
    IoEvent {
        id: String,
        queue: usize,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot place device {id} on the MMIO bus: {source}")]
    Bus {
        id: String,
        source: devices::BusError,
    },
}

/// Where a device landed.
#[derive(Debug, Clone)]
pub struct MmioSlot {
    pub id: String,
    pub addr: u64,
    pub irq: u32,
}

/// An attached device as a snapshot sees it: its slot, its transport, and its own state.
#[derive(Clone)]
pub struct AttachedDevice {
    pub slot: MmioSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
    save_device: Arc<dyn Fn() -> VirtioDeviceState + Send + Sync>,
    /// The device itself (an `Arc<Mutex<D>>`), for the API's updates of a running VM.
    device: Arc<dyn Any + Send + Sync>,
}

impl AttachedDevice {
    /// The device's own state (taken while the VM is paused).
    pub fn device_state(&self) -> VirtioDeviceState {
        (self.save_device)()
    }

    /// The device, if it is a `D`.
    pub fn device_as<D: Send + 'static>(&self) -> Option<Arc<Mutex<D>>> {
        self.device.clone().downcast::<Mutex<D>>().ok()
    }
}

pub struct MmioDeviceManager {
    bus: Bus,
    next_addr: u64,
    next_irq: u32,
    slots: Vec<MmioSlot>,
    subscribers: Vec<Subscriber>,
    devices: Vec<Arc<Mutex<dyn VirtioDevice>>>,
    attached: Vec<AttachedDevice>,
}

impl Default for MmioDeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl MmioDeviceManager {
    pub fn new() -> Self {
        Self {
            bus: Bus::new(),
            next_addr: FIRST_DEVICE_ADDR,
            next_irq: FIRST_IRQ,
            slots: Vec::new(),
            subscribers: Vec::new(),
            devices: Vec::new(),
            attached: Vec::new(),
        }
    }

    /// Attaches `device` at the next free slot; with `saved`, its transport takes over a
    /// snapshot's state (and a running device is reactivated).
    pub fn attach<D>(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        id: &str,
        device: Arc<Mutex<D>>,
        saved: Option<&MmioTransportState>,
    ) -> Result<MmioSlot, DeviceManagerError>
    where
        D: VirtioDevice + Persist + MutEventSubscriber + Send + 'static,
        D::State: Into<VirtioDeviceState>,
    {
        if self.next_irq > LAST_IRQ {
            return Err(DeviceManagerError::OutOfIrqs(id.to_string()));
        }
        let (addr, irq) = (self.next_addr, self.next_irq);
        let irqfd =
            EventFd::new(libc::EFD_NONBLOCK).map_err(|source| DeviceManagerError::EventFd {
                id: id.to_string(),
                source,
            })?;
        vm.register_irqfd(&irqfd, irq)?;
        let interrupt = Arc::new(Interrupt::new(irqfd));
        let transport = match saved {
            Some(state) => {
                let args = MmioTransportArgs {
                    device: device.clone(),
                    mem: mem.clone(),
                    interrupt,
                };
                MmioTransport::restore(args, state)
            }
            None => MmioTransport::new(device.clone(), mem.clone(), interrupt),
        }
        .map_err(|source| DeviceManagerError::Transport {
            id: id.to_string(),
            source,
        })?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.fd()
                .register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(addr + NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|source| DeviceManagerError::IoEvent {
                    id: id.to_string(),
                    queue,
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.bus
            .insert(transport.clone(), addr, MMIO_LEN)
            .map_err(|source| DeviceManagerError::Bus {
                id: id.to_string(),
                source,
            })?;
        self.subscribers.push(device.clone());
        let saved_device = device.clone();
        let save_device = Arc::new(move || {
            saved_device
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .save()
                .into()
        });
        let any: Arc<dyn Any + Send + Sync> = device.clone();
        self.devices.push(device);
        let slot = MmioSlot {
            id: id.to_string(),
            addr,
            irq,
        };
        self.slots.push(slot.clone());
        self.attached.push(AttachedDevice {
            slot: slot.clone(),
            transport,
            save_device,
            device: any,
        });
        self.next_addr += MMIO_LEN;
        self.next_irq += 1;
        Ok(slot)
    }

    /// The `virtio_mmio.device=` entries for the kernel command line, in attach order.
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.addr, s.irq))
            .collect()
    }

    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    pub fn take_subscribers(&mut self) -> Vec<Subscriber> {
        std::mem::take(&mut self.subscribers)
    }

    /// Each device's slot, transport and own state, for snapshots.
    pub fn attached(&self) -> Vec<AttachedDevice> {
        self.attached.clone()
    }

    /// The attached devices, for pausing and resuming them with the VM.
    pub fn devices(&self) -> Vec<Arc<Mutex<dyn VirtioDevice>>> {
        self.devices.clone()
    }
}
