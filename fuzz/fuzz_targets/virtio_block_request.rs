//! Fuzz target: a virtio-blk request queue whose memory the fuzzer writes.
//!
//! The input is laid out as: 2 bytes avail index, 1 byte queue-size
//! selector, then guest memory contents from address 0 (descriptor table at
//! 0, available ring at 0x400, used ring at 0x800, data after). Descriptor
//! addresses and lengths come from the input, so chains loop, point outside
//! the 64 KiB of guest memory, have wrong directions and lengths. The
//! device must never panic, hang or touch memory outside the guest.
//!
//! `cargo fuzz run virtio_block_request` (nightly) fuzzes it. Built without
//! `--cfg fuzzing` (plain `cargo build`), it is a binary that replays the
//! files or directories given as arguments (e.g. fuzz/corpus/...), which
//! is how CI runs it on stable.

#![cfg_attr(fuzzing, no_main)]

use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::block::Block;
use vmm::devices::virtio::VirtioDevice;

const MEM_SIZE: usize = 64 * 1024;

fn image() -> &'static std::path::Path {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("vigil-fuzz-{}.img", std::process::id()));
        let f = std::fs::File::create(&p).expect("create fuzz image");
        f.set_len(1 << 20).expect("size fuzz image");
        p
    })
}

/// Runs one input through the block device.
pub fn run_one(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let avail_idx = u16::from_le_bytes([data[0], data[1]]);
    let size = 1u16 << (data[2] % 6); // 1..32
    let mem = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("guest memory");
    let body = &data[3..data.len().min(MEM_SIZE + 3)];
    mem.write_slice(body, GuestAddress(0)).expect("fill memory");
    mem.write_obj(avail_idx, GuestAddress(0x402)).expect("avail idx");

    let mut q = Queue::new(32).expect("queue");
    q.set_size(size);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x400), Some(0));
    q.set_used_ring_address(Some(0x800), Some(0));
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let ro = data[2] & 0x80 != 0;
    let mut blk = Block::new(image(), ro, "fuzz".into()).expect("open fuzz image");
    // Either requests complete or the queue is reported broken; both fine.
    let _ = blk.process_queue(0, std::slice::from_mut(&mut q), &mem);
}

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| run_one(data));

#[cfg(not(fuzzing))]
fn main() {
    let mut n = 0;
    for arg in std::env::args().skip(1) {
        let p = std::path::PathBuf::from(&arg);
        let files: Vec<std::path::PathBuf> = if p.is_dir() {
            std::fs::read_dir(&p)
                .expect("read corpus directory")
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect()
        } else {
            vec![p]
        };
        for f in files {
            run_one(&std::fs::read(&f).expect("read corpus file"));
            n += 1;
        }
    }
    let _ = std::fs::remove_file(image());
    println!("replayed {n} inputs without a crash");
}
