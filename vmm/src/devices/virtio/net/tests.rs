//! NIC tests with crafted queues and a stand-in for the tap.

use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::device::{FrameIo, Net};
use super::persist::NetArgs;
use super::{RX, TX, VNET_HDR_LEN};
use crate::devices::virtio::block::tests::memory;
use crate::devices::virtio::VirtioDevice;
use crate::persist::Persist;

#[derive(Clone, Default)]
struct FakeTap {
    to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
    from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl FrameIo for FakeTap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.to_guest.lock().unwrap().pop_front() {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_frame(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.from_guest.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }
}

fn one_chain_queue<'a>(
    mem: &'a crate::memory::GuestMemory,
    descs: &[(u64, u32, u16)],
) -> (MockSplitQueue<'a, crate::memory::GuestMemory>, Queue) {
    let mq = MockSplitQueue::new(mem, 16);
    for (i, (a, l, f)) in descs.iter().enumerate() {
        let next = if i + 1 < descs.len() { 1 } else { 0 };
        let d = SplitDescriptor::new(*a, *l, f | next, i as u16 + 1);
        mq.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    mq.avail().ring().ref_at(0).unwrap().store(0);
    mq.avail().idx().store(1);
    let q = mq.create_queue().unwrap();
    (mq, q)
}

fn nic(tap: &FakeTap) -> Net {
    Net::new(
        [0x52, 0x54, 0, 1, 2, 3],
        "lab".into(),
        "tap0".into(),
        Box::new(tap.clone()),
    )
}

#[test]
fn mac_in_config_space() {
    let n = nic(&FakeTap::default());
    let mut b = [0u8; 8];
    n.read_config(0, &mut b);
    assert_eq!(b, [0x52, 0x54, 0, 1, 2, 3, 0, 0]);
    n.read_config(u64::MAX, &mut b[..2]);
    assert_eq!(&b[..2], &[0, 0]);
}

#[test]
fn tx_sends_frames_and_drops_malformed_ones() {
    let mem = memory();
    let tap = FakeTap::default();
    let mut n = nic(&tap);
    mem.write_slice(&[7u8; 60], GuestAddress(0x10_0000))
        .unwrap();
    // Header and frame in two descriptors.
    let (_mq, tx) = one_chain_queue(&mem, &[(0x10_0000, 12, 0), (0x10_0100, 48, 0)]);
    let mut qs = [Queue::new(16).unwrap(), tx];
    assert!(n.process_queue(TX, &mut qs, &mem).unwrap());
    assert_eq!(tap.from_guest.lock().unwrap()[0].len(), 60);
    // Shorter than the header; outside memory; device-writable.
    for chain in [
        vec![(0x10_0000, 4, 0)],
        vec![(0x10_0000, 12, 0), (1 << 40, 100, 0)],
        vec![(0x10_0000, 60, 2)],
    ] {
        let (_mq, tx) = one_chain_queue(&mem, &chain);
        let mut qs = [Queue::new(16).unwrap(), tx];
        assert!(n.process_queue(TX, &mut qs, &mem).unwrap());
    }
    let c = n.counters().snapshot();
    assert_eq!((c.tx_packets, c.tx_bytes, c.tx_dropped), (1, 48, 3));
    assert_eq!(tap.from_guest.lock().unwrap().len(), 1);
}

#[test]
fn rx_waits_for_buffers_and_drops_frames_that_do_not_fit() {
    let mem = memory();
    let tap = FakeTap::default();
    let mut n = nic(&tap);
    tap.to_guest
        .lock()
        .unwrap()
        .push_back(vec![1u8; VNET_HDR_LEN + 64]);
    // No rx buffers: the frame waits and the tap is not read meanwhile.
    let mut none = [Queue::new(16).unwrap(), Queue::new(16).unwrap()];
    assert!(!n.process_queue(RX, &mut none, &mem).unwrap());
    assert!(!n.wants_tap());
    let (mq, rx) = one_chain_queue(&mem, &[(0x20_0000, 2048, 2)]);
    let mut qs = [rx, Queue::new(16).unwrap()];
    assert!(n.process_queue(RX, &mut qs, &mem).unwrap());
    assert!(n.wants_tap());
    assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 76);
    let nb: u16 = mem.read_obj(GuestAddress(0x20_000a)).unwrap();
    assert_eq!(nb, 1, "num_buffers");
    // A buffer too small: dropped, counted, buffer returned empty.
    tap.to_guest
        .lock()
        .unwrap()
        .push_back(vec![1u8; VNET_HDR_LEN + 64]);
    let (mq, rx) = one_chain_queue(&mem, &[(0x20_0000, 20, 2)]);
    let mut qs = [rx, Queue::new(16).unwrap()];
    assert!(n.process_queue(RX, &mut qs, &mem).unwrap());
    assert_eq!(mq.used().ring().ref_at(0).unwrap().load().len(), 0);
    let c = n.counters().snapshot();
    assert_eq!((c.rx_packets, c.rx_bytes, c.rx_dropped), (1, 64, 1));
}

#[test]
fn persist_round_trip() {
    let tap = FakeTap::default();
    let n = nic(&tap);
    n.counters()
        .tx_packets
        .store(5, std::sync::atomic::Ordering::Relaxed);
    let s = n.save();
    let back = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
    let r = Net::restore(
        NetArgs {
            tap: Some(Box::new(tap.clone())),
        },
        &back,
    )
    .unwrap();
    assert_eq!(r.save(), s);
    assert_eq!(r.mac(), [0x52, 0x54, 0, 1, 2, 3]);
    assert_eq!(r.network(), "lab");
}
