//! virtio-net over a host tap. Frames carry the virtio-net header both ways, so checksum and
//! TSO offloads pass through untouched. When the guest has posted no receive buffers the
//! device stops watching the tap (no spinning) and keeps the frame it already read (no
//! silent drop) until the guest posts buffers again. Each direction may have a rate limiter
//! (Firecracker's `rx_rate_limiter`, `tx_rate_limiter`): a frame over budget waits, in the
//! tap or in the transmit queue, for the limiter's timer. An interface MMDS is reachable
//! through hands the guest's frames for the MMDS address to the MMDS stack instead of the
//! tap, and gives the guest the stack's answers before the tap's frames.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::{GuestMemoryMmap, Persist};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    pop_checked, serve_admitted, ActivateContext, ActivateError, ActiveQueues, RetiredEvents,
    VirtioDevice, TYPE_NET,
};
use crate::mmds::MmdsStack;
use crate::rate_limiter::{
    nonblocking_timer, RateLimiter, RateLimiterConfig, RateLimiterError, RateLimiterState,
};
use crate::tap::{Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// Largest frame either way: a 64 KiB GSO frame plus its Ethernet and virtio-net headers.
const MAX_FRAME: usize = 65_562;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network interface {id}: {source}")]
    Tap { id: String, source: TapError },
    #[error("network interface {id}: guest_mac {mac:?} is not a MAC address (xx:xx:xx:xx:xx:xx)")]
    Mac { id: String, mac: String },
    #[error("cannot create the activation event of network interface {0}: {1}")]
    Event(String, std::io::Error),
    #[error("cannot create the MMDS timer of network interface {0}: {1}")]
    MmdsTimer(String, std::io::Error),
    #[error("network interface {id}: {source}")]
    RateLimiter {
        id: String,
        source: RateLimiterError,
    },
}

pub fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// A network interface in a snapshot: what its guest saw of it. The tap comes from the
/// configuration (or a network override) at restore time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    pub id: String,
    pub mac: Option<[u8; 6]>,
    /// Its rate limiters' buckets and what they held (absent from older snapshots: none).
    #[serde(default)]
    pub rx_rate_limiter: RateLimiterState,
    #[serde(default)]
    pub tx_rate_limiter: RateLimiterState,
}

/// What a restored interface needs besides its state: the tap it uses now.
pub struct NetArgs {
    pub tap_name: String,
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetArgs;
    type Error = NetError;

    fn save(&self) -> NetState {
        NetState {
            id: self.id.clone(),
            mac: self.mac,
            rx_rate_limiter: self.rx_limiter.save(),
            tx_rate_limiter: self.tx_limiter.save(),
        }
    }

    fn restore(args: NetArgs, state: &NetState) -> Result<Self, NetError> {
        let limiter = |s: &RateLimiterState| {
            RateLimiter::restore(s).map_err(|source| NetError::RateLimiter {
                id: state.id.clone(),
                source,
            })
        };
        let limiters = [
            limiter(&state.rx_rate_limiter)?,
            limiter(&state.tx_rate_limiter)?,
        ];
        Self::open(&state.id, &args.tap_name, state.mac, limiters)
    }
}

pub struct Net {
    id: String,
    tap: Tap,
    mac: Option<[u8; 6]>,
    activate_evt: EventFd,
    active: Option<ActiveQueues<2>>,
    /// Queue events of a reset activation, unregistered on the next wake-up.
    retired: RetiredEvents,
    /// A frame read from the tap that found no receive buffer yet.
    pending_rx: Option<usize>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    tap_watched: bool,
    /// Frames the guest's buffers were too small for (counted, logged once).
    rx_truncated: u64,
    paused: bool,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// MMDS, if this interface leads to it, and the timer its TCP runs on.
    mmds: Option<(MmdsStack, TimerFd)>,
    /// When the MMDS timer fires, if it is set.
    mmds_timer_at: Option<Instant>,
}

impl Net {
    pub fn new(
        id: &str,
        tap_name: &str,
        mac: Option<&str>,
        rx_rate_limiter: RateLimiterConfig,
        tx_rate_limiter: RateLimiterConfig,
    ) -> Result<Self, NetError> {
        let mac = match mac {
            Some(m) => Some(parse_mac(m).ok_or_else(|| NetError::Mac {
                id: id.to_string(),
                mac: m.to_string(),
            })?),
            None => None,
        };
        let limiter = |config| {
            RateLimiter::new(config).map_err(|source| NetError::RateLimiter {
                id: id.to_string(),
                source,
            })
        };
        let limiters = [limiter(rx_rate_limiter)?, limiter(tx_rate_limiter)?];
        Self::open(id, tap_name, mac, limiters)
    }

    fn open(
        id: &str,
        tap_name: &str,
        mac: Option<[u8; 6]>,
        [rx_limiter, tx_limiter]: [RateLimiter; 2],
    ) -> Result<Self, NetError> {
        let tap = Tap::open(tap_name).map_err(|source| NetError::Tap {
            id: id.to_string(),
            source,
        })?;
        Ok(Self {
            id: id.to_string(),
            tap,
            mac,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| NetError::Event(id.to_string(), e))?,
            active: None,
            retired: RetiredEvents::default(),
            pending_rx: None,
            rx_buf: vec![0; MAX_FRAME],
            tx_buf: vec![0; MAX_FRAME],
            tap_watched: false,
            rx_truncated: 0,
            paused: false,
            rx_limiter,
            tx_limiter,
            mmds: None,
            mmds_timer_at: None,
        })
    }

    /// Makes MMDS reachable through this interface. Before the device joins the event loop.
    pub fn set_mmds(&mut self, stack: MmdsStack) -> Result<(), NetError> {
        let timer = nonblocking_timer().map_err(|e| NetError::MmdsTimer(self.id.clone(), e))?;
        self.mmds = Some((stack, timer));
        Ok(())
    }

    fn mmds_has_frames(&self) -> bool {
        self.mmds
            .as_ref()
            .is_some_and(|(stack, _)| stack.has_frames())
    }

    /// Sets the MMDS timer for the stack's next deadline. Runs after every event of the
    /// device (any of them may have moved the stack: a frame in, frames taken, a timer), and
    /// reaches the kernel only when the deadline moves earlier: a timer that fires early
    /// merely runs the stack once for nothing.
    fn arm_mmds_timer(&mut self) {
        // Paused or reset, the stack waits: resume (or activation) brings it back.
        if self.paused || self.active.is_none() {
            return;
        }
        let Some((stack, timer)) = self.mmds.as_mut() else {
            return;
        };
        let now = Instant::now();
        let Some(wait) = stack.next_poll(now) else {
            return;
        };
        // A zero wait would disarm the timer.
        let at = now + wait.max(Duration::from_millis(1));
        if self.mmds_timer_at.is_some_and(|armed| armed <= at) {
            return;
        }
        match timer.reset(at - now, None) {
            Ok(()) => self.mmds_timer_at = Some(at),
            Err(e) => log::error!("virtio-net {}: cannot set the MMDS timer: {e}", self.id),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The rate limiters' buckets: (receive, transmit).
    pub fn rate_limiters(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        (self.rx_limiter.config(), self.tx_limiter.config())
    }

    /// `PATCH /network-interfaces`: the buckets given replace the current ones; frames held
    /// back are tried again at once.
    pub fn update_rate_limiters(
        &mut self,
        rx: Option<RateLimiterConfig>,
        tx: Option<RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update(rx);
        }
        if let Some(tx) = tx {
            self.tx_limiter.update(tx);
        }
        let _ = self.activate_evt.write(1);
    }

    /// Moves frames from the tap into the guest's receive buffers until either runs out or
    /// the receive rate limiter says wait. Returns (interrupt needed, stop watching the tap:
    /// no receive buffers, or the limiter's timer will bring us back).
    fn process_rx(&mut self) -> (bool, bool) {
        let Some(active) = self.active.as_mut() else {
            return (false, false);
        };
        if active.broken {
            return (false, true);
        }
        let mem = active.mem.clone();
        let mut used = false;
        loop {
            let mmds_frame = match self.pending_rx {
                Some(_) => None,
                None => self
                    .mmds
                    .as_mut()
                    .and_then(|(stack, _)| stack.next_frame(Instant::now())),
            };
            let len = match (self.pending_rx.take(), mmds_frame) {
                (Some(len), _) => len,
                (None, Some(frame)) => {
                    let len = VNET_HDR_LEN + frame.len();
                    self.rx_buf[..VNET_HDR_LEN].fill(0);
                    self.rx_buf[VNET_HDR_LEN..len].copy_from_slice(&frame);
                    len
                }
                (None, None) => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("virtio-net {}: tap read failed: {e}", self.id);
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue;
            }
            let chain = match pop_checked(&mut active.queues[RX], &mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => {
                    self.pending_rx = Some(len);
                    return (used, true);
                }
                Err(e) => {
                    active.stop(&format!("virtio-net {}", self.id), "receive", &e);
                    return (true, true);
                }
            };
            if !self.rx_limiter.is_unlimited() && !self.rx_limiter.consume_request(len as u64) {
                // The buffer stays the guest's, the frame ours, until the timer fires.
                virtio_queue::QueueOwnedT::go_to_previous_position(&mut active.queues[RX]);
                self.pending_rx = Some(len);
                let notify = used && active.queues[RX].needs_notification(&mem).unwrap_or(true);
                return (notify, true);
            }
            let head = chain.head_index();
            // Without mergeable buffers there is exactly one buffer per frame.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match Writer::new(&mem, chain) {
                Ok(mut w) => {
                    let room = w.available_bytes();
                    let n = len.min(room);
                    if n < len {
                        self.rx_truncated += 1;
                        if self.rx_truncated == 1 {
                            log::warn!("virtio-net {}: receive buffer of {room} bytes too small for a {len}-byte frame; frame dropped", self.id);
                        }
                        0
                    } else if w.write_all(&self.rx_buf[..n]).is_ok() {
                        n
                    } else {
                        0
                    }
                }
                Err(e) => {
                    log::warn!("virtio-net {}: bad receive buffer: {e}", self.id);
                    0
                }
            };
            if let Err(e) = active.queues[RX].add_used(&mem, head, written as u32) {
                log::error!(
                    "virtio-net {}: cannot return receive buffer {head}: {e}",
                    self.id
                );
            }
            used = true;
        }
        let notify = used && active.queues[RX].needs_notification(&mem).unwrap_or(true);
        (notify, false)
    }

    /// Sends every frame the guest queued. Returns whether the guest must be interrupted.
    fn process_tx(&mut self) -> bool {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return false;
        };
        let mem = active.mem.clone();
        // Admission takes a frame's tokens before the frame is read; an MMDS frame, not the
        // guest's traffic, gives them back at once (Firecracker's rule).
        let limiter = std::cell::RefCell::new(&mut self.tx_limiter);
        let mmds = &mut self.mmds;
        // The frame's length is summed only when a limit needs it: this runs per frame.
        let admit = |chain: &virtio_queue::DescriptorChain<&GuestMemoryMmap>| {
            let mut limiter = limiter.borrow_mut();
            limiter.is_unlimited()
                || limiter.consume_request(chain.clone().map(|d| u64::from(d.len())).sum())
        };
        let sent = serve_admitted(&mut active.queues[TX], &mem, admit, |chain| {
            match Reader::new(&mem, chain) {
                Ok(mut r) => {
                    let len = r.available_bytes();
                    if !(VNET_HDR_LEN..=MAX_FRAME).contains(&len) {
                        log::warn!(
                            "virtio-net {}: dropping a {len}-byte frame from the guest",
                            self.id
                        );
                    } else if r.read_exact(&mut self.tx_buf[..len]).is_ok() {
                        let frame = &self.tx_buf[VNET_HDR_LEN..len];
                        match mmds.as_mut() {
                            Some((stack, _)) if stack.is_mmds_frame(frame) => {
                                stack.receive_frame(frame, Instant::now());
                                limiter.borrow_mut().give_back_request(len as u64);
                            }
                            _ => {
                                if let Err(e) = self.tap.write_frame(&self.tx_buf[..len]) {
                                    // The host side is down or full: the frame is lost, as
                                    // on a wire.
                                    log::debug!("virtio-net {}: tap write failed: {e}", self.id);
                                }
                            }
                        }
                    }
                }
                Err(e) => log::warn!("virtio-net {}: bad transmit buffer: {e}", self.id),
            }
            0
        });
        match sent {
            Ok(used) => used && active.queues[TX].needs_notification(&mem).unwrap_or(true),
            Err(e) => {
                active.stop(&format!("virtio-net {}", self.id), "transmit", &e);
                true
            }
        }
    }

    fn signal(&self) {
        if let Some(active) = self.active.as_ref() {
            active.interrupt.signal_used_queue();
        }
    }

    fn watch_tap(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.tap_watched {
            return;
        }
        let events = Events::new(&self.tap, EventSet::IN);
        let result = if watch {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match result {
            Ok(()) => self.tap_watched = watch,
            Err(e) => log::error!("virtio-net {}: cannot change tap watch: {e}", self.id),
        }
    }

    /// Sends what the guest queued; MMDS's answers to it go to the guest at once.
    fn on_tx_ready(&mut self, ops: &mut EventOps) {
        if self.process_tx() {
            self.signal();
        }
        if self.mmds_has_frames() {
            self.on_rx_ready(ops);
        }
    }

    fn on_rx_ready(&mut self, ops: &mut EventOps) {
        let (notify, held) = self.process_rx();
        if notify {
            self.signal();
        }
        // Out of buffers, or over the limit: stop watching the tap until the guest posts
        // more, or the limiter's timer fires.
        self.watch_tap(ops, !held);
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn offered_features(&self) -> u64 {
        let mut f = VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6;
        if self.mac.is_some() {
            f |= VIRTIO_NET_F_MAC;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.mac.unwrap_or_default();
        let start = offset as usize;
        if let Some(src) = config.get(start..(start + data.len()).min(config.len())) {
            data[..src.len()].copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!(
            "virtio-net {}: ignoring config write at {offset:#x}",
            self.id
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let acked_features = ctx.acked_features;
        let active = ActiveQueues::new(ctx)?;
        let mut offload = 0;
        if acked_features & VIRTIO_NET_F_GUEST_CSUM != 0 {
            offload |= TUN_F_CSUM;
            if acked_features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
                offload |= TUN_F_TSO4;
            }
            if acked_features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
                offload |= TUN_F_TSO6;
            }
        }
        self.tap
            .set_offload(offload)
            .map_err(|e| ActivateError::Backend(e.to_string()))?;
        debug_assert_eq!(acked_features & VIRTIO_NET_F_MRG_RXBUF, 0, "never offered");
        self.active = Some(active);
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take().filter(|a| a.registered) {
            self.retired.retire(active.queue_evts);
        }
        self.pending_rx = None;
        let _ = self.activate_evt.write(1);
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
    }

    fn resume(&mut self) {
        self.paused = false;
        // Wake the event loop: watch the tap again and send what the guest queued.
        let _ = self.activate_evt.write(1);
    }
}

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            log::error!("virtio-net {}: cannot watch activation: {e}", self.id);
        }
        let mmds_timer = self.mmds.as_ref().map(|(_, timer)| timer.as_raw_fd());
        for timer in [self.rx_limiter.timer_fd(), self.tx_limiter.timer_fd()]
            .into_iter()
            .chain(mmds_timer)
        {
            if let Err(e) = ops.add(Events::new_raw(timer, EventSet::IN)) {
                log::error!(
                    "virtio-net {}: cannot watch a rate limiter's timer: {e}",
                    self.id
                );
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.process_event(events, ops);
        self.arm_mmds_timer();
    }
}

impl Net {
    fn process_event(&mut self, events: Events, ops: &mut EventOps) {
        self.retired.unregister(ops);
        let fd = events.fd();
        if fd == self.rx_limiter.timer_fd() || fd == self.tx_limiter.timer_fd() {
            let rx = fd == self.rx_limiter.timer_fd();
            if rx {
                self.rx_limiter.on_timer();
            } else {
                self.tx_limiter.on_timer();
            }
            // While paused, resume serves what waits.
            if self.paused || self.active.is_none() {
                return;
            }
            if rx {
                self.on_rx_ready(ops);
            } else {
                self.on_tx_ready(ops);
            }
            return;
        }
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            let Some(active) = self.active.as_mut() else {
                // Reset: stop everything until the driver activates us again.
                self.watch_tap(ops, false);
                return;
            };
            active.register(ops, &format!("virtio-net {}", self.id));
            if self.paused {
                return;
            }
            self.on_rx_ready(ops);
            self.on_tx_ready(ops);
            return;
        }
        if let Some((stack, timer)) = self.mmds.as_mut().filter(|(_, t)| t.as_raw_fd() == fd) {
            let _ = timer.wait();
            self.mmds_timer_at = None;
            // While paused, resume runs the stack again.
            if self.paused || self.active.is_none() {
                return;
            }
            stack.poll(Instant::now());
            if self.mmds_has_frames() {
                self.on_rx_ready(ops);
            }
            return;
        }
        if self.paused {
            // Leave frames in the tap and requests in the queues until resume.
            self.watch_tap(ops, false);
            if let Some(active) = self.active.as_ref() {
                for evt in &active.queue_evts {
                    if evt.as_raw_fd() == fd {
                        let _ = evt.read();
                    }
                }
            }
            return;
        }
        if fd == self.tap.as_raw_fd() {
            self.on_rx_ready(ops);
            return;
        }
        let Some(active) = self.active.as_ref() else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            return;
        };
        if fd == active.queue_evts[RX].as_raw_fd() {
            let _ = active.queue_evts[RX].read();
            // New receive buffers: deliver a waiting frame and watch the tap again.
            self.on_rx_ready(ops);
        } else if fd == active.queue_evts[TX].as_raw_fd() {
            let _ = active.queue_evts[TX].read();
            self.on_tx_ready(ops);
        } else {
            // A queue event of a previous activation.
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("06:00:ac:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        assert_eq!(parse_mac("06:00:ac:10:00"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:02:03"), None);
        assert_eq!(parse_mac("06:00:ac:10:00:zz"), None);
        assert_eq!(parse_mac("6:00:ac:10:00:02"), None);
    }
}
