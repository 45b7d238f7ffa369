//! virtio-vsock (virtio 1.2, 5.10) with Firecracker's hybrid Unix-socket backend: the guest
//! talks AF_VSOCK, host programs talk to Unix sockets (`unix.rs`). Three queues: receive
//! (device to guest), transmit (guest to device) and events (the transport reset a guest
//! is told of after a snapshot load, when every connection it had is gone).
//!
//! The device is one event-loop subscriber: the listener, the handshakes in progress and
//! every connection's host socket are watched on the VMM's event loop, each only for what
//! can be done now (a socket is not watched for input while the guest has no credit or no
//! receive buffer for it, so nothing spins). What the guest can make the device hold is
//! bounded: replies waiting for receive buffers (the transmit queue is not read while
//! there are a queue's worth), bytes per connection (its credit), connections (1023), and
//! the time a handshake, an unanswered request or an unfinished close may take (a timer).

mod connection;
pub mod packet;
pub mod unix;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT, Reader, Writer};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use self::connection::{ConnState, Connection};
use self::packet::*;
use self::unix::{Handshake, HandshakeStep, UnixError};
use super::{
    pop_checked, ActivateContext, ActivateError, ActiveQueues, RetiredEvents, VirtioDevice,
    TYPE_VSOCK,
};
use crate::{GuestMemoryMmap, Persist};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVQ: usize = 2;
/// Connections and handshakes at once, as Firecracker's muxer allows.
pub const MAX_CONNECTIONS: usize = 1023;
/// Host-initiated connections take host ports from here up (Firecracker's range).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Transmit chains served per turn of the event loop: a guest that keeps its transmit queue
/// full does not keep the loop (and the API) from everything else.
const TX_BATCH: usize = QUEUE_SIZE as usize;
/// How long a host client may take to send its `CONNECT PORT` line, the guest to answer a
/// host connection, and a closed connection to get its last bytes to the host (Firecracker
/// allows 2 s for the last two; the KVM lab runs guests about 25 times slower).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the listener stays off the loop after a failed accept.
const LISTENER_RETRY: Duration = Duration::from_millis(500);

/// The device's time limits (the constants above; tests shorten them).
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    handshake: Duration,
    request: Duration,
    close: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest_cid {0}: must be 3 or more (0-2 are reserved)")]
    GuestCid(u64),
    #[error(transparent)]
    Unix(#[from] UnixError),
    #[error("cannot create the activation event of the vsock device: {0}")]
    Event(std::io::Error),
    #[error("cannot create the vsock device's timer: {0}")]
    Timer(std::io::Error),
}

/// The vsock device in a snapshot: the guest's CID, the socket it was reached at and the
/// next host port it would give a host-initiated connection. Connections are not kept: the
/// restored guest is told its transport was reset.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    /// So that a restored device does not give a new connection the host port of one the
    /// guest still knew (absent from older snapshots: the first port).
    #[serde(default = "first_local_port")]
    pub next_local_port: u32,
}

fn first_local_port() -> u32 {
    FIRST_LOCAL_PORT
}

/// What a restored device needs besides its state: the socket to listen on now (the saved
/// one, or `vsock_override`'s).
pub struct VsockArgs {
    pub uds_path: PathBuf,
}

type ConnKey = (u32, u32);

/// Packets without payload waiting for a receive buffer, oldest first, and how many of them
/// are replies to the guest's own packets (what holds the transmit queue back).
#[derive(Default)]
struct ControlQueue {
    items: VecDeque<(Header, bool)>,
    replies: usize,
}

impl ControlQueue {
    fn push(&mut self, header: Header, reply: bool) {
        self.items.push_back((header, reply));
        self.replies += usize::from(reply);
    }

    fn pop(&mut self) -> Option<Header> {
        let (header, reply) = self.items.pop_front()?;
        self.replies -= usize::from(reply);
        Some(header)
    }

    fn retain(&mut self, mut keep: impl FnMut(&Header) -> bool) {
        self.items.retain(|(h, _)| keep(h));
        self.replies = self.items.iter().filter(|(_, r)| *r).count();
    }

    fn contains(&self, mut pred: impl FnMut(&Header) -> bool) -> bool {
        self.items.iter().any(|(h, _)| pred(h))
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn clear(&mut self) {
        self.items.clear();
        self.replies = 0;
    }
}

/// What an fd on the event loop is, besides the device's own events.
#[derive(Clone, Copy)]
enum Watched {
    Handshake,
    Conn(ConnKey),
}

pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    /// The socket file the listener is bound to (removed at exit if still there).
    socket_file: Option<unix::SocketFile>,
    /// The listener is on the event loop (taken off while accept fails for want of file
    /// descriptors, put back when a connection closes).
    listener_watched: bool,
    activate_evt: EventFd,
    /// Fires at the earliest deadline of a handshake or connection.
    timer: TimerFd,
    /// The deadline the timer is set for now (set again only when that changes: this runs
    /// after every event).
    timer_at: Option<Instant>,
    active: Option<ActiveQueues<3>>,
    retired: RetiredEvents,
    paused: bool,
    conns: HashMap<ConnKey, Connection>,
    /// What each connection's host socket is watched for now.
    interest: HashMap<ConnKey, EventSet>,
    handshakes: HashMap<RawFd, Handshake>,
    watched: HashMap<RawFd, Watched>,
    /// Packets without payload waiting for a receive buffer.
    rx_control: ControlQueue,
    /// Handling the guest's transmit queue: what is queued now is a reply.
    in_tx: bool,
    /// The listener is off the loop after a failed accept: try again then.
    listener_retry: Option<Instant>,
    /// Connections whose host socket has bytes (or its end) for the guest; a connection's
    /// `in_rx_ready` says it is here.
    rx_ready: VecDeque<ConnKey>,
    /// Host sockets to unregister from the event loop and close.
    closing: Vec<(UnixStream, bool)>,
    next_local_port: u32,
    /// The guest must be told its transport was reset (after a snapshot load).
    reset_pending: bool,
    /// The guest was told, and has not handed the event buffer back yet (the event queue's
    /// available index is still this): until it does, nothing is delivered, or a new
    /// connection would be reset with the old ones (Linux handles the receive queue and the
    /// event queue in separate work items, receive first).
    reset_unacked: Option<u16>,
    /// Guest packets dropped as malformed (logged at powers of two, not each).
    bad_packets: u64,
    timeouts: Timeouts,
    scratch: Vec<u8>,
}

impl Vsock {
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if guest_cid < 3 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::GuestCid(guest_cid));
        }
        let timer = crate::rate_limiter::nonblocking_timer().map_err(VsockError::Timer)?;
        let (listener, socket_file) = unix::listen(uds_path)?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            socket_file,
            listener_watched: false,
            activate_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Event)?,
            timer,
            timer_at: None,
            active: None,
            retired: RetiredEvents::default(),
            paused: false,
            conns: HashMap::new(),
            interest: HashMap::new(),
            handshakes: HashMap::new(),
            watched: HashMap::new(),
            rx_control: ControlQueue::default(),
            in_tx: false,
            listener_retry: None,
            rx_ready: VecDeque::new(),
            closing: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            reset_pending: false,
            reset_unacked: None,
            bad_packets: 0,
            timeouts: Timeouts {
                handshake: HANDSHAKE_TIMEOUT,
                request: REQUEST_TIMEOUT,
                close: CLOSE_TIMEOUT,
            },
            scratch: vec![0; MAX_PAYLOAD],
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// A packet with no connection behind it (a refusal, or an answer to a stray packet).
    fn queue_rst_to(&mut self, to: &Header) {
        let rst = Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        };
        self.rx_control.push(rst, self.in_tx);
    }

    fn queue_control(&mut self, key: ConnKey, op: u16, flags: u32) {
        let cid = self.guest_cid;
        if op == OP_CREDIT_UPDATE
            && self
                .rx_control
                .contains(|h| h.op == op && (h.src_port, h.dst_port) == key)
        {
            // One waiting update is enough: its counts are refreshed when it is sent.
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            let header = conn.header(cid, op, 0, flags);
            self.rx_control.push(header, self.in_tx);
        }
    }

    /// Ends a connection: its socket is closed (after the event loop forgets it), and what
    /// was queued for the guest about it is withdrawn.
    fn drop_conn(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let registered = self.interest.remove(&key).is_some();
            self.watched.remove(&conn.stream.as_raw_fd());
            if conn.in_rx_ready {
                self.rx_ready.retain(|k| *k != key);
            }
            self.rx_control.retain(|h| (h.src_port, h.dst_port) != key);
            self.closing.push((conn.stream, registered));
        }
    }

    /// Resets the connection on both sides: the guest gets RST, the host socket closes.
    fn reset_conn(&mut self, key: ConnKey) {
        let rst = self
            .conns
            .get_mut(&key)
            .map(|conn| conn.header(self.guest_cid, OP_RST, 0, 0));
        self.drop_conn(key);
        if let Some(rst) = rst {
            self.rx_control.push(rst, self.in_tx);
        }
    }

    fn mark_ready(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rx_ready {
                conn.in_rx_ready = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Watches a connection's host socket for what can be done now: input while the guest
    /// has credit and the socket is not already queued to be read; output while bytes wait.
    fn sync_interest(&mut self, key: ConnKey, ops: &mut EventOps) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        let reading = conn.state == ConnState::Established
            && !conn.host_eof
            && conn.peer_shutdown & SHUTDOWN_RCV == 0
            && conn.peer_free() > 0
            && !conn.in_rx_ready;
        if reading && !self.paused {
            want |= EventSet::IN;
        }
        if conn.has_pending_tx() {
            want |= EventSet::OUT;
        }
        let fd = conn.stream.as_raw_fd();
        let have = self.interest.get(&key).copied();
        let result = match (have, want.is_empty()) {
            (None, true) => Ok(()),
            (None, false) => ops.add(Events::new_raw(fd, want)),
            (Some(_), true) => ops.remove(Events::new_raw(fd, EventSet::empty())),
            (Some(h), false) if h == want => Ok(()),
            (Some(_), false) => ops.modify(Events::new_raw(fd, want)),
        };
        if let Err(e) = result {
            log::error!(
                "virtio-vsock: cannot watch the host socket of port {}: {e}",
                key.0
            );
        }
        if want.is_empty() {
            self.interest.remove(&key);
        } else {
            self.interest.insert(key, want);
        }
    }

    fn sync_all(&mut self, ops: &mut EventOps) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.sync_interest(key, ops);
        }
    }

    /// Closes what was dropped, and puts the listener back on the loop if accept had run
    /// out of descriptors.
    fn close_pending(&mut self, ops: &mut EventOps) {
        let closed = !self.closing.is_empty();
        for (stream, registered) in self.closing.drain(..) {
            if registered {
                let _ = ops.remove(Events::new(&stream, EventSet::empty()));
            }
        }
        if closed {
            self.watch_listener(ops);
        }
    }

    fn watch_listener(&mut self, ops: &mut EventOps) {
        if !self.listener_watched {
            match ops.add(Events::new(&self.listener, EventSet::IN)) {
                Ok(()) => {
                    self.listener_watched = true;
                    self.listener_retry = None;
                }
                Err(e) => log::error!("virtio-vsock: cannot watch its Unix socket: {e}"),
            }
        }
    }

    fn accept_all(&mut self, ops: &mut EventOps) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely: the connection stays queued, and a
                    // level-triggered listener would wake the loop for ever. Stop watching
                    // it until a connection closes.
                    log::warn!(
                        "virtio-vsock: accept on {} failed: {e}; not accepting until a connection closes",
                        self.uds_path.display()
                    );
                    let _ = ops.remove(Events::new(&self.listener, EventSet::empty()));
                    self.listener_watched = false;
                    // A connection closing puts it back; so does this, whatever failed.
                    self.listener_retry = Some(Instant::now() + LISTENER_RETRY);
                    return;
                }
            };
            if self.connection_count() >= MAX_CONNECTIONS {
                log::warn!("virtio-vsock: {MAX_CONNECTIONS} connections open; a host connection is refused");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("virtio-vsock: cannot make a host connection non-blocking: {e}");
                continue;
            }
            let fd = stream.as_raw_fd();
            if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                log::error!("virtio-vsock: cannot watch a host connection: {e}");
                continue;
            }
            self.watched.insert(fd, Watched::Handshake);
            self.handshakes.insert(
                fd,
                Handshake::new(stream, Instant::now() + self.timeouts.handshake),
            );
        }
    }

    fn advance_handshake(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = match handshake.advance() {
            HandshakeStep::Pending => return,
            HandshakeStep::Port(port) => Some(port),
            HandshakeStep::Refused(why) => {
                log::info!("virtio-vsock: host connection dropped: {why}");
                None
            }
        };
        let handshake = self.drop_handshake(fd, ops);
        let (Some(port), Some(handshake)) = (port, handshake) else {
            return;
        };
        let local = self.allocate_local_port(port);
        let key = (local, port);
        // Its deadline starts when the guest gets the REQUEST (paused, or holding a reset,
        // it cannot answer).
        let conn = Connection::new(handshake.stream, local, port, ConnState::AwaitingResponse);
        self.watched
            .insert(conn.stream.as_raw_fd(), Watched::Conn(key));
        self.conns.insert(key, conn);
        self.queue_control(key, OP_REQUEST, 0);
    }

    /// Takes a handshake off the loop; its socket is returned (dropping it closes it).
    fn drop_handshake(&mut self, fd: RawFd, ops: &mut EventOps) -> Option<Handshake> {
        let handshake = self.handshakes.remove(&fd)?;
        self.watched.remove(&fd);
        let _ = ops.remove(Events::new(&handshake.stream, EventSet::empty()));
        self.watch_listener(ops);
        Some(handshake)
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .filter(|p| *p < 1 << 31)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    fn count_bad_packet(&mut self, why: &str) {
        self.bad_packets += 1;
        if self.bad_packets.is_power_of_two() {
            log::warn!(
                "virtio-vsock: dropping a packet from the guest: {why} ({} so far)",
                self.bad_packets
            );
        }
    }

    /// One packet from the guest.
    fn handle_guest_packet(&mut self, header: Header, payload: &[u8], ops: &mut EventOps) {
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            self.count_bad_packet("another CID");
            return;
        }
        if header.type_ != TYPE_STREAM {
            if header.op != OP_RST {
                self.queue_rst_to(&header);
            }
            return;
        }
        let key = (header.dst_port, header.src_port);
        if header.op == OP_REQUEST {
            self.guest_connect(&header, ops);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if header.op != OP_RST {
                self.queue_rst_to(&header);
            }
            return;
        };
        conn.update_peer_credit(&header);
        match header.op {
            OP_RESPONSE if conn.state == ConnState::AwaitingResponse => {
                conn.state = ConnState::Established;
                conn.deadline = None;
                let reply = format!("OK {}\n", conn.local_port);
                // A few bytes into a fresh socket: only a vanished client fails here.
                if conn.stream.write_all(reply.as_bytes()).is_err() {
                    self.reset_conn(key);
                    return;
                }
            }
            OP_RW if conn.state == ConnState::Established => {
                if let Err(e) = conn.send_to_host(payload) {
                    log::info!("virtio-vsock: port {}: {e}; connection reset", key.0);
                    self.reset_conn(key);
                    return;
                }
                if conn.needs_credit_update() {
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                conn.peer_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && conn.deadline.is_none() {
                    // Its last bytes get this long to reach the host.
                    conn.deadline = Some(Instant::now() + self.timeouts.close);
                }
                if !self.finish_if_done(key) {
                    self.shut_host_write_if_done(key);
                }
            }
            OP_RST => {
                self.drop_conn(key);
                return;
            }
            op => {
                log::debug!(
                    "virtio-vsock: port {}: unexpected {} in state {:?}",
                    key.0,
                    Header::op_name(op),
                    conn.state
                );
                self.reset_conn(key);
                return;
            }
        }
        self.sync_interest(key, ops);
    }

    /// The guest shut both directions and everything it sent reached the host: the
    /// connection ends with RST (the guest waits for it). Whether it ended.
    fn finish_if_done(&mut self, key: ConnKey) -> bool {
        let done = self.conns.get(&key).is_some_and(|c| {
            c.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && !c.has_pending_tx()
        });
        if done {
            self.reset_conn(key);
        }
        done
    }

    /// The guest will send no more: once its bytes are out, the host reader sees the end.
    fn shut_host_write_if_done(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get(&key) {
            if conn.peer_shutdown & SHUTDOWN_SEND != 0 && !conn.has_pending_tx() {
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
        }
    }

    /// The guest connects to host port `dst_port`: to whoever listens on `uds_path_PORT`.
    fn guest_connect(&mut self, header: &Header, ops: &mut EventOps) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) {
            // A second REQUEST on a live connection: the guest lost track; end it.
            self.reset_conn(key);
            return;
        }
        if self.connection_count() >= MAX_CONNECTIONS {
            log::warn!("virtio-vsock: {MAX_CONNECTIONS} connections open; the guest's connection to port {} is refused", header.dst_port);
            self.queue_rst_to(header);
            return;
        }
        let path = unix::port_path(&self.uds_path, header.dst_port);
        let stream = match unix::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                log::debug!("virtio-vsock: guest connection to {}: {e}", path.display());
                self.queue_rst_to(header);
                return;
            }
        };
        let mut conn = Connection::new(
            stream,
            header.dst_port,
            header.src_port,
            ConnState::Established,
        );
        conn.update_peer_credit(header);
        self.watched
            .insert(conn.stream.as_raw_fd(), Watched::Conn(key));
        self.conns.insert(key, conn);
        self.queue_control(key, OP_RESPONSE, 0);
        self.sync_interest(key, ops);
    }

    /// Takes the packets the guest queued, at most a batch per call, and none while a
    /// queue's worth of replies waits for receive buffers. Whether the guest must be
    /// interrupted.
    fn process_tx(&mut self, ops: &mut EventOps) -> bool {
        let mut used = false;
        for _ in 0..TX_BATCH {
            let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
                return used;
            };
            // A receive queue's worth of replies (packets without payload) waiting for
            // buffers: leave the transmit queue alone, as Linux's vhost-vsock does, so a
            // guest that sends without posting receive buffers cannot make the device
            // queue replies without end. Served again once the guest takes replies.
            if self.rx_control.replies >= usize::from(active.queues[RX].size()) {
                return self.tx_notify(used);
            }
            let mem = active.mem.clone();
            let chain = match pop_checked(&mut active.queues[TX], &mem) {
                Ok(Some(chain)) => chain,
                Ok(None) => match active.queues[TX].enable_notification(&mem) {
                    // A chain made available meanwhile.
                    Ok(true) => continue,
                    Ok(false) => return self.tx_notify(used),
                    Err(e) => {
                        active.stop("virtio-vsock", "transmit", &e.into());
                        return true;
                    }
                },
                Err(e) => {
                    active.stop("virtio-vsock", "transmit", &e);
                    return true;
                }
            };
            let head = chain.head_index();
            let packet = read_packet(&mem, chain);
            if let Err(e) = active.queues[TX].add_used(&mem, head, 0) {
                log::warn!("virtio-vsock: cannot return the chain at descriptor {head}: {e}");
            }
            used = true;
            match packet {
                Ok((header, payload)) => {
                    self.in_tx = true;
                    self.handle_guest_packet(header, &payload, ops);
                    self.in_tx = false;
                }
                Err(why) => self.count_bad_packet(&why),
            }
        }
        // A full batch: the rest on the next turn of the event loop.
        let _ = self.activate_evt.write(1);
        self.tx_notify(used)
    }

    fn tx_notify(&mut self, used: bool) -> bool {
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        used && active.queues[TX].needs_notification(&mem).unwrap_or(true)
    }

    /// Fills the guest's receive buffers: control packets first, then data from the host
    /// sockets that have some, round robin. Nothing before the guest handled a transport
    /// reset. Whether the guest must be interrupted.
    fn process_rx(&mut self, ops: &mut EventOps) -> bool {
        if self.reset_pending || self.reset_unacked.is_some() {
            return false;
        }
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return false;
        };
        let mem = active.mem.clone();
        let mut used = false;
        while !self.rx_control.is_empty() || !self.rx_ready.is_empty() {
            let active = self.active.as_mut().expect("checked above");
            let chain = match pop_checked(&mut active.queues[RX], &mem) {
                Ok(Some(chain)) => chain,
                // No buffer: the receive queue's notification brings us back.
                Ok(None) => break,
                Err(e) => {
                    active.stop("virtio-vsock", "receive", &e);
                    return true;
                }
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(&mem, chain) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                _ => {
                    let _ = active.queues[RX].add_used(&mem, head, 0);
                    self.count_bad_packet("a receive buffer too small or outside memory");
                    used = true;
                    continue;
                }
            };
            let room = writer.available_bytes() - HEADER_LEN;
            let written = if let Some(header) = self.rx_control.pop() {
                let header = self.refreshed(header);
                let _ = writer.write_all(&header.to_bytes());
                HEADER_LEN
            } else if let Some((header, len)) =
                (room > 0).then(|| self.read_host_data(room)).flatten()
            {
                let ok = writer.write_all(&header.to_bytes()).is_ok()
                    && writer.write_all(&self.scratch[..len]).is_ok();
                if !ok {
                    log::warn!("virtio-vsock: cannot write to receive buffer {head}");
                }
                HEADER_LEN + len
            } else {
                // Nothing to send in it after all (or no room for data): the buffer stays
                // the guest's until there is.
                drop(writer);
                let active = self.active.as_mut().expect("checked above");
                virtio_queue::QueueOwnedT::go_to_previous_position(&mut active.queues[RX]);
                break;
            };
            let active = self.active.as_mut().expect("checked above");
            if let Err(e) = active.queues[RX].add_used(&mem, head, written as u32) {
                log::warn!("virtio-vsock: cannot return receive buffer {head}: {e}");
            }
            used = true;
        }
        self.close_pending(ops);
        self.sync_all(ops);
        let active = self.active.as_mut().expect("checked above");
        used && active.queues[RX].needs_notification(&mem).unwrap_or(true)
    }

    /// A queued packet of a live connection, with the connection's credit as it is now;
    /// a REQUEST starts the guest's time to answer.
    fn refreshed(&mut self, header: Header) -> Header {
        let key = (header.src_port, header.dst_port);
        let (cid, request) = (self.guest_cid, self.timeouts.request);
        match self.conns.get_mut(&key) {
            Some(conn) if header.op != OP_RST => {
                if header.op == OP_REQUEST {
                    conn.deadline = Some(Instant::now() + request);
                }
                conn.header(cid, header.op, 0, header.flags)
            }
            _ => header,
        }
    }

    /// Reads from the first ready connection into `scratch`, at most `room` bytes and the
    /// guest's credit: the header to send with them and their count, or None when no
    /// connection has anything (each one tried leaves the ready list or sends).
    fn read_host_data(&mut self, room: usize) -> Option<(Header, usize)> {
        while let Some(key) = self.rx_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rx_ready = false;
            if conn.state != ConnState::Established || conn.host_eof {
                continue;
            }
            let max = room.min(conn.peer_free() as usize).min(MAX_PAYLOAD);
            if max == 0 {
                // The guest's buffer is full: ask it to say when it has room.
                let header = conn.header(self.guest_cid, OP_CREDIT_REQUEST, 0, 0);
                return Some((header, 0));
            }
            match std::io::Read::read(&mut conn.stream, &mut self.scratch[..max]) {
                Ok(0) => {
                    // The host will send no more; the guest may still (a half-close).
                    conn.host_eof = true;
                    return Some((
                        conn.header(self.guest_cid, OP_SHUTDOWN, 0, SHUTDOWN_SEND),
                        0,
                    ));
                }
                Ok(n) => {
                    conn.sent_to_guest(n);
                    let header = conn.header(self.guest_cid, OP_RW, n as u32, 0);
                    // More may wait: back in line, after the others.
                    self.mark_ready(key);
                    return Some((header, n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => self.mark_ready(key),
                Err(e) => {
                    log::info!("virtio-vsock: port {}: host read failed: {e}; reset", key.0);
                    let header = conn.header(self.guest_cid, OP_RST, 0, 0);
                    self.drop_conn(key);
                    return Some((header, 0));
                }
            }
        }
        None
    }

    /// Tells the guest, through the event queue, that every connection it had is gone.
    fn send_transport_reset(&mut self) -> bool {
        let Some(active) = self.active.as_mut().filter(|a| !a.broken) else {
            return false;
        };
        let mem = active.mem.clone();
        // Read before the event is used: a guest that hands the buffer back at once moves
        // the index past this.
        let Ok(told_at) = active.queues[EVQ].avail_idx(&mem, std::sync::atomic::Ordering::Acquire)
        else {
            return false;
        };
        let chain = match pop_checked(&mut active.queues[EVQ], &mem) {
            Ok(Some(chain)) => chain,
            Ok(None) => return false,
            Err(e) => {
                active.stop("virtio-vsock", "event", &e);
                return true;
            }
        };
        let head = chain.head_index();
        let written = match Writer::new(&mem, chain) {
            Ok(mut w) => w
                .write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes())
                .map(|()| 4)
                .unwrap_or(0),
            Err(_) => 0,
        };
        if let Err(e) = active.queues[EVQ].add_used(&mem, head, written) {
            log::warn!("virtio-vsock: cannot return event buffer {head}: {e}");
        }
        self.reset_pending = false;
        self.reset_unacked = Some(told_at.0);
        log::info!("virtio-vsock: the guest was told its transport was reset");
        true
    }

    /// The guest handed an event buffer back since it was told of the reset: it handled it.
    fn check_reset_handled(&mut self) {
        let (Some(told_at), Some(active)) = (self.reset_unacked, self.active.as_ref()) else {
            return;
        };
        let now = active.queues[EVQ].avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire);
        if now.map_or(true, |idx| idx.0 != told_at) {
            self.reset_unacked = None;
            log::debug!("virtio-vsock: the guest handled the transport reset");
        }
    }

    /// Serves everything that can be served now: replies first (they make room for the
    /// transmit queue), then the transmit queue, then what it produced.
    fn run_queues(&mut self, ops: &mut EventOps) {
        if self.paused || self.active.is_none() {
            return;
        }
        let mut notify = false;
        if self.reset_pending {
            notify |= self.send_transport_reset();
        }
        self.check_reset_handled();
        notify |= self.process_rx(ops);
        notify |= self.process_tx(ops);
        notify |= self.process_rx(ops);
        if notify {
            if let Some(active) = self.active.as_ref() {
                active.interrupt.signal_used_queue();
            }
        }
    }

    fn on_conn_event(&mut self, key: ConnKey, set: EventSet, ops: &mut EventOps) {
        if set.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR) {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if let Err(e) = conn.flush_to_host() {
                log::info!("virtio-vsock: port {}: {e}; connection reset", key.0);
                self.reset_conn(key);
                return;
            }
            if conn.needs_credit_update() {
                self.queue_control(key, OP_CREDIT_UPDATE, 0);
            }
            if !self.finish_if_done(key) {
                self.shut_host_write_if_done(key);
            }
        }
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.mark_ready(key);
        }
        self.sync_interest(key, ops);
    }

    /// Ends what ran out of time: handshakes without their line, host connections the
    /// guest never answered, closes whose last bytes the host never took.
    fn expire(&mut self, ops: &mut EventOps) {
        let now = Instant::now();
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            log::info!(
                "virtio-vsock: a host connection sent no CONNECT line in {:?}; closed",
                self.timeouts.handshake
            );
            self.drop_handshake(fd, ops);
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(key, _)| *key)
            .collect();
        for key in late {
            log::info!("virtio-vsock: port {}: timed out; connection reset", key.0);
            self.reset_conn(key);
        }
    }

    /// Sets the timer for the earliest deadline left (or clears it).
    fn arm_timer(&mut self) {
        let earliest = self
            .handshakes
            .values()
            .map(|h| h.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .chain(self.listener_retry)
            .min();
        if earliest == self.timer_at {
            return;
        }
        self.timer_at = earliest;
        let result = match earliest {
            Some(at) => {
                // A zero wait would disarm the timer: at least a millisecond.
                let wait = at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = result {
            log::error!("virtio-vsock: cannot set its timer: {e}");
        }
    }
}

/// Reads one guest packet: its header and payload (the header's `len` bytes).
fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<(Header, Vec<u8>), String> {
    let mut reader = Reader::new(mem, chain).map_err(|e| e.to_string())?;
    let mut bytes = [0u8; HEADER_LEN];
    std::io::Read::read_exact(&mut reader, &mut bytes)
        .map_err(|_| "no room for a header".to_string())?;
    let header = Header::parse(&bytes);
    let len = header.len as usize;
    if len > MAX_PAYLOAD {
        return Err(format!("a {len}-byte payload, more than {MAX_PAYLOAD}"));
    }
    if len > reader.available_bytes() {
        return Err(format!("header says {len} bytes, the buffers hold fewer"));
    }
    let mut payload = vec![0u8; len];
    std::io::Read::read_exact(&mut reader, &mut payload)
        .map_err(|_| format!("header says {len} bytes, the buffers hold fewer"))?;
    Ok((header, payload))
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        VsockState {
            guest_cid: self.guest_cid,
            uds_path: self.uds_path.clone(),
            next_local_port: self.next_local_port,
        }
    }

    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut vsock = Self::new(state.guest_cid, &args.uds_path)?;
        vsock.reset_pending = true;
        if (FIRST_LOCAL_PORT..1 << 31).contains(&state.next_local_port) {
            vsock.next_local_port = state.next_local_port;
        }
        Ok(vsock)
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // The socket file would outlive us and refuse every connection; a file put there
        // since (another VMM's socket) is not ours to remove.
        unix::remove_if_ours(&self.uds_path, self.socket_file);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn offered_features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = self.guest_cid.to_le_bytes();
        let start = offset as usize;
        if let Some(src) = config.get(start..(start + data.len()).min(config.len())) {
            data[..src.len()].copy_from_slice(src);
        }
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-vsock: ignoring config write at {offset:#x}");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ActiveQueues::new(ctx)?);
        self.activate_evt.write(1).map_err(ActivateError::Event)
    }

    fn reset(&mut self) {
        if let Some(active) = self.active.take().filter(|a| a.registered) {
            self.retired.retire(active.queue_evts);
        }
        // The driver forgot every connection: so do we (the sockets close on the next
        // wake-up, once the event loop forgets them). A new driver has no old connections
        // to be told about.
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.drop_conn(key);
        }
        self.rx_control.clear();
        self.reset_pending = false;
        self.reset_unacked = None;
        let _ = self.activate_evt.write(1);
    }

    fn pause(&mut self) {
        self.paused = true;
    }

    fn resume(&mut self) {
        self.paused = false;
        let _ = self.activate_evt.write(1);
    }

    fn queue_states(&self) -> Option<Vec<virtio_queue::QueueState>> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(Queue::state).collect())
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        for (events, what) in [
            (Events::new(&self.activate_evt, EventSet::IN), "activation"),
            (Events::new(&self.timer, EventSet::IN), "its timer"),
        ] {
            if let Err(e) = ops.add(events) {
                log::error!("virtio-vsock: cannot watch {what}: {e}");
            }
        }
        self.watch_listener(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.retired.unregister(ops);
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            if let Some(active) = self.active.as_mut() {
                active.register(ops, "virtio-vsock");
            }
            self.close_pending(ops);
            self.run_queues(ops);
            self.sync_all(ops);
        } else if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            self.timer_at = None;
            if self.listener_retry.is_some_and(|at| at <= Instant::now()) {
                self.watch_listener(ops);
                self.accept_all(ops);
            }
            self.expire(ops);
            self.run_queues(ops);
        } else if fd == self.listener.as_raw_fd() {
            self.accept_all(ops);
        } else if let Some(watched) = self.watched.get(&fd).copied() {
            match watched {
                Watched::Handshake => self.advance_handshake(fd, ops),
                Watched::Conn(key) => self.on_conn_event(key, events.event_set(), ops),
            }
            self.run_queues(ops);
        } else if let Some(active) = self.active.as_ref() {
            match active.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
                Some(queue) => {
                    let _ = active.queue_evts[queue].read();
                    self.run_queues(ops);
                }
                None => {
                    // A queue event of an activation that ended.
                    let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                }
            }
        } else {
            let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        }
        self.close_pending(ops);
        self.arm_timer();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    use crate::virtio::Interrupt;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    /// Queue sizes: receive, transmit, event (the transmit queue holds more than a
    /// receive queue's worth of packets).
    const QSIZES: [u16; 3] = [64, 256, 64];
    const RX_BUF: u32 = (HEADER_LEN + 4096) as u32;

    /// A guest driver in a test: three mock queues in guest memory, buffers it posts and
    /// packets it sends, and the device on an event loop of its own.
    struct Driver<'m> {
        mem: &'m GuestMemoryMmap,
        queues: [MockSplitQueue<'m, GuestMemoryMmap>; 3],
        evts: [EventFd; 3],
        /// Per queue: the next descriptor slot, and the buffer address behind each slot.
        next_desc: [u16; 3],
        addrs: [Vec<u64>; 3],
        next_buf: u64,
        seen_used: [u16; 3],
        events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
        device: Arc<Mutex<Vsock>>,
        interrupt: Arc<Interrupt>,
    }

    impl<'m> Driver<'m> {
        fn new(mem: &'m GuestMemoryMmap, device: Vsock) -> Self {
            let queues = [0x0, 0x10000, 0x20000].map(GuestAddress);
            let queues = [0, 1, 2].map(|q| MockSplitQueue::create(mem, queues[q], QSIZES[q]));
            let evts = [(); 3].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let device = Arc::new(Mutex::new(device));
            let mut events =
                EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
            events.add_subscriber(device.clone());
            let interrupt = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
            let mut driver = Self {
                mem,
                queues,
                evts,
                next_desc: [0; 3],
                addrs: [
                    vec![0; usize::from(QSIZES[0])],
                    vec![0; usize::from(QSIZES[1])],
                    vec![0; usize::from(QSIZES[2])],
                ],
                next_buf: 0x10_0000,
                seen_used: [0; 3],
                events,
                device,
                interrupt,
            };
            driver.post(RX, 8, RX_BUF);
            driver.post(EVQ, 2, 4);
            let ctx = ActivateContext {
                mem: mem.clone(),
                interrupt: driver.interrupt.clone(),
                queues: driver
                    .queues
                    .iter()
                    .map(|q| q.create_queue().unwrap())
                    .collect(),
                queue_evts: driver.evts.iter().map(|e| e.try_clone().unwrap()).collect(),
                acked_features: 0,
            };
            driver.device.lock().unwrap().activate(ctx).unwrap();
            driver.pump();
            driver
        }

        /// Runs the event loop until it has nothing more to do.
        fn pump(&mut self) {
            for _ in 0..50 {
                if self.events.run_with_timeout(20).unwrap() == 0 {
                    return;
                }
            }
        }

        fn buffer(&mut self, len: u32) -> u64 {
            let addr = self.next_buf;
            self.next_buf += u64::from(len).next_multiple_of(4096);
            addr
        }

        fn add(&mut self, queue: usize, addr: u64, len: u32, writable: bool) {
            let slot = self.next_desc[queue] % QSIZES[queue];
            self.next_desc[queue] += 1;
            self.addrs[queue][slot as usize] = addr;
            let flags = if writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0));
            // By hand: the mock's own helper does not wrap the available ring.
            let q = &self.queues[queue];
            q.desc_table().store(slot, desc).unwrap();
            let avail = q.avail_addr();
            let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
            let entry = avail.unchecked_add(4 + u64::from(idx % QSIZES[queue]) * 2);
            self.mem.write_obj(slot, entry).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                .unwrap();
        }

        fn post(&mut self, queue: usize, count: usize, len: u32) {
            for _ in 0..count {
                let addr = self.buffer(len);
                self.add(queue, addr, len, true);
            }
            self.evts[queue].write(1).unwrap();
        }

        fn send(&mut self, header: Header, payload: &[u8]) {
            let len = (HEADER_LEN + payload.len()) as u32;
            let addr = self.buffer(len);
            self.mem
                .write_slice(&header.to_bytes(), GuestAddress(addr))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            self.add(TX, addr, len, false);
            self.evts[TX].write(1).unwrap();
            self.pump();
        }

        /// The packets the device put in the receive queue since the last call (receive
        /// buffers are posted again as they are used).
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let used = self.used(RX);
            let count = used.len();
            let packets = used
                .into_iter()
                .map(|(addr, len)| {
                    let mut bytes = vec![0u8; len as usize];
                    self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
                    let header = Header::parse(bytes[..HEADER_LEN].try_into().unwrap());
                    (header, bytes[HEADER_LEN..].to_vec())
                })
                .collect();
            if count > 0 {
                self.post(RX, count, RX_BUF);
                self.pump();
            }
            packets
        }

        /// (buffer address, length written) of each buffer used since the last call.
        fn used(&mut self, queue: usize) -> Vec<(u64, u32)> {
            let ring = self.queues[queue].used();
            let idx = ring.idx().load();
            let mut out = Vec::new();
            while self.seen_used[queue] != idx {
                let elem = ring
                    .ring()
                    .ref_at(usize::from(self.seen_used[queue] % QSIZES[queue]))
                    .unwrap()
                    .load();
                out.push((self.addrs[queue][elem.id() as usize], elem.len()));
                self.seen_used[queue] = self.seen_used[queue].wrapping_add(1);
            }
            out
        }

        fn header(&self, op: u16, src_port: u32, dst_port: u32, len: u32, flags: u32) -> Header {
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port,
                dst_port,
                len,
                type_: TYPE_STREAM,
                op,
                flags,
                buf_alloc: 256 << 10,
                fwd_cnt: 0,
            }
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("reapvm-vsockdev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
        packets.iter().map(|(h, _)| h.op).collect()
    }

    /// The guest connects to host port 5000: reapvm connects to `uds_path_5000`, answers
    /// RESPONSE, carries bytes both ways, and ends the connection with RST once the guest
    /// shut both directions; a port nobody listens on gets RST at once.
    #[test]
    fn a_guest_connection_reaches_the_host_listener() {
        let dir = temp_dir("guest");
        let uds = dir.join("v.sock");
        let host = UnixListener::bind(unix::port_path(&uds, 5000)).unwrap();
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        let request = guest.header(OP_REQUEST, 1111, 5000, 0, 0);
        guest.send(request, &[]);
        let (mut stream, _) = host.accept().unwrap();
        let answer = guest.received();
        assert_eq!(ops(&answer), [OP_RESPONSE]);
        assert_eq!((answer[0].0.src_port, answer[0].0.dst_port), (5000, 1111));
        assert_eq!(answer[0].0.buf_alloc, 64 << 10);

        let rw = guest.header(OP_RW, 1111, 5000, 5, 0);
        guest.send(rw, b"hello");
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        stream.write_all(b"world!").unwrap();
        guest.pump();
        let data = guest.received();
        assert_eq!(ops(&data), [OP_RW]);
        assert_eq!(data[0].1, b"world!");
        assert_eq!(
            data[0].0.fwd_cnt, 5,
            "the packet tells the guest what the host took"
        );

        let shutdown = guest.header(OP_SHUTDOWN, 1111, 5000, 0, SHUTDOWN_RCV | SHUTDOWN_SEND);
        guest.send(shutdown, &[]);
        assert_eq!(ops(&guest.received()), [OP_RST]);
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!(stream.read(&mut got).unwrap(), 0, "the host sees the end");

        let nobody = guest.header(OP_REQUEST, 2222, 5999, 0, 0);
        guest.send(nobody, &[]);
        let refused = guest.received();
        assert_eq!(ops(&refused), [OP_RST]);
        assert_eq!((refused[0].0.src_port, refused[0].0.dst_port), (5999, 2222));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A host program asks for guest port 1234: the guest gets REQUEST from a host port
    /// in Firecracker's range; once it answers, the host reads `OK PORT`.
    #[test]
    fn a_host_connection_is_announced_and_answered_ok() {
        let dir = temp_dir("host");
        let uds = dir.join("v.sock");
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        let mut client = UnixStream::connect(&uds).unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        guest.pump();
        let request = guest.received();
        assert_eq!(ops(&request), [OP_REQUEST]);
        let host_port = request[0].0.src_port;
        assert!(host_port >= 1 << 30);
        assert_eq!(
            (request[0].0.dst_cid, request[0].0.dst_port),
            (GUEST_CID, 1234)
        );
        let response = guest.header(OP_RESPONSE, 1234, host_port, 0, 0);
        guest.send(response, &[]);
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(&line[..n], format!("OK {host_port}\n").as_bytes());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A guest that sends more than its credit while the host reads nothing gets its
    /// connection reset; a packet whose header claims more bytes than its buffers hold, or
    /// more than any packet may carry, is dropped; the device keeps serving.
    #[test]
    fn a_guest_past_its_credit_or_lying_about_lengths_is_refused() {
        let dir = temp_dir("hostile");
        let uds = dir.join("v.sock");
        let host = UnixListener::bind(unix::port_path(&uds, 6000)).unwrap();
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        guest.send(guest.header(OP_REQUEST, 7, 6000, 0, 0), &[]);
        let (_stream, _) = host.accept().unwrap();
        assert_eq!(ops(&guest.received()), [OP_RESPONSE]);
        let chunk = vec![0xabu8; MAX_PAYLOAD];
        let mut reset = false;
        // The host socket's buffer takes some; reapvm keeps 64 KiB more, then refuses.
        for _ in 0..64 {
            guest.send(guest.header(OP_RW, 7, 6000, chunk.len() as u32, 0), &chunk);
            let got = ops(&guest.received());
            if got.contains(&OP_RST) {
                reset = true;
                break;
            }
        }
        assert!(reset, "4 MiB past the credit and no RST");

        let mut lying = guest.header(OP_RW, 7, 6000, 100, 0);
        lying.len = 100;
        guest.send(lying, b"short");
        let mut huge = guest.header(OP_RW, 7, 6000, 0, 0);
        huge.len = u32::MAX;
        guest.send(huge, &[]);
        // Still serving: a new connection works.
        guest.send(guest.header(OP_REQUEST, 8, 6000, 0, 0), &[]);
        let (_second, _) = host.accept().unwrap();
        assert_eq!(ops(&guest.received()), [OP_RESPONSE]);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A restored device tells the guest its transport was reset, and holds new
    /// connections back until the guest has handled that (gives the event buffer back):
    /// Linux handles receive before events, so a connection delivered with the event would
    /// be reset with the old ones.
    #[test]
    fn a_restored_device_resets_the_transport_before_new_connections() {
        let dir = temp_dir("restore");
        let uds = dir.join("v.sock");
        let saved = Vsock::new(GUEST_CID, &uds).unwrap().save();
        let args = VsockArgs {
            uds_path: dir.join("v2.sock"),
        };
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::restore(args, &saved).unwrap());
        let event = guest.used(EVQ);
        assert_eq!(event.len(), 1, "one event");
        let id: u32 = mem.read_obj(GuestAddress(event[0].0)).unwrap();
        assert_eq!((id, event[0].1), (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, 4));
        let mut client = UnixStream::connect(dir.join("v2.sock")).unwrap();
        client.write_all(b"CONNECT 80\n").unwrap();
        guest.pump();
        assert!(
            guest.received().is_empty(),
            "nothing before the guest handled the reset"
        );
        guest.post(EVQ, 1, 4);
        guest.pump();
        assert_eq!(ops(&guest.received()), [OP_REQUEST]);
        let _ = std::fs::remove_dir_all(dir);
    }

    fn short_timeouts(mut vsock: Vsock) -> Vsock {
        let t = Duration::from_millis(100);
        vsock.timeouts = Timeouts {
            handshake: t,
            request: t,
            close: t,
        };
        vsock
    }

    /// Waits past the device's (shortened) timeouts, running its event loop.
    fn run_for(guest: &mut Driver, time: Duration) {
        let end = Instant::now() + time;
        while Instant::now() < end {
            guest.events.run_with_timeout(20).unwrap();
        }
    }

    /// A host client that never finishes its CONNECT line, and a host connection the guest
    /// never answers, are closed when their time is up (the guest gets RST for the second):
    /// neither holds a connection slot for ever.
    #[test]
    fn handshakes_and_unanswered_requests_time_out() {
        let dir = temp_dir("timeouts");
        let uds = dir.join("v.sock");
        let mem = memory();
        let vsock = short_timeouts(Vsock::new(GUEST_CID, &uds).unwrap());
        let mut guest = Driver::new(&mem, vsock);
        let mut silent = UnixStream::connect(&uds).unwrap();
        let mut unanswered = UnixStream::connect(&uds).unwrap();
        unanswered.write_all(b"CONNECT 99\n").unwrap();
        guest.pump();
        assert_eq!(ops(&guest.received()), [OP_REQUEST]);
        run_for(&mut guest, Duration::from_millis(400));
        for (name, client) in [("silent", &mut silent), ("unanswered", &mut unanswered)] {
            client
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 16];
            assert_eq!(
                client.read(&mut buf).unwrap(),
                0,
                "{name} client not closed"
            );
        }
        let rst = guest.received();
        assert_eq!(ops(&rst), [OP_RST]);
        assert_eq!(rst[0].0.dst_port, 99);
        let device = guest.device.lock().unwrap();
        assert_eq!(device.connection_count(), 0);
        drop(device);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A guest that keeps sending while it posts no receive buffers cannot make the device
    /// queue replies without end: past a queue's worth the transmit queue is left alone,
    /// and served again once the guest takes the replies.
    #[test]
    fn replies_the_guest_does_not_take_stop_the_transmit_queue() {
        let dir = temp_dir("backlog");
        let uds = dir.join("v.sock");
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        // Each REQUEST to a port nobody listens on earns an RST; the guest posted 8
        // receive buffers and sends 200 REQUESTs: the device takes them until a receive
        // queue's worth of RSTs waits (64 taken), not all 200; 8 RSTs go out.
        let sent = 200;
        for i in 0..sent {
            let request = guest.header(OP_REQUEST, 1000 + i as u32, 7777, 0, 0);
            let len = HEADER_LEN as u32;
            let addr = guest.buffer(len);
            mem.write_slice(&request.to_bytes(), GuestAddress(addr))
                .unwrap();
            guest.add(TX, addr, len, false);
        }
        guest.evts[TX].write(1).unwrap();
        guest.pump();
        let rx_size = usize::from(QSIZES[RX]);
        assert_eq!(guest.device.lock().unwrap().rx_control.replies, rx_size - 8);
        assert_eq!(
            guest.used(TX).len(),
            rx_size,
            "packets taken with no room for replies"
        );
        assert_eq!(guest.used(RX).len(), 8);
        // The guest posts 56 more buffers: the 56 waiting RSTs go out, and the transmit
        // queue is served again, up to a queue's worth of replies.
        guest.post(RX, 56, RX_BUF);
        guest.pump();
        let delivered = guest.used(RX);
        assert_eq!(delivered.len(), 56);
        assert_eq!(
            guest.used(TX).len(),
            rx_size,
            "the transmit queue was served again"
        );
        let id: [u8; 4] = {
            let mut b = [0u8; 4];
            mem.read_slice(&mut b, GuestAddress(delivered[55].0 + 20))
                .unwrap();
            b
        };
        assert_eq!(u32::from_le_bytes(id), 1000 + 63, "replies in order");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The host shutting its sending side is a half-close: the guest is told the host sends
    /// no more, and what the guest sends still reaches the host.
    #[test]
    fn a_host_half_close_leaves_the_guest_sending() {
        let dir = temp_dir("halfclose");
        let uds = dir.join("v.sock");
        let host = UnixListener::bind(unix::port_path(&uds, 5000)).unwrap();
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        guest.send(guest.header(OP_REQUEST, 1111, 5000, 0, 0), &[]);
        let (mut stream, _) = host.accept().unwrap();
        assert_eq!(ops(&guest.received()), [OP_RESPONSE]);
        stream.write_all(b"request").unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        guest.pump();
        let got = guest.received();
        assert_eq!(ops(&got), [OP_RW, OP_SHUTDOWN]);
        assert_eq!(got[1].0.flags, SHUTDOWN_SEND);
        guest.send(guest.header(OP_RW, 1111, 5000, 6, 0), b"answer");
        let mut answer = [0u8; 6];
        stream.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"answer");
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Host connections waiting for the guest do not hold its transmit queue back: only
    /// replies to its own packets count (else a burst of CONNECTs would stop the guest).
    #[test]
    fn host_requests_do_not_hold_the_transmit_queue() {
        let dir = temp_dir("requests-hold");
        let uds = dir.join("v.sock");
        let mem = memory();
        let mut guest = Driver::new(&mem, Vsock::new(GUEST_CID, &uds).unwrap());
        let clients: Vec<UnixStream> = (0..80)
            .map(|i| {
                let mut c = UnixStream::connect(&uds).unwrap();
                c.write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
                    .unwrap();
                c
            })
            .collect();
        guest.pump();
        let queued = guest.device.lock().unwrap().rx_control.items.len();
        assert!(
            queued > usize::from(QSIZES[RX]) - 8,
            "{queued} REQUESTs waiting"
        );
        guest.send(guest.header(OP_REQUEST, 9, 7777, 0, 0), &[]);
        assert_eq!(guest.used(TX).len(), 1, "the guest's packet was not taken");
        drop(clients);
        let _ = std::fs::remove_dir_all(dir);
    }
}
