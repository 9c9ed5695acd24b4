//! One virtio-blk request: parsed from a descriptor chain, checked, run
//! against the image file.
//!
//! Layout (virtio 1.2, 5.2.6): a device-readable 16-byte header (type,
//! reserved, sector), data buffers (device-writable for reads and GET_ID,
//! device-readable for writes), and a final device-writable status byte.
//! Everything in the chain comes from the guest: every address goes through
//! vm-memory's bounds checks, every length is checked against the header and
//! the disk size, and a malformed chain fails with VIRTIO_BLK_S_IOERR when
//! there is a status byte to write it to.

use std::fs::File;
use std::io::{Seek, SeekFrom};

use virtio_queue::desc::split::Descriptor;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::device::{Block, BlockCounters};
use super::{SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};
use crate::memory::GuestMemory;

/// Read from the disk.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write to the disk.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush the disk's write cache.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Read the device id.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// I/O error (also: malformed request, write to a read-only disk).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The request header as the guest lays it out.
#[derive(Debug, Default, Clone, Copy)]
#[repr(C)]
pub struct RequestHeader {
    /// VIRTIO_BLK_T_*.
    pub kind: u32,
    /// Reserved (was ioprio).
    pub reserved: u32,
    /// First sector (512-byte units, whatever the block size).
    pub sector: u64,
}

// SAFETY: RequestHeader is plain old data of integers with no padding
// (4 + 4 + 8 bytes, 8-aligned), so any byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// Why a chain is not a valid request.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Fewer than two descriptors (header + status).
    #[error("descriptor chain too short")]
    TooShort,
    /// The walk stopped at a descriptor that still points to a next one: a
    /// loop, or a next index outside the table.
    #[error("descriptor chain loops or leaves the table")]
    Truncated,
    /// The header descriptor is device-writable or too small.
    #[error("bad header descriptor")]
    BadHeader,
    /// The header cannot be read from guest memory.
    #[error("header outside guest memory")]
    HeaderUnreadable,
    /// The status descriptor is device-readable or empty.
    #[error("bad status descriptor")]
    BadStatus,
    /// A data descriptor has the wrong direction for the request.
    #[error("data descriptor with the wrong direction")]
    WrongDirection,
    /// A data buffer lies (partly) outside guest memory.
    #[error("data buffer outside guest memory")]
    BadBuffer,
    /// Data length is not a whole number of sectors, or the range is beyond
    /// the end of the disk.
    #[error("request outside the disk or not sector-sized")]
    OutOfRange,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// VIRTIO_BLK_T_*.
    pub kind: u32,
    /// First sector.
    pub sector: u64,
    /// Data buffers in order.
    pub data: Vec<(GuestAddress, u32)>,
    /// Where the status byte goes.
    pub status: GuestAddress,
}

/// Where to put the status byte of a chain, if its last descriptor can hold
/// one: used to report errors for chains that are otherwise malformed.
pub fn status_address(descs: &[Descriptor], mem: &GuestMemory) -> Option<GuestAddress> {
    let last = descs.last()?;
    (descs.len() >= 2 && !last.has_next() && last.is_write_only() && last.len() >= 1)
        .then(|| last.addr())
        .filter(|a| mem.check_address(*a).is_some())
}

/// Parses a chain already collected into `descs`.
pub fn parse(
    descs: &[Descriptor],
    mem: &GuestMemory,
    capacity: u64,
) -> Result<Request, RequestError> {
    if descs.last().is_some_and(|d| d.has_next()) {
        return Err(RequestError::Truncated);
    }
    let (first, rest) = descs.split_first().ok_or(RequestError::TooShort)?;
    let (last, data) = rest.split_last().ok_or(RequestError::TooShort)?;
    if first.is_write_only() || (first.len() as usize) < std::mem::size_of::<RequestHeader>() {
        return Err(RequestError::BadHeader);
    }
    let hdr: RequestHeader = mem
        .read_obj(first.addr())
        .map_err(|_| RequestError::HeaderUnreadable)?;
    if !last.is_write_only() || last.len() < 1 || mem.check_address(last.addr()).is_none() {
        return Err(RequestError::BadStatus);
    }
    let kind = u32::from_le(hdr.kind);
    let sector = u64::from_le(hdr.sector);
    let want_writable = kind != VIRTIO_BLK_T_OUT;
    let mut total: u64 = 0;
    for d in data {
        if d.is_write_only() != want_writable {
            return Err(RequestError::WrongDirection);
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::BadBuffer);
        }
        total += u64::from(d.len());
    }
    if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_OUT {
        let end = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|s| s.checked_add(total));
        if !total.is_multiple_of(SECTOR_SIZE) || end.is_none_or(|e| e > capacity * SECTOR_SIZE) {
            return Err(RequestError::OutOfRange);
        }
    }
    Ok(Request {
        kind,
        sector,
        data: data.iter().map(|d| (d.addr(), d.len())).collect(),
        status: last.addr(),
    })
}

impl Block {
    /// Runs `req`; returns the status and the number of bytes written into
    /// guest buffers (data + the status byte), for the used ring.
    pub fn execute(&mut self, req: &Request, mem: &GuestMemory) -> (u8, u32) {
        let c = &self.counters;
        match req.kind {
            VIRTIO_BLK_T_IN => match transfer(&mut self.file, req, mem, false) {
                Ok(n) => {
                    BlockCounters::add(&c.read_bytes, n);
                    BlockCounters::add(&c.read_ops, 1);
                    // n <= u32::MAX: the chain's total length is bounded by
                    // the descriptor walker at 2^32 - 1.
                    (VIRTIO_BLK_S_OK, (n as u32).saturating_add(1))
                }
                Err(e) => self.io_error("read", e),
            },
            // The disk lease's fence (HA): a copy past its stop time never writes.
            VIRTIO_BLK_T_OUT if self.read_only || !crate::lease::writes_allowed() => {
                BlockCounters::add(&c.errors, 1);
                (VIRTIO_BLK_S_IOERR, 1)
            }
            VIRTIO_BLK_T_OUT => match transfer(&mut self.file, req, mem, true) {
                Ok(n) => {
                    BlockCounters::add(&c.write_bytes, n);
                    BlockCounters::add(&c.write_ops, 1);
                    (VIRTIO_BLK_S_OK, 1)
                }
                Err(e) => self.io_error("write", e),
            },
            VIRTIO_BLK_T_FLUSH => {
                let r = if self.read_only {
                    Ok(())
                } else {
                    self.file.sync_data()
                };
                match r {
                    Ok(()) => {
                        BlockCounters::add(&c.flushes, 1);
                        (VIRTIO_BLK_S_OK, 1)
                    }
                    Err(e) => self.io_error("flush", e),
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
                let src = self.id.as_bytes();
                let n = src.len().min(VIRTIO_BLK_ID_BYTES);
                id[..n].copy_from_slice(&src[..n]);
                let mut written = 0usize;
                for (addr, len) in &req.data {
                    let take = (*len as usize).min(VIRTIO_BLK_ID_BYTES - written);
                    if take == 0 {
                        break;
                    }
                    if mem
                        .write_slice(&id[written..written + take], *addr)
                        .is_err()
                    {
                        return self.io_error("get-id", std::io::Error::other("bad buffer"));
                    }
                    written += take;
                }
                (VIRTIO_BLK_S_OK, written as u32 + 1)
            }
            other => {
                tracing::debug!(kind = other, "unsupported virtio-blk request");
                BlockCounters::add(&c.errors, 1);
                (VIRTIO_BLK_S_UNSUPP, 1)
            }
        }
    }

    fn io_error(&self, op: &'static str, e: std::io::Error) -> (u8, u32) {
        tracing::warn!(disk = %self.id, op, error = %e, "disk I/O failed");
        BlockCounters::add(&self.counters.errors, 1);
        (VIRTIO_BLK_S_IOERR, 1)
    }
}

/// Moves the request's data between the file and guest memory; returns the
/// bytes moved.
fn transfer(
    file: &mut File,
    req: &Request,
    mem: &GuestMemory,
    to_disk: bool,
) -> std::io::Result<u64> {
    let mut off = req.sector * SECTOR_SIZE;
    for (addr, len) in &req.data {
        file.seek(SeekFrom::Start(off))?;
        let r = if to_disk {
            mem.write_all_volatile_to(*addr, file, *len as usize)
        } else {
            mem.read_exact_volatile_from(*addr, file, *len as usize)
        };
        r.map_err(std::io::Error::other)?;
        off += u64::from(*len);
    }
    Ok(off - req.sector * SECTOR_SIZE)
}
