//! vsock tests: the connection state machine driven with packets (as the tx
//! queue would deliver them) and real unix sockets, the tools endpoint, and
//! save/restore.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

use crate::devices::virtio::VirtioDevice;

use super::device::{Vsock, LISTENER_TOKEN, TOOLS_TOKEN};
use super::packet::{op, Header, TYPE_STREAM};
use super::{EVT, HOST_CID, TOOLS_PORT, TX, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
use crate::persist::Persist;

/// virtq_desc flag: the device writes this buffer.
const VRING_DESC_F_WRITE: u16 = 2;

fn sock_path() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "vigil-vsock-test-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ))
}

fn from_guest(src_port: u32, dst_port: u32, op: u16, len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc: 65536,
        fwd_cnt: 0,
    }
}

fn ctrl_ops(v: &mut Vsock) -> Vec<u16> {
    v.ctrl.drain(..).map(|h| h.op).collect()
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    let path = sock_path();
    let mut v = Vsock::new(3, &path).unwrap();
    let host = UnixListener::bind(format!("{}_7000", path.display())).unwrap();

    v.handle_packet(&from_guest(1234, 7000, op::REQUEST, 0), &[]);
    assert_eq!(ctrl_ops(&mut v), vec![op::RESPONSE]);
    let (mut hs, _) = host.accept().unwrap();
    hs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();

    v.handle_packet(&from_guest(1234, 7000, op::RW, 6), b"hello\n");
    let mut line = String::new();
    BufReader::new(hs.try_clone().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "hello\n");

    hs.write_all(b"world\n").unwrap();
    let tok = v.conns[&(7000, 1234)].token;
    std::thread::sleep(Duration::from_millis(50));
    v.on_event(tok, EventSet::IN);
    assert_eq!(v.conns[&(7000, 1234)].to_guest.len(), 6);
    assert!(!v.conns[&(7000, 1234)].host_eof);

    drop(hs);
    std::thread::sleep(Duration::from_millis(50));
    v.on_event(tok, EventSet::IN);
    assert!(v.conns[&(7000, 1234)].host_eof);
    let _ = std::fs::remove_file(format!("{}_7000", path.display()));
}

#[test]
fn refused_and_unknown_connections_get_rst() {
    let path = sock_path();
    let mut v = Vsock::new(3, &path).unwrap();
    v.handle_packet(&from_guest(1, 9999, op::REQUEST, 0), &[]);
    assert_eq!(ctrl_ops(&mut v), vec![op::RST]);
    v.handle_packet(&from_guest(1, 9999, op::RW, 3), b"abc");
    assert_eq!(ctrl_ops(&mut v), vec![op::RST]);
    // RST for an unknown connection is not answered.
    v.handle_packet(&from_guest(1, 9999, op::RST, 0), &[]);
    assert!(ctrl_ops(&mut v).is_empty());
    // Wrong CIDs are dropped; other socket types get RST.
    let mut h = from_guest(1, 9999, op::REQUEST, 0);
    h.src_cid = 99;
    v.handle_packet(&h, &[]);
    assert!(ctrl_ops(&mut v).is_empty());
    let mut h = from_guest(1, 9999, op::REQUEST, 0);
    h.type_ = 2;
    v.handle_packet(&h, &[]);
    assert_eq!(ctrl_ops(&mut v), vec![op::RST]);
}

#[test]
fn host_initiated_connection() {
    let path = sock_path();
    let mut v = Vsock::new(3, &path).unwrap();
    let mut hs = UnixStream::connect(&path).unwrap();
    hs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    hs.write_all(b"CONNECT 7001\n").unwrap();
    v.on_event(LISTENER_TOKEN, EventSet::IN);
    let tok = *v.pending.keys().next().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    v.on_event(tok, EventSet::IN);
    let req = v.ctrl.pop_front().unwrap();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 7001));
    let host_port = req.src_port;

    v.handle_packet(&from_guest(7001, host_port, op::RESPONSE, 0), &[]);
    let mut r = BufReader::new(hs.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, format!("OK {host_port}\n"));
    assert_eq!(
        v.conns[&(host_port, 7001)].fwd_cnt,
        0,
        "the OK line is not guest data"
    );

    hs.write_all(b"HOST-LINE\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    v.on_event(tok, EventSet::IN);
    let c = &v.conns[&(host_port, 7001)];
    assert_eq!(c.to_guest.len(), 10);
    assert!(!c.host_eof);

    v.handle_packet(&from_guest(7001, host_port, op::RW, 10), b"GUEST-ACK\n");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "GUEST-ACK\n");
}

#[test]
fn tools_channel_heartbeats_and_shutdown() {
    let path = sock_path();
    let mut v = Vsock::new(3, &path).unwrap();
    let tools = v.tools();
    assert_eq!(
        tools.request_guest_shutdown(),
        Err(super::ToolsError::NotConnected)
    );
    v.handle_packet(&from_guest(50, TOOLS_PORT, op::REQUEST, 0), &[]);
    assert_eq!(ctrl_ops(&mut v), vec![op::RESPONSE]);
    let lines = b"HELLO vigil-tools 1.2.3\nHB 7 12345\nAPP db 3\nAPP web 9\nPING\nHB 8 13";
    v.handle_packet(
        &from_guest(50, TOOLS_PORT, op::RW, lines.len() as u32),
        lines,
    );
    v.handle_packet(&from_guest(50, TOOLS_PORT, op::RW, 4), b"345\n");
    let s = tools.snapshot();
    assert!(s.connected);
    assert_eq!(s.version.as_deref(), Some("1.2.3"));
    assert_eq!((s.heartbeat_seq, s.guest_uptime_ms), (8, 13345));
    assert!(s.last_heartbeat.is_some());
    assert_eq!(
        s.apps.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["db", "web"]
    );
    let key = (TOOLS_PORT, 50);
    assert_eq!(
        v.conns[&key].to_guest.iter().copied().collect::<Vec<u8>>(),
        b"PONG\n"
    );

    tools.request_guest_shutdown().unwrap();
    v.on_event(TOOLS_TOKEN, EventSet::IN);
    assert!(v.conns[&key].to_guest.ends_with_slice(b"SHUTDOWN\n"));
    assert!(tools.snapshot().shutdown_pending);
    v.handle_packet(&from_guest(50, TOOLS_PORT, op::RW, 13), b"ACK SHUTDOWN\n");
    assert!(tools.snapshot().shutdown_acked);

    // A line longer than the limit is cut, not stored whole.
    let long = vec![b'x'; 10_000];
    v.handle_packet(
        &from_guest(50, TOOLS_PORT, op::RW, long.len() as u32),
        &long,
    );
    v.handle_packet(&from_guest(50, TOOLS_PORT, op::RST, 0), &[]);
    assert!(!tools.snapshot().connected);
}

#[test]
fn save_restore_sends_a_transport_reset_event() {
    use vm_memory::{Bytes, GuestAddress};

    let path = sock_path();
    let mut v = Vsock::new(3, &path).unwrap();
    v.handle_packet(&from_guest(50, TOOLS_PORT, op::REQUEST, 0), &[]);
    ctrl_ops(&mut v);
    assert!(v.tools().snapshot().connected);
    let state = v.save();
    assert_eq!(state.connections, vec![(TOOLS_PORT, 50)]);
    drop(v);
    let json = serde_json::to_string(&state).unwrap();
    let back = serde_json::from_str(&json).unwrap();
    let mut r = Vsock::restore((), &back).unwrap();
    assert_eq!(r.connection_count(), 0);
    assert!(r.ctrl.is_empty(), "no per-connection RST: one reset event");
    assert!(!r.tools().snapshot().connected);
    assert!(r.transport_reset_pending());

    // Three queues; only the event queue has a buffer (4 bytes at 0x8_0000,
    // pre-filled with garbage).
    let mem = crate::devices::virtio::block::tests::memory();
    let mqs: Vec<_> = (0..3u64)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(i * 0x1_0000), 16))
        .collect();
    let mut queues: Vec<Queue> = mqs.iter().map(|m| m.create_queue().unwrap()).collect();
    // Before the guest posts an event buffer, the reset waits.
    assert!(!r.process_queue(TX, &mut queues, &mem).unwrap());
    assert!(r.transport_reset_pending());
    mem.write_obj(0xdead_beef_u32, GuestAddress(0x8_0000))
        .unwrap();
    let d = RawDescriptor::from(SplitDescriptor::new(0x8_0000, 4, VRING_DESC_F_WRITE, 0));
    mqs[EVT].add_desc_chains(&[d], 0).unwrap();
    let mut queues: Vec<Queue> = mqs.iter().map(|m| m.create_queue().unwrap()).collect();
    assert!(r.process_queue(EVT, &mut queues, &mem).unwrap());
    assert!(!r.transport_reset_pending());
    assert_eq!(mqs[EVT].used().idx().load(), 1);
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(0x8_0000)).unwrap(),
        VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    );
    // Once only.
    assert!(!r.process_queue(EVT, &mut queues, &mem).unwrap());
    // The daemon reconnects on the restored device.
    r.handle_packet(&from_guest(51, TOOLS_PORT, op::REQUEST, 0), &[]);
    assert_eq!(ctrl_ops(&mut r), vec![op::RESPONSE]);
    assert!(r.tools().snapshot().connected);
}

trait EndsWith {
    fn ends_with_slice(&self, s: &[u8]) -> bool;
}

impl EndsWith for std::collections::VecDeque<u8> {
    fn ends_with_slice(&self, s: &[u8]) -> bool {
        self.len() >= s.len() && self.iter().skip(self.len() - s.len()).eq(s.iter())
    }
}
