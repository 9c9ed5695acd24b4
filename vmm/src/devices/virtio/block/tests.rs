//! Block device tests with queues crafted in guest memory, including hostile
//! ones: loops, buffers outside memory, wrong directions, wrong lengths,
//! corrupt ring indices. None may panic or hang; each fails with the proper
//! status or marks the queue broken.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::*;
use super::*;
use crate::devices::virtio::VirtioDevice;
use crate::memory::GuestMemory;
use crate::persist::Persist;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
/// Guest memory size of the tests: 4 MiB.
const MEM: u64 = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

pub(crate) fn temp_image(size: u64) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "vigil-blk-test-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

pub(crate) fn memory() -> GuestMemory {
    GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

fn header(mem: &GuestMemory, kind: u32, sector: u64) {
    let h = RequestHeader {
        kind,
        reserved: 0,
        sector,
    };
    mem.write_obj(h, GuestAddress(HDR)).unwrap();
}

/// Puts one chain (descriptors 0..n, `descs` given with their own flags and
/// next fields) on a fresh queue and serves it. Returns the device's result,
/// the used length, and the status byte.
fn run(
    blk: &mut Block,
    mem: &GuestMemory,
    descs: &[RawDescriptor],
) -> (
    Result<bool, crate::devices::virtio::DeviceError>,
    u32,
    u8,
    Queue,
) {
    let mq = MockSplitQueue::new(mem, 16);
    for (i, d) in descs.iter().enumerate() {
        mq.desc_table().store(i as u16, *d).unwrap();
    }
    mq.avail().ring().ref_at(0).unwrap().store(0);
    mq.avail().idx().store(1);
    let mut q: Queue = mq.create_queue().unwrap();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let r = blk.process_queue(0, std::slice::from_mut(&mut q), mem);
    let used_len = mq.used().ring().ref_at(0).unwrap().load().len();
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    (r, used_len, status, q)
}

/// Header, one data buffer with `data_flags`, status.
fn rw_chain(data_flags: u16, len: u32) -> Vec<RawDescriptor> {
    vec![
        desc(HDR, 16, F_NEXT, 1),
        desc(DATA, len, data_flags | F_NEXT, 2),
        desc(STATUS, 1, F_WRITE, 0),
    ]
}

#[test]
fn write_flush_read_and_get_id() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, false, "disk-a".into()).unwrap();

    mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 2);
    let (r, len, st, _) = run(&mut blk, &mem, &rw_chain(0, 1024));
    assert!(r.unwrap());
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1));
    let on_disk = std::fs::read(&path).unwrap();
    assert!(on_disk[1024..2048].iter().all(|b| *b == 0xab));
    assert!(on_disk[..1024].iter().all(|b| *b == 0));

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let flush = [desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
    let (_, _, st, _) = run(&mut blk, &mem, &flush);
    assert_eq!(st, VIRTIO_BLK_S_OK);

    mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let (_, len, st, _) = run(&mut blk, &mem, &rw_chain(F_WRITE, 1024));
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 1025));
    let mut back = [0u8; 1024];
    mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|b| *b == 0xab));

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (_, len, st, _) = run(&mut blk, &mem, &rw_chain(F_WRITE, 20));
    assert_eq!((st, len), (VIRTIO_BLK_S_OK, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-a\0");

    let c = blk.counters().snapshot();
    assert_eq!(
        (c.write_ops, c.write_bytes, c.read_ops, c.read_bytes),
        (1, 1024, 1, 1024)
    );
    assert_eq!((c.flushes, c.errors), (1, 0));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn scattered_buffers_are_one_request_in_order() {
    // What seg_max allows: one request, several data buffers (pages of a
    // user buffer are not contiguous in guest memory), read back the same.
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, false, "sg".into()).unwrap();
    let bufs = [(DATA + 0x2000, 0x11u8), (DATA, 0x22), (DATA + 0x4000, 0x33)];
    for (a, v) in bufs {
        mem.write_slice(&[v; 512], GuestAddress(a)).unwrap();
    }
    header(&mem, VIRTIO_BLK_T_OUT, 8);
    let mut chain = vec![desc(HDR, 16, F_NEXT, 1)];
    for (i, (a, _)) in bufs.iter().enumerate() {
        chain.push(desc(*a, 512, F_NEXT, i as u16 + 2));
    }
    chain.push(desc(STATUS, 1, F_WRITE, 0));
    let (r, _, st, _) = run(&mut blk, &mem, &chain);
    assert!(r.unwrap());
    assert_eq!(st, VIRTIO_BLK_S_OK);
    let on_disk = std::fs::read(&path).unwrap();
    for (i, (_, v)) in bufs.iter().enumerate() {
        let at = 8 * 512 + i * 512;
        assert!(on_disk[at..at + 512].iter().all(|b| b == v), "buffer {i}");
    }
    assert_eq!(blk.counters().snapshot().write_ops, 1);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn read_only_disk_refuses_writes_and_advertises_ro() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, true, "ro".into()).unwrap();
    assert_ne!(blk.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    assert_ne!(blk.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let (_, _, st, _) = run(&mut blk, &mem, &rw_chain(0, 512));
    assert_eq!(st, VIRTIO_BLK_S_IOERR);
    assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
    assert_eq!(blk.counters().snapshot().errors, 1);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn hostile_chains_fail_with_ioerr() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, false, "h".into()).unwrap();
    let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>)> = vec![
        (
            "data buffer outside guest memory",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, F_NEXT, 1),
                desc(MEM - 256, 512, F_WRITE | F_NEXT, 2),
                desc(STATUS, 1, F_WRITE, 0),
            ],
        ),
        (
            "data buffer at an absurd address",
            VIRTIO_BLK_T_OUT,
            0,
            vec![
                desc(HDR, 16, F_NEXT, 1),
                desc(u64::MAX - 100, 512, F_NEXT, 2),
                desc(STATUS, 1, F_WRITE, 0),
            ],
        ),
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            rw_chain(0, 512),
        ),
        (
            "write from a device-writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            rw_chain(F_WRITE, 512),
        ),
        (
            "not a whole sector",
            VIRTIO_BLK_T_IN,
            0,
            rw_chain(F_WRITE, 100),
        ),
        (
            "beyond the end of the disk",
            VIRTIO_BLK_T_IN,
            2047,
            rw_chain(F_WRITE, 1024),
        ),
        (
            "sector overflows",
            VIRTIO_BLK_T_OUT,
            u64::MAX / 2,
            rw_chain(0, 512),
        ),
        (
            "header too short",
            VIRTIO_BLK_T_IN,
            0,
            vec![desc(HDR, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)],
        ),
        (
            "header device-writable",
            VIRTIO_BLK_T_IN,
            0,
            vec![
                desc(HDR, 16, F_WRITE | F_NEXT, 1),
                desc(STATUS, 1, F_WRITE, 0),
            ],
        ),
    ];
    for (what, kind, sector, chain) in cases {
        header(&mem, kind, sector);
        let (r, _, st, _) = run(&mut blk, &mem, &chain);
        assert!(r.is_ok(), "{what}: queue must stay usable");
        assert_eq!(st, VIRTIO_BLK_S_IOERR, "{what}");
    }
    assert!(std::fs::read(&path).unwrap().iter().all(|b| *b == 0));
    std::fs::remove_file(path).unwrap();
}

#[test]
fn chains_without_a_usable_status_complete_with_zero_length() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, false, "s".into()).unwrap();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    for chain in [
        vec![desc(HDR, 16, 0, 0)],
        vec![desc(HDR, 16, F_NEXT, 1), desc(STATUS, 1, 0, 0)],
        vec![desc(HDR, 16, F_NEXT, 1), desc(STATUS, 0, F_WRITE, 0)],
        vec![desc(HDR, 16, F_NEXT, 1), desc(MEM + 10, 1, F_WRITE, 0)],
        vec![desc(MEM + 10, 16, F_NEXT, 1), desc(STATUS, 1, 0, 0)],
        // A loop: the walker stops after a queue's worth of descriptors.
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(DATA, 512, F_WRITE | F_NEXT, 2),
            desc(STATUS, 1, F_WRITE | F_NEXT, 1),
        ],
        // A next index beyond the table.
        vec![
            desc(HDR, 16, F_NEXT, 1),
            desc(STATUS, 1, F_WRITE | F_NEXT, 999),
        ],
    ] {
        let (r, len, st, q) = run(&mut blk, &mem, &chain);
        assert!(r.unwrap());
        assert_eq!((len, st), (0, 0xff), "{chain:?}");
        assert_eq!(q.next_used(), 1);
    }
    std::fs::remove_file(path).unwrap();
}

#[test]
fn corrupt_avail_index_breaks_the_queue() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, false, "c".into()).unwrap();
    let mq = MockSplitQueue::new(&mem, 16);
    mq.avail().idx().store(1000);
    let mut q: Queue = mq.create_queue().unwrap();
    assert!(blk
        .process_queue(0, std::slice::from_mut(&mut q), &mem)
        .is_err());
    std::fs::remove_file(path).unwrap();
}

#[test]
fn config_space_reads_are_bounded() {
    let path = temp_image(3 << 20);
    let blk = Block::new(&path, false, "cfg".into()).unwrap();
    let mut b = [0u8; 8];
    blk.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), (3 << 20) / 512);
    let mut seg = [0u8; 4];
    blk.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), 254, "seg_max");
    assert_ne!(blk.avail_features() & (1 << super::VIRTIO_BLK_F_SEG_MAX), 0);
    let mut far = [0xffu8; 4];
    blk.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
    std::fs::remove_file(path).unwrap();
}

#[test]
fn persist_round_trip() {
    let mem = memory();
    let path = temp_image(1 << 20);
    let mut blk = Block::new(&path, true, "p".into()).unwrap();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    assert!(run(&mut blk, &mem, &rw_chain(F_WRITE, 512)).0.is_ok());
    let state = blk.save();
    let text = serde_json::to_string(&state).unwrap();
    let back: persist::BlockState = serde_json::from_str(&text).unwrap();
    let restored = Block::restore((), &back).unwrap();
    assert_eq!(restored.save(), state);
    assert_eq!(restored.counters().snapshot().read_ops, 1);
    // An image that changed size is refused.
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 << 20)
        .unwrap();
    assert!(Block::restore((), &state).is_err());
    std::fs::remove_file(path).unwrap();
}
