//! One vsock stream between a guest port and a host Unix socket: its state, the bytes the
//! guest sent that the host has not taken yet, and the credit both ways (virtio 1.2,
//! 5.10.6.3: a sender never has more bytes in flight than the receiver's `buf_alloc` minus
//! what it has not yet forwarded).

use std::io::{ErrorKind, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// The receive buffer reapvm offers the guest per connection: the most the guest may send
/// before the host socket takes it.
pub const BUF_ALLOC: u32 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: the guest was sent a REQUEST and has not answered.
    AwaitingResponse,
    Established,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("the guest sent {len} bytes with {free} bytes of credit left")]
    CreditExceeded { len: usize, free: usize },
    #[error("cannot write to the host socket: {0}")]
    HostWrite(std::io::Error),
}

pub struct Connection {
    pub stream: UnixStream,
    /// The host side's port: the port the guest connected to, or one reapvm allocated for a
    /// host-initiated connection.
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// Bytes the guest sent that the host socket has not taken yet (at most BUF_ALLOC).
    tx_buf: Vec<u8>,
    /// Bytes forwarded to the host socket, and the count the guest was last told.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest, and the guest's own buffer and forwarded count.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket reached its end; the guest was told.
    pub host_eof: bool,
    /// In the device's list of connections with bytes for the guest.
    pub in_rx_ready: bool,
    /// When the connection is reset if it has not moved on: the guest's answer to a host
    /// connection, or a close's last bytes reaching the host.
    pub deadline: Option<Instant>,
}

impl Connection {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32, state: ConnState) -> Self {
        Self {
            stream,
            local_port,
            peer_port,
            state,
            tx_buf: Vec::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            in_rx_ready: false,
            deadline: None,
        }
    }

    /// Every guest packet carries its receive buffer and forwarded count.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// How many more bytes the guest can take now.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    pub fn sent_to_guest(&mut self, bytes: usize) {
        self.rx_cnt += Wrapping(bytes as u32);
    }

    /// A packet header from the host side of this connection, telling the guest the
    /// current credit.
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The guest has half its credit or more to learn of: tell it before it stalls.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= BUF_ALLOC / 2
    }

    /// Data from the guest for the host socket: written now as far as the socket takes it,
    /// the rest kept. A guest that sends past its credit broke the protocol.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnError> {
        let free = BUF_ALLOC as usize - self.tx_buf.len();
        if data.len() > free {
            return Err(ConnError::CreditExceeded {
                len: data.len(),
                free,
            });
        }
        let mut written = 0;
        if self.tx_buf.is_empty() {
            written = self.write_some(data)?;
        }
        self.tx_buf.extend_from_slice(&data[written..]);
        Ok(())
    }

    /// Writes what the host socket can take of the kept bytes.
    pub fn flush_to_host(&mut self) -> Result<(), ConnError> {
        if self.tx_buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.tx_buf);
        let result = self.write_some(&buf);
        self.tx_buf = buf;
        let written = result?;
        self.tx_buf.drain(..written);
        Ok(())
    }

    fn write_some(&mut self, data: &[u8]) -> Result<usize, ConnError> {
        let mut written = 0;
        while written < data.len() {
            match self.stream.write(&data[written..]) {
                Ok(0) => {
                    return Err(ConnError::HostWrite(std::io::Error::from(
                        ErrorKind::WriteZero,
                    )))
                }
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        Ok(written)
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (Connection, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (
            Connection::new(ours, 1024, 5000, ConnState::Established),
            theirs,
        )
    }

    #[test]
    fn the_guest_s_credit_is_its_buffer_less_what_it_has_not_forwarded() {
        let (mut conn, _host) = pair();
        assert_eq!(conn.peer_free(), 0, "no credit before the guest says");
        let mut header = conn.header(3, 0, 0, 0);
        header.buf_alloc = 1000;
        header.fwd_cnt = 0;
        conn.update_peer_credit(&header);
        conn.sent_to_guest(600);
        assert_eq!(conn.peer_free(), 400);
        header.fwd_cnt = 500;
        conn.update_peer_credit(&header);
        assert_eq!(conn.peer_free(), 900);
        // A guest whose forwarded count runs ahead of what it was sent gets no credit from
        // the lie: the wrapped difference is huge, the free space none.
        header.fwd_cnt = 10_000;
        conn.update_peer_credit(&header);
        assert_eq!(conn.peer_free(), 0);
    }

    /// Bytes the host socket cannot take yet are kept, counted as forwarded only once
    /// written, and a guest that sends past BUF_ALLOC is refused.
    #[test]
    fn data_is_kept_until_the_host_takes_it_and_credit_is_enforced() {
        let (mut conn, mut host) = pair();
        // Fill the socket's buffer so writes would block.
        let chunk = vec![7u8; 16 << 10];
        let mut sent = 0usize;
        loop {
            conn.send_to_host(&chunk).unwrap();
            sent += chunk.len();
            if conn.has_pending_tx() {
                break;
            }
        }
        let kept = conn.tx_buf.len();
        assert!(kept > 0);
        assert_eq!(conn.fwd_cnt.0 as usize, sent - kept);
        let room = BUF_ALLOC as usize - kept;
        match conn.send_to_host(&vec![1u8; room + 1]) {
            Err(ConnError::CreditExceeded { len, free }) => {
                assert_eq!((len, free), (room + 1, room))
            }
            other => panic!("expected CreditExceeded, got {other:?}"),
        }
        // The host reads everything; the kept bytes follow in order.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; sent];
            host.read_exact(&mut got).unwrap();
            got
        });
        while conn.has_pending_tx() {
            conn.flush_to_host().unwrap();
            std::thread::yield_now();
        }
        assert_eq!(conn.fwd_cnt.0 as usize, sent);
        assert!(reader.join().unwrap().iter().all(|b| *b == 7));
        assert!(conn.needs_credit_update());
        conn.header(3, 0, 0, 0);
        assert!(!conn.needs_credit_update(), "a header carries the count");
    }
}
