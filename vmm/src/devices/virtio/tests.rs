//! Transport tests: the driver's set-up sequence through the registers,
//! hostile register accesses, interrupts, quiesce, and save/restore.

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::block::tests::{memory, temp_image};
use super::block::Block;
use super::persist::MmioTransportArgs;
use super::transport::{reg, MmioTransport};
use super::{status, VIRTIO_MMIO_INT_VRING};
use crate::memory::GuestMemory;
use crate::persist::Persist;

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Drives a Linux-like set-up of queue 0 at the mock queue's addresses.
fn set_up(t: &mut MmioTransport, mq: &MockSplitQueue<GuestMemory>) {
    wr(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, reg::DEVICE_FEATURES_SEL, 1);
    let high = rd(t, reg::DEVICE_FEATURES);
    assert_eq!(high & 1, 1, "VERSION_1 offered");
    wr(t, reg::DRIVER_FEATURES_SEL, 1);
    wr(t, reg::DRIVER_FEATURES, 1);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(t, reg::STATUS) & status::FEATURES_OK, 0);
    wr(t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(t, reg::QUEUE_NUM_MAX), 256);
    wr(t, reg::QUEUE_NUM, 16);
    wr(t, reg::QUEUE_DESC_LOW, mq.desc_table_addr().0 as u32);
    wr(t, reg::QUEUE_DESC_HIGH, 0);
    wr(t, reg::QUEUE_AVAIL_LOW, mq.avail_addr().0 as u32);
    wr(t, reg::QUEUE_AVAIL_HIGH, 0);
    wr(t, reg::QUEUE_USED_LOW, mq.used_addr().0 as u32);
    wr(t, reg::QUEUE_USED_HIGH, 0);
    wr(t, reg::QUEUE_READY, 1);
    wr(
        t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
    );
}

/// Queues a flush request (header at 0x10_0000, status at 0x30_0000).
fn queue_flush(mem: &GuestMemory, mq: &MockSplitQueue<GuestMemory>, slot: u16) {
    mem.write_obj([4u32, 0, 0, 0], GuestAddress(0x10_0000))
        .unwrap();
    let d = |a, l, f, n| RawDescriptor::from(SplitDescriptor::new(a, l, f, n));
    mq.desc_table().store(0, d(0x10_0000, 16, 1, 1)).unwrap();
    mq.desc_table().store(1, d(0x30_0000, 1, 2, 0)).unwrap();
    mq.avail().ring().ref_at(slot as usize).unwrap().store(0);
    mq.avail().idx().store(slot + 1);
}

#[test]
fn identity_registers_and_hostile_accesses() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "t".into()).unwrap();
    let mut t = MmioTransport::new(Box::new(blk), mem, EventFd::new(EFD_NONBLOCK).unwrap());
    assert_eq!(rd(&mut t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&mut t, reg::VERSION), 2);
    assert_eq!(rd(&mut t, reg::DEVICE_ID), 2);
    // Odd sizes, unaligned offsets, absent queues, unknown registers.
    let mut b = [0xffu8; 2];
    t.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut b = [0xffu8; 4];
    t.read(1, &mut b);
    assert_eq!(b, [0; 4]);
    t.write(reg::STATUS, &[1, 2, 3]);
    wr(&mut t, reg::QUEUE_SEL, 99);
    assert_eq!(rd(&mut t, reg::QUEUE_NUM_MAX), 0);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(&mut t, reg::QUEUE_NOTIFY, 12345);
    wr(&mut t, 0xf0, 7);
    assert_eq!(rd(&mut t, 0xf0), 0);
    // FEATURES_OK without VERSION_1 does not stick.
    wr(
        &mut t,
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(rd(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn notify_serves_and_interrupts_quiesce_defers_and_reset_clears() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "t".into()).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(Box::new(blk), mem.clone(), irq.try_clone().unwrap());
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    set_up(&mut t, &mq);
    assert!(t.is_activated());

    queue_flush(&mem, &mq, 0);
    t.quiesce();
    t.notify(0);
    assert_eq!(mq.used().idx().load(), 0, "nothing served while quiesced");
    assert_eq!(t.in_flight(), 0);
    t.resume();
    assert_eq!(mq.used().idx().load(), 1);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
    assert_eq!(irq.read().unwrap(), 1);
    wr(&mut t, reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&mut t, reg::INTERRUPT_STATUS), 0);

    // A corrupt avail index marks the device as needing a reset, once.
    mq.avail().idx().store(500);
    t.notify(0);
    assert!(t.is_broken());
    assert_ne!(rd(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
    t.notify(0);
    wr(&mut t, reg::STATUS, 0);
    assert!(!t.is_broken());
    assert_eq!(rd(&mut t, reg::STATUS), 0);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn invalid_queue_layout_at_driver_ok_breaks_the_device() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "t".into()).unwrap();
    let mut t = MmioTransport::new(
        Box::new(blk),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    // Rings outside guest memory.
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    set_up(&mut t, &mq);
    wr(&mut t, reg::STATUS, 0);
    wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut t, reg::DRIVER_FEATURES, 1);
    wr(&mut t, reg::QUEUE_NUM, 16);
    wr(&mut t, reg::QUEUE_DESC_LOW, 0xffff_f000);
    wr(&mut t, reg::QUEUE_READY, 1);
    wr(&mut t, reg::STATUS, 0xf);
    assert!(t.is_broken());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn transport_save_restore_round_trip() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "t".into()).unwrap();
    let mut t = MmioTransport::new(
        Box::new(blk),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    set_up(&mut t, &mq);
    queue_flush(&mem, &mq, 0);
    t.notify(0);
    let state = t.save();
    assert_eq!(state.queues[0].next_avail, 1);
    assert_eq!(state.queues[0].size, 16);
    let json = serde_json::to_string(&state).unwrap();
    let back = serde_json::from_str(&json).unwrap();

    let blk = Block::new(&path, false, "t".into()).unwrap();
    let args = MmioTransportArgs {
        device: Box::new(blk),
        mem: mem.clone(),
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let mut r = MmioTransport::restore(args, &back).unwrap();
    assert_eq!(r.save(), state);
    assert!(r.is_activated());
    // The restored device continues where the first left off.
    queue_flush(&mem, &mq, 1);
    r.notify(0);
    assert_eq!(mq.used().idx().load(), 2);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn device_state_round_trip_serves_queued_requests_once() {
    use super::persist::{save_device, VirtioDeviceState};

    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "rt".into()).unwrap();
    let mut t = MmioTransport::new(
        Box::new(blk),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    set_up(&mut t, &mq);
    // One request served before the snapshot, one queued while quiesced.
    queue_flush(&mem, &mq, 0);
    t.notify(0);
    t.quiesce();
    queue_flush(&mem, &mq, 1);
    t.notify(0);
    assert_eq!(mq.used().idx().load(), 1);
    let saved = save_device(0, &mut t).unwrap();
    let VirtioDeviceState::Block { transport, device } = &saved else {
        panic!("not a block state: {saved:?}");
    };
    assert_eq!(transport.queues[0].next_avail, 1, "the second is not taken");
    assert_eq!(device.counters.flushes, 1);
    assert_eq!(device.id, "rt");
    let json = serde_json::to_string(&saved).unwrap();
    assert!(json.starts_with(r#"{"kind":"block","#), "{json}");
    let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, saved);
    drop(t);

    let VirtioDeviceState::Block { transport, device } = back else {
        unreachable!()
    };
    let blk = Block::restore((), &device).unwrap();
    let counters = blk.counters();
    let args = MmioTransportArgs {
        device: Box::new(blk),
        mem: mem.clone(),
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let mut r = MmioTransport::restore(args, &transport).unwrap();
    // What the restored VMM does when its event loop starts: serve every
    // queue once.
    r.notify(0);
    assert_eq!(mq.used().idx().load(), 2, "the queued request is served");
    r.notify(0);
    assert_eq!(mq.used().idx().load(), 2, "and only once");
    assert_eq!(counters.snapshot().flushes, 2, "counters continue");

    // A disk that changed size under the snapshot is refused.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    let e = Block::restore((), &device).err().unwrap().to_string();
    assert!(
        e.contains("is 2097152 bytes, the snapshot saw 1048576"),
        "{e}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn broken_device_stays_broken_across_restore() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let blk = Block::new(&path, false, "t".into()).unwrap();
    let mut t = MmioTransport::new(
        Box::new(blk),
        mem.clone(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    );
    let mq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
    set_up(&mut t, &mq);
    mq.avail().idx().store(500);
    t.notify(0);
    assert!(t.is_broken());
    let s = t.save();
    assert!(s.broken);
    let args = MmioTransportArgs {
        device: Box::new(Block::new(&path, false, "t".into()).unwrap()),
        mem,
        irq: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let r = MmioTransport::restore(args, &s).unwrap();
    assert!(r.is_broken() && !r.is_activated());
    std::fs::remove_file(path).unwrap();
}
