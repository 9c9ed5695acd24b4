//! The virtio-vsock device model: packets from the tx queue drive the
//! connection table; control packets and host data go out on the rx queue.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::connection::{Backend, ConnState, Connection, OUR_BUF_ALLOC};
use super::packet::{op, Header, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::tools::{ToolsStatus, MAX_LINE};
use super::{
    VsockError, EVT, HOST_CID, QUEUE_SIZE, RX, TOOLS_PORT, TX, VIRTIO_ID_VSOCK,
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET,
};
use crate::devices::virtio::{DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

/// Largest payload accepted from or sent to the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;
/// First event-loop token used for host sockets (below: queues, listener,
/// tools wake-up).
pub const FIRST_SOCKET_TOKEN: u32 = 16;
/// Token of the listening socket.
pub const LISTENER_TOKEN: u32 = 3;
/// Token of the tools wake-up eventfd.
pub const TOOLS_TOKEN: u32 = 4;
/// Ports the VMM hands to host-initiated connections start here.
const FIRST_HOST_PORT: u32 = 1 << 30;

/// A change the event loop must make to its watched fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdChange {
    /// Watch `fd` for `events` (add or modify), reported as `token`.
    Set(RawFd, u32, EventSet),
    /// Stop watching `fd`.
    Remove(RawFd),
}

/// (host port, guest port).
type Key = (u32, u32);

/// What a socket token refers to.
enum Target {
    /// An established or connecting stream.
    Conn(Key),
    /// A host connection that has not sent `CONNECT <port>` yet.
    Pending,
}

/// A virtio-vsock device.
pub struct Vsock {
    pub(super) cid: u64,
    pub(super) uds_path: PathBuf,
    pub(super) listener: UnixListener,
    pub(super) conns: HashMap<Key, Connection>,
    pub(super) pending: HashMap<u32, (UnixStream, Vec<u8>)>,
    targets: HashMap<u32, Target>,
    next_token: u32,
    next_host_port: u32,
    /// Control packets waiting for rx buffers.
    pub(super) ctrl: VecDeque<Header>,
    tools: Arc<ToolsStatus>,
    fd_changes: Vec<FdChange>,
    /// Closed streams kept until the event loop has unregistered them, so
    /// their fd numbers cannot be reused in between.
    graveyard: Vec<UnixStream>,
    /// A VIRTIO_VSOCK_EVENT_TRANSPORT_RESET waits for an event-queue
    /// buffer (set on restore: the guest must drop its connections, whose
    /// host ends did not survive).
    pub(super) transport_reset_pending: bool,
    queue_sizes: [u16; 3],
}

impl Vsock {
    /// A device for guest `cid`, listening on `uds_path` for host-initiated
    /// connections (a stale socket file there is replaced).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if cid < 3 || cid > u64::from(u32::MAX) {
            return Err(VsockError::BadCid(cid));
        }
        let listen_err = |source| VsockError::Listen {
            path: uds_path.to_path_buf(),
            source,
        };
        if std::fs::symlink_metadata(uds_path)
            .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            .unwrap_or(false)
        {
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        Ok(Self {
            cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            pending: HashMap::new(),
            targets: HashMap::new(),
            next_token: FIRST_SOCKET_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            ctrl: VecDeque::new(),
            tools: Arc::new(ToolsStatus::new().map_err(VsockError::EventFd)?),
            fd_changes: Vec::new(),
            graveyard: Vec::new(),
            transport_reset_pending: false,
            queue_sizes: [QUEUE_SIZE; 3],
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The host socket path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The tools channel status, shared with the control API.
    pub fn tools(&self) -> Arc<ToolsStatus> {
        self.tools.clone()
    }

    /// The listening socket's fd (for the event loop).
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Open connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Fd changes since the last call, for the event loop to apply.
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.fd_changes)
    }

    /// Drops closed streams once the event loop no longer watches them.
    pub fn bury(&mut self) {
        self.graveyard.clear();
    }

    fn token(&mut self, t: Target) -> u32 {
        let tok = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(FIRST_SOCKET_TOKEN);
        self.targets.insert(tok, t);
        tok
    }

    fn reply(&self, c: &Connection, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: c.host_port,
            dst_port: c.guest_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: OUR_BUF_ALLOC,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// Queues RST for a packet that has no connection.
    fn rst_for(&mut self, h: &Header) {
        if h.op == op::RST {
            return;
        }
        self.ctrl.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            buf_alloc: OUR_BUF_ALLOC,
            ..Header::default()
        });
    }

    /// Closes a connection and tells the guest with RST.
    pub(super) fn reset(&mut self, key: Key) {
        if let Some(fwd_cnt) = self.remove(key) {
            self.ctrl.push_back(Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.0,
                dst_port: key.1,
                type_: TYPE_STREAM,
                op: op::RST,
                buf_alloc: OUR_BUF_ALLOC,
                fwd_cnt,
                ..Header::default()
            });
        }
    }

    /// Forgets a connection; returns its `fwd_cnt` if it existed.
    fn remove(&mut self, key: Key) -> Option<u32> {
        let c = self.conns.remove(&key)?;
        self.targets.remove(&c.token);
        match c.backend {
            Backend::Unix(s) => {
                self.fd_changes.push(FdChange::Remove(s.as_raw_fd()));
                self.graveyard.push(s);
            }
            Backend::Tools => self.tools.set_connected(false),
        }
        Some(c.fwd_cnt)
    }

    /// Recomputes which events the host socket of `key` needs.
    fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get(&key) else {
            return;
        };
        let Some(fd) = c.fd() else {
            return;
        };
        let mut ev = EventSet::empty();
        if c.wants_read() {
            ev |= EventSet::IN;
        }
        if c.wants_write() {
            ev |= EventSet::OUT;
        }
        self.fd_changes.push(if ev.is_empty() {
            FdChange::Remove(fd)
        } else {
            FdChange::Set(fd, c.token, ev)
        });
    }

    // ---------------------------------------------------------------- tx

    fn process_tx(&mut self, q: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match chain.reader(mem) {
                Ok(mut r) => {
                    let mut hb = [0u8; HDR_LEN];
                    if r.read_exact(&mut hb).is_ok() {
                        let h = Header::from_bytes(&hb);
                        let n = (h.len as usize).min(MAX_PKT_PAYLOAD);
                        let mut data = vec![0u8; n.min(r.available_bytes())];
                        if r.read_exact(&mut data).is_ok() {
                            self.handle_packet(&h, &data);
                        }
                    } else {
                        tracing::debug!("vsock tx packet shorter than its header dropped");
                    }
                }
                Err(e) => tracing::debug!(error = %e, "bad vsock tx chain dropped"),
            }
            q.add_used(mem, head, 0)
                .map_err(|e| DeviceError::BrokenQueue {
                    queue: TX,
                    reason: format!("cannot write the used ring: {e}"),
                })?;
            used = true;
        }
        Ok(used)
    }

    /// Acts on one packet from the guest.
    pub(super) fn handle_packet(&mut self, h: &Header, data: &[u8]) {
        tracing::trace!(?h, len = data.len(), "vsock packet from the guest");
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!(
                src = h.src_cid,
                dst = h.dst_cid,
                "vsock packet with wrong CIDs dropped"
            );
            return;
        }
        if h.type_ != TYPE_STREAM {
            self.rst_for(h);
            return;
        }
        let key = (h.dst_port, h.src_port);
        if h.op == op::REQUEST {
            self.guest_connect(h, key);
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            self.rst_for(h);
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        match h.op {
            op::RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Established;
                // The answer is for the host process, not guest data: it
                // does not count in fwd_cnt. A few bytes on a fresh socket
                // cannot block.
                let ok = format!("OK {}\n", c.host_port);
                if let Backend::Unix(s) = &mut c.backend {
                    if s.write_all(ok.as_bytes()).is_err() {
                        self.reset(key);
                        return;
                    }
                }
                self.update_interest(key);
            }
            op::RW if c.state == ConnState::Established => self.guest_data(key, data),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => {
                let c = &self.conns[&key];
                self.ctrl.push_back(self.reply(c, op::CREDIT_UPDATE, 0, 0));
            }
            op::SHUTDOWN => {
                if h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == (SHUTDOWN_RCV | SHUTDOWN_SEND) {
                    self.flush(key);
                    self.reset(key);
                } else if h.flags & SHUTDOWN_SEND != 0 {
                    self.flush(key);
                    if let Some(Backend::Unix(s)) = self.conns.get(&key).map(|c| &c.backend) {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                }
            }
            op::RST => {
                self.remove(key);
            }
            other => {
                tracing::debug!(op = other, "unexpected vsock op; resetting the connection");
                self.reset(key);
            }
        }
    }

    fn guest_connect(&mut self, h: &Header, key: Key) {
        if self.conns.contains_key(&key) {
            self.rst_for(h);
            return;
        }
        let backend = if h.dst_port == TOOLS_PORT {
            // One tools connection: a reconnecting daemon replaces the old.
            let old: Vec<Key> = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.backend, Backend::Tools))
                .map(|(k, _)| *k)
                .collect();
            for k in old {
                self.reset(k);
            }
            self.tools.set_connected(true);
            Backend::Tools
        } else {
            let path = format!("{}_{}", self.uds_path.display(), h.dst_port);
            match UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)) {
                Ok(s) => Backend::Unix(s),
                Err(e) => {
                    tracing::debug!(path, error = %e, "vsock connect refused");
                    self.rst_for(h);
                    return;
                }
            }
        };
        let token = self.token(Target::Conn(key));
        let mut c = Connection::new(
            h.src_port,
            h.dst_port,
            backend,
            ConnState::Established,
            token,
        );
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        self.ctrl.push_back(self.reply(&c, op::RESPONSE, 0, 0));
        self.conns.insert(key, c);
        self.update_interest(key);
    }

    fn guest_data(&mut self, key: Key, data: &[u8]) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let Backend::Tools = c.backend {
            c.fwd_cnt = c.fwd_cnt.wrapping_add(data.len() as u32);
            let mut answers = Vec::new();
            for &b in data {
                if b == b'\n' {
                    let line = String::from_utf8_lossy(&c.line).into_owned();
                    c.line.clear();
                    answers.extend(self.tools.handle_line(line.trim_end_matches('\r')));
                } else if c.line.len() < MAX_LINE {
                    c.line.push(b);
                }
            }
            for a in answers {
                c.to_guest.extend(a.as_bytes());
            }
            self.maybe_credit_update(key);
            return;
        }
        // A guest that sends beyond the credit we gave is broken or hostile.
        if c.to_host.len() + data.len() > OUR_BUF_ALLOC as usize {
            tracing::debug!("vsock guest overran its credit; resetting the connection");
            self.reset(key);
            return;
        }
        c.to_host.extend_from_slice(data);
        self.flush(key);
        self.maybe_credit_update(key);
    }

    /// Tells the guest about freed buffer space once a quarter of it has
    /// been consumed, so a sender blocked on credit resumes.
    fn maybe_credit_update(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.fwd_cnt.wrapping_sub(c.fwd_reported) >= OUR_BUF_ALLOC / 4 {
            c.fwd_reported = c.fwd_cnt;
            let h = self.reply(&self.conns[&key], op::CREDIT_UPDATE, 0, 0);
            self.ctrl.push_back(h);
        }
    }

    fn flush(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.flush_to_host().is_err() {
            self.reset(key);
        } else {
            self.update_interest(key);
        }
    }

    // ---------------------------------------------------------------- rx

    fn has_rx_work(&self) -> bool {
        !self.ctrl.is_empty()
            || self.conns.values().any(|c| {
                c.state == ConnState::Established
                    && ((!c.to_guest.is_empty() && c.peer_credit() > 0)
                        || (c.host_eof && c.to_guest.is_empty() && !c.shutdown_sent))
            })
    }

    /// The next packet for the guest, at most `room` payload bytes.
    fn next_rx(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, Vec::new()));
        }
        let key = *self.conns.iter().find_map(|(k, c)| {
            (c.state == ConnState::Established
                && ((!c.to_guest.is_empty() && c.peer_credit() > 0)
                    || (c.host_eof && c.to_guest.is_empty() && !c.shutdown_sent)))
                .then_some(k)
        })?;
        let c = self.conns.get_mut(&key)?;
        if c.to_guest.is_empty() {
            c.shutdown_sent = true;
            let h = self.reply(
                &self.conns[&key],
                op::SHUTDOWN,
                SHUTDOWN_RCV | SHUTDOWN_SEND,
                0,
            );
            return Some((h, Vec::new()));
        }
        let n = c
            .to_guest
            .len()
            .min(c.peer_credit() as usize)
            .min(room)
            .min(MAX_PKT_PAYLOAD);
        let data: Vec<u8> = c.to_guest.drain(..n).collect();
        c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
        // Room in to_guest again: read the host socket.
        if c.fill_from_host().is_err() {
            self.reset(key);
        } else {
            self.update_interest(key);
        }
        let h = self.reply(self.conns.get(&key)?, op::RW, 0, n as u32);
        Some((h, data))
    }

    /// Whether a transport reset event still waits for an event buffer.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset_pending
    }

    /// Delivers a pending transport reset event (virtio 1.2, 5.10.6.4: an
    /// event buffer holds one le32 id; 0 = TRANSPORT_RESET). The guest then
    /// resets every connection and re-reads its CID. Without an event buffer
    /// it stays pending until the guest posts one.
    fn process_evt(&mut self, q: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        while self.transport_reset_pending {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= 4 => {
                    if w.write_all(&VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes())
                        .is_ok()
                    {
                        self.transport_reset_pending = false;
                        4
                    } else {
                        0
                    }
                }
                _ => {
                    tracing::debug!("vsock event buffer too small or outside memory; skipped");
                    0
                }
            };
            q.add_used(mem, head, written)
                .map_err(|e| DeviceError::BrokenQueue {
                    queue: EVT,
                    reason: format!("cannot write the used ring: {e}"),
                })?;
            used = true;
        }
        if used && !self.transport_reset_pending {
            tracing::info!(cid = self.cid, "vsock transport reset sent to the guest");
        }
        Ok(used)
    }

    fn process_rx(&mut self, q: &mut Queue, mem: &GuestMemory) -> Result<bool, DeviceError> {
        let mut used = false;
        while self.has_rx_work() {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= HDR_LEN => {
                    let room = w.available_bytes() - HDR_LEN;
                    match self.next_rx(room) {
                        Some((h, data)) => {
                            tracing::trace!(?h, "vsock packet to the guest");
                            let ok =
                                w.write_all(&h.to_bytes()).is_ok() && w.write_all(&data).is_ok();
                            if !ok {
                                tracing::debug!("vsock rx buffer write failed");
                            }
                            w.bytes_written() as u32
                        }
                        None => {
                            // Nothing after all: give the buffer back.
                            q.go_to_previous_position();
                            break;
                        }
                    }
                }
                _ => {
                    tracing::debug!("vsock rx buffer too small or outside memory; skipped");
                    0
                }
            };
            q.add_used(mem, head, written)
                .map_err(|e| DeviceError::BrokenQueue {
                    queue: RX,
                    reason: format!("cannot write the used ring: {e}"),
                })?;
            used = true;
        }
        Ok(used)
    }

    // ------------------------------------------------------- host events

    /// A host socket (or the listener / tools eventfd) is ready.
    pub fn on_event(&mut self, token: u32, ev: EventSet) {
        tracing::trace!(token, ?ev, "vsock host event");
        match token {
            LISTENER_TOKEN => self.accept(),
            TOOLS_TOKEN => {
                let _ = self.tools.wake_fd().read();
                let lines = self.tools.take_outbox();
                if let Some(c) = self
                    .conns
                    .values_mut()
                    .find(|c| matches!(c.backend, Backend::Tools))
                {
                    for l in lines {
                        c.to_guest.extend(l.as_bytes());
                    }
                }
            }
            t => match self.targets.get(&t) {
                Some(Target::Pending) => self.pending_line(t),
                Some(Target::Conn(key)) => {
                    let key = *key;
                    if ev.contains(EventSet::OUT) {
                        self.flush(key);
                    }
                    if let Some(c) = self.conns.get_mut(&key) {
                        if c.fill_from_host().is_err() {
                            self.reset(key);
                        } else {
                            self.update_interest(key);
                        }
                    }
                }
                None => {}
            },
        }
    }

    fn accept(&mut self) {
        while let Ok((s, _)) = self.listener.accept() {
            if s.set_nonblocking(true).is_err() {
                continue;
            }
            let tok = self.token(Target::Pending);
            self.fd_changes
                .push(FdChange::Set(s.as_raw_fd(), tok, EventSet::IN));
            self.pending.insert(tok, (s, Vec::new()));
        }
    }

    /// Reads `CONNECT <port>\n` from a new host connection.
    fn pending_line(&mut self, tok: u32) {
        let Some((s, buf)) = self.pending.get_mut(&tok) else {
            return;
        };
        let mut b = [0u8; 64];
        let done = match s.read(&mut b) {
            Ok(0) => Err(()),
            Ok(n) => {
                buf.extend_from_slice(&b[..n]);
                match buf.iter().position(|c| *c == b'\n') {
                    Some(i) => std::str::from_utf8(&buf[..i])
                        .ok()
                        .and_then(|l| l.trim().strip_prefix("CONNECT "))
                        .and_then(|p| p.trim().parse::<u32>().ok())
                        .map(Some)
                        .ok_or(()),
                    None if buf.len() > 32 => Err(()),
                    None => Ok(None),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(_) => Err(()),
        };
        match done {
            Ok(None) => {}
            Err(()) => {
                if let Some((s, _)) = self.pending.remove(&tok) {
                    self.targets.remove(&tok);
                    self.fd_changes.push(FdChange::Remove(s.as_raw_fd()));
                    self.graveyard.push(s);
                }
            }
            Ok(Some(guest_port)) => {
                let Some((s, _)) = self.pending.remove(&tok) else {
                    return;
                };
                self.fd_changes.push(FdChange::Remove(s.as_raw_fd()));
                let mut host_port = self.next_host_port;
                while self.conns.contains_key(&(host_port, guest_port)) {
                    host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                }
                self.next_host_port = host_port.wrapping_add(1).max(FIRST_HOST_PORT);
                let key = (host_port, guest_port);
                self.targets.insert(tok, Target::Conn(key));
                let c = Connection::new(
                    guest_port,
                    host_port,
                    Backend::Unix(s),
                    ConnState::Connecting,
                    tok,
                );
                self.ctrl.push_back(self.reply(&c, op::REQUEST, 0, 0));
                self.conns.insert(key, c);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // guest_cid, le64 at offset 0.
        let cid = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| cid.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        idx: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let mut used = false;
        // The reset goes first: packets of connections from before a
        // restore must meet a guest that has already dropped them.
        if let Some(q) = queues.get_mut(EVT) {
            used |= self.process_evt(q, mem)?;
        }
        if idx == TX {
            if let Some(q) = queues.get_mut(TX) {
                used |= self.process_tx(q, mem)?;
            }
        }
        if idx == TX || idx == RX {
            if let Some(q) = queues.get_mut(RX) {
                used |= self.process_rx(q, mem)?;
            }
        }
        Ok(used)
    }

    fn reset(&mut self) {
        // The driver is gone: nobody to send RST to.
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}
