//! The network side of MMDS: the frames a guest sends to the MMDS address are taken off its
//! network interface and given to this stack instead of the tap; what the stack answers is
//! put in the guest's receive queue. TCP/IP is smoltcp's (an IP-only interface); ARP is
//! answered here, and answers go to the MAC address the guest's frames came from, as
//! Firecracker's MMDS does, so a guest reaches MMDS through a route over the interface or
//! through its gateway alike. HTTP on port 80 is [`super::http`]'s.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Checksum, Device, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, HardwareAddress, IpCidr,
};

use super::http::{RequestCounts, Session};
use super::store::MmdsStore;

/// Firecracker's MMDS MAC address: the source of every frame MMDS sends.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
pub const DEFAULT_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const PORT: u16 = 80;
/// Connections at once, as Firecracker's MMDS; one more evicts the least useful.
const MAX_CONNECTIONS: usize = 30;
/// Packets waiting either way: more from the guest are dropped (TCP sends them again),
/// and the stack stops sending while the guest takes none.
const MAX_QUEUED: usize = 256;
const MTU: usize = 1500;
const ETHERNET_HEADER: usize = 14;
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
const IP_PROTOCOL_TCP: u8 = 6;
const RX_BUFFER: usize = 8 * 1024;
const TX_BUFFER: usize = 16 * 1024;
/// smoltcp resets a connection the guest sent nothing on for this long: one it stopped
/// acknowledging, or one it left open and idle.
const SILENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether a link-local IPv4 address may be MMDS's (RFC 3927, as Firecracker checks).
pub fn is_valid_mmds_ipv4(addr: Ipv4Addr) -> bool {
    matches!(addr.octets(), [169, 254, third, _] if third != 0 && third != 255)
}

/// What the stacks saw and did, totals since the VMM started, kept in the data store that
/// all of them share; the names are Firecracker's `mmds` metrics' where it has them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MmdsCounts {
    /// Frames taken off an interface for MMDS.
    #[serde(rename = "rx_accepted")]
    pub frames_in: u64,
    /// Frames MMDS gave the guest.
    #[serde(rename = "tx_frames")]
    pub frames_out: u64,
    /// Frames for MMDS that were neither an ARP request for it nor TCP, or came while the
    /// queue from the guest was full.
    #[serde(rename = "rx_accepted_unusual")]
    pub frames_dropped: u64,
    #[serde(rename = "connections_created")]
    pub connections: u64,
    #[serde(flatten)]
    pub requests: RequestCounts,
}

/// smoltcp's device: IP packets in from the guest, out to it.
#[derive(Default)]
struct Wire {
    from_guest: VecDeque<Vec<u8>>,
    to_guest: VecDeque<Vec<u8>>,
}

struct Received(Vec<u8>);
struct Send<'a>(&'a mut VecDeque<Vec<u8>>);

impl smoltcp::phy::RxToken for Received {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl smoltcp::phy::TxToken for Send<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}

impl Device for Wire {
    type RxToken<'a> = Received;
    type TxToken<'a> = Send<'a>;

    fn receive(
        &mut self,
        _now: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // smoltcp answers some packets as it reads them (a reset, an ACK): nothing is read
        // while there is no room for the answer.
        if self.to_guest.len() >= MAX_QUEUED {
            return None;
        }
        let packet = self.from_guest.pop_front()?;
        Some((Received(packet), Send(&mut self.to_guest)))
    }

    fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        (self.to_guest.len() < MAX_QUEUED).then_some(Send(&mut self.to_guest))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // The guest may leave checksums to the device (VIRTIO_NET_F_CSUM): nothing
        // crosses a wire here, so what comes in is not checked; what goes out is complete.
        caps.checksum.ipv4 = Checksum::Tx;
        caps.checksum.tcp = Checksum::Tx;
        caps.checksum.udp = Checksum::Tx;
        caps.checksum.icmpv4 = Checksum::Tx;
        caps
    }
}

struct Connection {
    handle: SocketHandle,
    session: Session,
    /// Answer bytes not yet in the socket's send buffer.
    unsent: VecDeque<u8>,
    close_when_sent: bool,
    opened: Instant,
}

pub struct MmdsStack {
    ipv4: Ipv4Addr,
    store: Arc<Mutex<MmdsStore>>,
    /// Where answers go: the source of the guest's last frame to MMDS.
    guest_mac: Option<[u8; 6]>,
    arp_reply: Option<Vec<u8>>,
    wire: Wire,
    iface: Interface,
    sockets: SocketSet<'static>,
    connections: Vec<Connection>,
    epoch: Instant,
}

impl MmdsStack {
    pub fn new(ipv4: Ipv4Addr, store: Arc<Mutex<MmdsStore>>) -> Self {
        let mut wire = Wire::default();
        let mut config = Config::new(HardwareAddress::Ip);
        let mut seed = [0u8; 8];
        // Only the initial sequence numbers depend on it; a fixed one is merely guessable.
        let _ = getrandom::fill(&mut seed);
        config.random_seed = u64::from_ne_bytes(seed);
        let epoch = Instant::now();
        let mut iface = Interface::new(config, &mut wire, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(ipv4.into(), 32));
        });
        // The guest's address may be on any subnet: every answer goes straight back out of
        // the interface, to the MAC address the guest's frames came from.
        let _ = iface.routes_mut().add_default_ipv4_route(ipv4);
        let mut stack = Self {
            ipv4,
            store,
            guest_mac: None,
            arp_reply: None,
            wire,
            iface,
            sockets: SocketSet::new(Vec::new()),
            connections: Vec::new(),
            epoch,
        };
        stack.add_listener(epoch);
        stack
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    fn count(&self, f: impl FnOnce(&mut MmdsCounts)) {
        f(self
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .counts_mut());
    }

    /// Whether an Ethernet frame from the guest is for MMDS: an ARP request for its
    /// address, or an IPv4 packet to it. Looks only at fixed offsets: it runs per frame.
    pub fn is_mmds_frame(&self, frame: &[u8]) -> bool {
        let addr = self.ipv4.octets();
        match frame.get(12..14) {
            Some(t) if t == ETHERTYPE_ARP => {
                // htype 1, ptype IPv4, hlen 6, plen 4; the target address ends the packet.
                frame.get(14..20) == Some(&[0, 1, 8, 0, 6, 4])
                    && frame.get(ETHERNET_HEADER + 24..ETHERNET_HEADER + 28) == Some(&addr)
            }
            Some(t) if t == ETHERTYPE_IPV4 => {
                frame.get(ETHERNET_HEADER + 16..ETHERNET_HEADER + 20) == Some(&addr)
            }
            _ => false,
        }
    }

    /// Takes a frame [`Self::is_mmds_frame`] accepted and serves it.
    pub fn receive_frame(&mut self, frame: &[u8], now: Instant) {
        self.count(|c| c.frames_in += 1);
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.count(|c| c.frames_dropped += 1);
            return;
        };
        match eth.ethertype() {
            EthernetProtocol::Arp => self.receive_arp(eth.payload()),
            // Only TCP, as Firecracker's MMDS: no pings or UDP answered.
            EthernetProtocol::Ipv4
                if eth.payload().get(9) == Some(&IP_PROTOCOL_TCP)
                    && self.wire.from_guest.len() < MAX_QUEUED =>
            {
                self.guest_mac = Some(eth.src_addr().0);
                self.wire.from_guest.push_back(eth.payload().to_vec());
                self.poll(now);
            }
            _ => self.count(|c| c.frames_dropped += 1),
        }
    }

    fn receive_arp(&mut self, packet: &[u8]) {
        let request = ArpPacket::new_checked(packet).and_then(|p| ArpRepr::parse(&p));
        let Ok(ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Request,
            source_hardware_addr,
            source_protocol_addr,
            target_protocol_addr,
            ..
        }) = request
        else {
            self.count(|c| c.frames_dropped += 1);
            return;
        };
        if target_protocol_addr != self.ipv4 {
            self.count(|c| c.frames_dropped += 1);
            return;
        }
        self.guest_mac = Some(source_hardware_addr.0);
        let reply = ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(MMDS_MAC),
            source_protocol_addr: self.ipv4,
            target_hardware_addr: source_hardware_addr,
            target_protocol_addr: source_protocol_addr,
        };
        let mut frame = vec![0; ETHERNET_HEADER + reply.buffer_len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(MMDS_MAC),
            dst_addr: source_hardware_addr,
            ethertype: EthernetProtocol::Arp,
        }
        .emit(&mut eth);
        reply.emit(&mut ArpPacket::new_unchecked(eth.payload_mut()));
        // One reply is enough: a guest asking again before it took it gets the same.
        self.arp_reply = Some(frame);
    }

    /// The next Ethernet frame for the guest, if any.
    pub fn next_frame(&mut self, now: Instant) -> Option<Vec<u8>> {
        if let Some(frame) = self.arp_reply.take() {
            self.count(|c| c.frames_out += 1);
            return Some(frame);
        }
        let guest_mac = self.guest_mac?;
        let packet = self.wire.to_guest.pop_front()?;
        if self.wire.to_guest.len() + 1 == MAX_QUEUED {
            // The queue had been full: the stack may send again.
            self.poll(now);
        }
        let mut frame = vec![0; ETHERNET_HEADER + packet.len()];
        let mut eth = EthernetFrame::new_unchecked(&mut frame[..]);
        EthernetRepr {
            src_addr: EthernetAddress(MMDS_MAC),
            dst_addr: EthernetAddress(guest_mac),
            ethertype: EthernetProtocol::Ipv4,
        }
        .emit(&mut eth);
        eth.payload_mut().copy_from_slice(&packet);
        self.count(|c| c.frames_out += 1);
        Some(frame)
    }

    pub fn has_frames(&self) -> bool {
        self.arp_reply.is_some() || (self.guest_mac.is_some() && !self.wire.to_guest.is_empty())
    }

    /// How long until the stack must run again (retransmissions, closing connections);
    /// None: only when the guest sends.
    pub fn next_poll(&mut self, now: Instant) -> Option<Duration> {
        if self.wire.to_guest.len() >= MAX_QUEUED {
            // Nothing can go out until the guest takes frames; `next_frame` runs the stack
            // again then.
            return None;
        }
        let at = self.timestamp(now);
        self.iface
            .poll_delay(at, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    fn timestamp(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(
            i64::try_from(now.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(i64::MAX),
        )
    }

    /// Runs TCP and the HTTP sessions until neither has more to do now.
    pub fn poll(&mut self, now: Instant) {
        let at = self.timestamp(now);
        for _ in 0..16 {
            self.iface.poll(at, &mut self.wire, &mut self.sockets);
            if !self.serve_connections(now) {
                break;
            }
        }
    }

    /// Moves bytes between the sockets and the sessions, drops closed connections and keeps
    /// one socket listening. Returns whether anything moved (the interface has more to do).
    fn serve_connections(&mut self, now: Instant) -> bool {
        let mut moved = false;
        let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
        let mut requests = store.counts_mut().requests;
        let sockets = &mut self.sockets;
        self.connections.retain_mut(|conn| {
            let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
            if socket.state() == tcp::State::Closed {
                sockets.remove(conn.handle);
                return false;
            }
            // One answer at a time: a guest that sends requests without reading the
            // answers is held back by TCP's window, not buffered here.
            loop {
                if conn.unsent.is_empty() {
                    while socket.can_recv() && conn.session.room() > 0 {
                        match socket.recv(|bytes| {
                            let n = conn.session.feed(bytes);
                            (n, n)
                        }) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => moved = true,
                        }
                    }
                    let Some(answer) = conn.session.next_answer(&mut store, &mut requests, now)
                    else {
                        break;
                    };
                    conn.unsent.extend(answer.bytes);
                    conn.close_when_sent |= answer.close;
                }
                while !conn.unsent.is_empty() && socket.can_send() {
                    let (front, _) = conn.unsent.as_slices();
                    match socket.send_slice(front) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            conn.unsent.drain(..n);
                            moved = true;
                        }
                    }
                }
                if !conn.unsent.is_empty() {
                    break;
                }
            }
            // The guest closed its side and everything it sent is answered.
            let peer_done = socket.state() == tcp::State::CloseWait && !socket.can_recv();
            if conn.unsent.is_empty() && (conn.close_when_sent || peer_done) && socket.is_open() {
                socket.close();
                moved = true;
            }
            true
        });
        store.counts_mut().requests = requests;
        drop(store);
        self.keep_listening(now);
        moved
    }

    fn keep_listening(&mut self, now: Instant) {
        let listening = self
            .connections
            .iter()
            .any(|c| self.sockets.get::<tcp::Socket>(c.handle).state() == tcp::State::Listen);
        if listening {
            return;
        }
        // The listener just took a connection.
        self.count(|c| c.connections += 1);
        if self.connections.len() >= MAX_CONNECTIONS {
            // Reset the connection least likely to be missed: one closing, else the oldest.
            let closing = |c: &&Connection| {
                use tcp::State::*;
                let state = self.sockets.get::<tcp::Socket>(c.handle).state();
                matches!(state, FinWait1 | FinWait2 | Closing | TimeWait | LastAck)
            };
            let victim = self
                .connections
                .iter()
                .find(closing)
                .or_else(|| self.connections.iter().min_by_key(|c| c.opened))
                .map(|c| c.handle);
            if let Some(handle) = victim {
                self.sockets.get_mut::<tcp::Socket>(handle).abort();
                // Removed once closed, after the reset went out.
            }
        }
        self.add_listener(now);
    }

    fn add_listener(&mut self, now: Instant) {
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; RX_BUFFER]),
            tcp::SocketBuffer::new(vec![0; TX_BUFFER]),
        );
        socket.set_timeout(Some(smoltcp::time::Duration::from_millis(
            SILENCE_TIMEOUT.as_millis() as u64,
        )));
        socket.set_ack_delay(None);
        // An answer's last segment goes out at once, not after the guest's delayed ACK.
        socket.set_nagle_enabled(false);
        if let Err(e) = socket.listen(PORT) {
            log::error!("MMDS: cannot listen on port {PORT}: {e}");
            return;
        }
        let handle = self.sockets.add(socket);
        self.connections.push(Connection {
            handle,
            session: Session::default(),
            unsent: VecDeque::new(),
            close_when_sent: false,
            opened: now,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmds::store::{MmdsVersion, DEFAULT_SIZE_LIMIT};
    use smoltcp::wire::IpAddress;

    const GUEST_MAC: [u8; 6] = [6, 0, 0xac, 0x10, 0, 2];

    /// The guest's side: a smoltcp Ethernet interface whose frames go to the stack.
    #[derive(Default)]
    struct GuestNic {
        rx: VecDeque<Vec<u8>>,
        tx: VecDeque<Vec<u8>>,
    }

    impl Device for GuestNic {
        type RxToken<'a> = Received;
        type TxToken<'a> = Send<'a>;

        fn receive(
            &mut self,
            _now: smoltcp::time::Instant,
        ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
            let frame = self.rx.pop_front()?;
            Some((Received(frame), Send(&mut self.tx)))
        }

        fn transmit(&mut self, _now: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
            Some(Send(&mut self.tx))
        }

        fn capabilities(&self) -> DeviceCapabilities {
            let mut caps = DeviceCapabilities::default();
            caps.medium = Medium::Ethernet;
            caps.max_transmission_unit = MTU + ETHERNET_HEADER;
            caps
        }
    }

    struct Guest {
        nic: GuestNic,
        iface: Interface,
        sockets: SocketSet<'static>,
        epoch: Instant,
        /// Frames that were not for MMDS (they would go to the tap).
        to_tap: usize,
    }

    impl Guest {
        /// A guest on 172.16.0.2/24 with a route to 169.254.0.0/16 over the interface (the
        /// `ip route add 169.254.169.254 dev eth0` of Firecracker's guide).
        fn new() -> Self {
            let mut nic = GuestNic::default();
            let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GUEST_MAC)));
            let mut iface = Interface::new(config, &mut nic, smoltcp::time::Instant::ZERO);
            iface.update_ip_addrs(|a| {
                a.push(IpCidr::new(Ipv4Addr::new(172, 16, 0, 2).into(), 24))
                    .unwrap();
                a.push(IpCidr::new(Ipv4Addr::new(169, 254, 1, 2).into(), 16))
                    .unwrap();
            });
            Self {
                nic,
                iface,
                sockets: SocketSet::new(Vec::new()),
                epoch: Instant::now(),
                to_tap: 0,
            }
        }

        fn connect(&mut self, port: u16, mmds: Ipv4Addr) -> SocketHandle {
            let socket = tcp::Socket::new(
                tcp::SocketBuffer::new(vec![0; 4096]),
                tcp::SocketBuffer::new(vec![0; 4096]),
            );
            let handle = self.sockets.add(socket);
            let cx = self.iface.context();
            self.sockets
                .get_mut::<tcp::Socket>(handle)
                .connect(cx, (IpAddress::Ipv4(mmds), PORT), port)
                .unwrap();
            handle
        }

        /// Runs both sides until nothing moves.
        fn run(&mut self, stack: &mut MmdsStack) {
            for _ in 0..10_000 {
                let now = Instant::now();
                let at = smoltcp::time::Instant::from_micros(
                    now.duration_since(self.epoch).as_micros() as i64,
                );
                self.iface.poll(at, &mut self.nic, &mut self.sockets);
                let mut moved = false;
                while let Some(frame) = self.nic.tx.pop_front() {
                    moved = true;
                    if stack.is_mmds_frame(&frame) {
                        stack.receive_frame(&frame, now);
                    } else {
                        self.to_tap += 1;
                    }
                }
                // As the network device runs it: on a frame from the guest (above), when
                // the guest takes frames, and when its timer fires; never otherwise.
                if stack.next_poll(now).is_some_and(|d| d.is_zero()) {
                    stack.poll(now);
                }
                while let Some(frame) = stack.next_frame(now) {
                    moved = true;
                    self.nic.rx.push_back(frame);
                }
                if moved {
                    continue;
                }
                // Quiet: wait for the nearer timer of either side, if one is due soon.
                let guest_wait = self
                    .iface
                    .poll_delay(at, &self.sockets)
                    .map(|d| Duration::from_micros(d.total_micros()));
                let wait = [guest_wait, stack.next_poll(now)]
                    .into_iter()
                    .flatten()
                    .min();
                match wait {
                    Some(wait) if wait <= Duration::from_millis(100) => {
                        std::thread::sleep(wait);
                        if stack.next_poll(Instant::now()).is_some_and(|d| d.is_zero()) {
                            stack.poll(Instant::now());
                        }
                    }
                    _ => return,
                }
            }
            panic!("the guest and MMDS never settled");
        }

        /// Sends `request` on a new connection and returns everything the stack answered
        /// until it closed.
        fn ask(&mut self, stack: &mut MmdsStack, port: u16, request: &str) -> String {
            let handle = self.connect(port, DEFAULT_IPV4);
            self.run(stack);
            let socket = self.sockets.get_mut::<tcp::Socket>(handle);
            assert!(socket.may_send(), "connected: {}", socket.state());
            socket.send_slice(request.as_bytes()).unwrap();
            let mut answer = Vec::new();
            for _ in 0..1000 {
                self.run(stack);
                let socket = self.sockets.get_mut::<tcp::Socket>(handle);
                while socket.can_recv() {
                    socket
                        .recv(|b| {
                            answer.extend_from_slice(b);
                            (b.len(), ())
                        })
                        .unwrap();
                }
                if !socket.may_recv() {
                    socket.close();
                    self.run(stack);
                    self.sockets.remove(handle);
                    return String::from_utf8(answer).unwrap();
                }
            }
            panic!("no end of answer: {:?}", String::from_utf8_lossy(&answer));
        }
    }

    fn stack_with(data: serde_json::Value, version: MmdsVersion) -> MmdsStack {
        let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        store.configure(version, false);
        store.put(data).unwrap();
        MmdsStack::new(DEFAULT_IPV4, Arc::new(Mutex::new(store)))
    }

    #[test]
    fn a_guest_reads_mmds_over_arp_and_tcp() {
        let mut stack = stack_with(
            serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678"}}}),
            MmdsVersion::V2,
        );
        let mut guest = Guest::new();
        let token = guest.ask(
            &mut stack,
            40000,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\nConnection: close\r\n\r\n",
        );
        assert!(token.starts_with("HTTP/1.1 200 OK"), "{token}");
        let token = token.split_once("\r\n\r\n").unwrap().1;
        let answer = guest.ask(
            &mut stack,
            40001,
            &format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\nConnection: close\r\n\r\n"),
        );
        assert!(answer.ends_with("\r\n\r\nami-12345678"), "{answer}");
        assert_eq!(guest.to_tap, 0, "everything went to MMDS");
        let counts = stack.store.lock().unwrap().counts();
        assert_eq!(counts.requests.requests, 2);
        assert_eq!(counts.connections, 2);
        assert_eq!(counts.frames_dropped, 0);
    }

    #[test]
    fn an_answer_larger_than_the_windows_arrives_whole() {
        let big = "x".repeat(45_000);
        let mut stack = stack_with(serde_json::json!({ "big": big }), MmdsVersion::V1);
        let mut guest = Guest::new();
        let answer = guest.ask(
            &mut stack,
            40002,
            "GET /big HTTP/1.0\r\nAccept: text/plain\r\n\r\n",
        );
        let body = answer.split_once("\r\n\r\n").unwrap().1;
        assert_eq!(body, big);
    }

    #[test]
    fn connections_beyond_the_limit_evict_and_the_next_is_served() {
        let mut stack = stack_with(serde_json::json!({ "k": "v" }), MmdsVersion::V1);
        let mut guest = Guest::new();
        // Idle connections, never closed by the guest.
        let idle: Vec<_> = (0..MAX_CONNECTIONS as u16 + 5)
            .map(|i| guest.connect(41000 + i, DEFAULT_IPV4))
            .collect();
        guest.run(&mut stack);
        let answer = guest.ask(
            &mut stack,
            42000,
            "GET /k HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(answer.ends_with("\r\n\r\nv"), "{answer}");
        assert!(
            stack.connections.len() <= MAX_CONNECTIONS + 1,
            "{} connections held",
            stack.connections.len()
        );
        let reset = idle
            .iter()
            .filter(|h| guest.sockets.get::<tcp::Socket>(**h).state() == tcp::State::Closed)
            .count();
        assert!(reset >= 5, "only {reset} idle connections were reset");
    }

    #[test]
    fn only_frames_for_the_mmds_address_are_taken() {
        let stack = stack_with(serde_json::json!({}), MmdsVersion::V1);
        let mut ipv4 = vec![0u8; 34];
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        ipv4[30..34].copy_from_slice(&[169, 254, 169, 254]);
        assert!(stack.is_mmds_frame(&ipv4));
        ipv4[33] = 253;
        assert!(!stack.is_mmds_frame(&ipv4));
        assert!(!stack.is_mmds_frame(&ipv4[..20]), "a short frame is not");
        let mut arp = vec![0u8; 42];
        arp[12..14].copy_from_slice(&ETHERTYPE_ARP);
        arp[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
        arp[38..42].copy_from_slice(&[169, 254, 169, 254]);
        assert!(stack.is_mmds_frame(&arp));
        arp[41] = 1;
        assert!(!stack.is_mmds_frame(&arp));
        assert!(is_valid_mmds_ipv4(Ipv4Addr::new(169, 254, 170, 2)));
        assert!(!is_valid_mmds_ipv4(Ipv4Addr::new(169, 254, 0, 2)));
        assert!(!is_valid_mmds_ipv4(Ipv4Addr::new(169, 254, 255, 2)));
        assert!(!is_valid_mmds_ipv4(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn garbage_frames_are_counted_not_served() {
        let mut stack = stack_with(serde_json::json!({}), MmdsVersion::V1);
        let now = Instant::now();
        let mut arp_reply = vec![0u8; 42];
        arp_reply[12..14].copy_from_slice(&ETHERTYPE_ARP);
        arp_reply[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        arp_reply[38..42].copy_from_slice(&[169, 254, 169, 254]);
        stack.receive_frame(&arp_reply, now);
        let mut ipv4 = vec![0xffu8; 60];
        ipv4[12..14].copy_from_slice(&ETHERTYPE_IPV4);
        stack.receive_frame(&ipv4, now);
        stack.receive_frame(&[1, 2, 3], now);
        assert_eq!(stack.next_frame(now), None);
        assert_eq!(
            stack.store.lock().unwrap().counts().frames_dropped,
            3,
            "the ARP reply, the packet that is not TCP, and the short frame"
        );
        assert_eq!(stack.store.lock().unwrap().counts().frames_in, 3);
    }

    /// A guest that sends requests without end and never reads an answer gets one answer
    /// buffered per connection, the rest held back by TCP.
    #[test]
    fn pipelined_requests_never_read_are_held_back() {
        let big = "x".repeat(20_000);
        let mut stack = stack_with(serde_json::json!({ "big": big }), MmdsVersion::V1);
        let mut guest = Guest::new();
        let handle = guest.connect(43000, DEFAULT_IPV4);
        guest.run(&mut stack);
        let request = b"GET /big HTTP/1.1\r\n\r\n";
        for _ in 0..200 {
            let socket = guest.sockets.get_mut::<tcp::Socket>(handle);
            while socket.can_send() && socket.send_slice(request).unwrap_or(0) == request.len() {}
            guest.run(&mut stack);
        }
        let held: usize = stack.connections.iter().map(|c| c.unsent.len()).sum();
        assert!(held <= 20_100, "{held} bytes of answers held");
        let answered = stack.store.lock().unwrap().counts().requests.requests;
        assert!(
            answered < 10,
            "{answered} requests answered to a guest that reads nothing"
        );
    }

    #[test]
    fn nothing_is_read_while_the_queue_to_the_guest_is_full() {
        let mut wire = Wire::default();
        wire.from_guest.push_back(vec![0; 40]);
        wire.to_guest.extend((0..MAX_QUEUED).map(|_| vec![0; 40]));
        assert!(wire.receive(smoltcp::time::Instant::ZERO).is_none());
        assert!(wire.transmit(smoltcp::time::Instant::ZERO).is_none());
        wire.to_guest.pop_front();
        assert!(wire.receive(smoltcp::time::Instant::ZERO).is_some());
    }
}
