//! Guest RAM to and from the snapshot's memory file.
//!
//! One file (`memory.bin`) holds every RAM region back to back, each at the
//! `file_offset` recorded in its [`RegionInfo`]. Pages that are all zero are
//! not written: the file is sparse there (reading a hole gives zeros), so a
//! mostly idle 1 GiB guest costs disk only for the pages it touched.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::SnapshotError;
use crate::memory::GuestMemory;

const PAGE: usize = 4096;
/// Bytes copied per read/write (a multiple of the page size).
const CHUNK: usize = 256 * PAGE;

/// One guest RAM region in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Guest physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub file_offset: u64,
}

/// The region table for `mem` (offsets back to back).
pub fn regions(mem: &GuestMemory) -> Vec<RegionInfo> {
    let mut off = 0;
    mem.iter()
        .map(|r| {
            let info = RegionInfo {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: off,
            };
            off += r.len();
            info
        })
        .collect()
}

/// Total file length the table describes.
pub fn file_len(regions: &[RegionInfo]) -> u64 {
    regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0)
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// Writes all of `mem` to `path` (created or truncated), skipping zero
/// pages. Returns the number of bytes actually written.
pub fn save(mem: &GuestMemory, path: &Path) -> Result<u64, SnapshotError> {
    let file = File::create(path).map_err(io(path, "create"))?;
    let table = regions(mem);
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (region, info) in mem.iter().zip(&table) {
        let mut off = 0u64;
        while off < info.size {
            let n = CHUNK.min((info.size - off) as usize);
            region
                .read_slice(&mut buf[..n], MemoryRegionAddress(off))
                .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    let at = info.file_offset + off + (i * PAGE) as u64;
                    file.write_all_at(page, at)
                        .map_err(io(path, "write guest memory to"))?;
                    written += page.len() as u64;
                }
            }
            off += n as u64;
        }
    }
    // Trailing zero pages were never written: give the file its full length.
    file.set_len(file_len(&table)).map_err(io(path, "size"))?;
    file.sync_all().map_err(io(path, "sync"))?;
    Ok(written)
}

/// Refuses `mem` unless its regions are those of `table`.
pub fn check_layout(mem: &GuestMemory, table: &[RegionInfo]) -> Result<(), SnapshotError> {
    let have = regions(mem);
    if have.len() != table.len()
        || have
            .iter()
            .zip(table)
            .any(|(a, b)| a.guest_addr != b.guest_addr || a.size != b.size)
    {
        return Err(SnapshotError::Layout(format!(
            "snapshot has memory regions {table:?}, the new VM has {have:?}"
        )));
    }
    Ok(())
}

/// Loads `path` into `mem`, whose regions must match `table`. A file
/// shorter than the table says is refused as truncated.
pub fn restore(mem: &GuestMemory, table: &[RegionInfo], path: &Path) -> Result<(), SnapshotError> {
    let file = File::open(path).map_err(io(path, "open"))?;
    let len = file.metadata().map_err(io(path, "stat"))?.len();
    let want = file_len(table);
    if len != want {
        return Err(SnapshotError::MemoryFileSize {
            path: path.to_path_buf(),
            len,
            want,
        });
    }
    check_layout(mem, table)?;
    let mut buf = vec![0u8; CHUNK];
    for (region, info) in mem.iter().zip(table) {
        // Only the file's data extents are read: holes are zero pages, and
        // fresh guest memory is already zero. Reading a mostly idle guest's
        // holes would copy (and make the host allocate) all of its RAM.
        for (start, end) in data_extents(&file, info.file_offset, info.file_offset + info.size)
            .map_err(io(path, "find the data in"))?
        {
            let mut pos = start;
            while pos < end {
                let n = CHUNK.min((end - pos) as usize);
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(io(path, "read guest memory from"))?;
                let at = MemoryRegionAddress(pos - info.file_offset);
                region
                    .write_slice(&buf[..n], at)
                    .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
                pos += n as u64;
            }
        }
    }
    Ok(())
}

/// The `[start, end)` ranges of `file` between `from` and `to` that hold
/// data (SEEK_DATA/SEEK_HOLE). A filesystem without hole reporting reports
/// the whole range as data, which is still correct, only slower.
fn data_extents(file: &File, from: u64, to: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let seek = |pos: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let pos = libc::off_t::try_from(pos)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek on a file descriptor we own for the duration of the
        // call; it only moves the (unused) file offset.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        // ENXIO: no data at or after `pos`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    };
    let mut out = Vec::new();
    let mut pos = from;
    while pos < to {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= to {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(to).min(to);
        // Extents are filesystem blocks; guest memory pages are 4 KiB and
        // regions are page aligned, so any block boundary is fine.
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn round_trip_sparse_and_truncated() {
        let dir = std::env::temp_dir().join(format!("vigil-memtest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let mem = crate::memory::create_guest_memory(8 << 20).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x1000))
            .unwrap();
        mem.write_obj(7u8, GuestAddress((8 << 20) - 1)).unwrap();
        let written = save(&mem, &path).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        let table = regions(&mem);
        let back = crate::memory::create_guest_memory(8 << 20).unwrap();
        restore(&back, &table, &path).unwrap();
        assert_eq!(
            back.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(back.read_obj::<u8>(GuestAddress((8 << 20) - 1)).unwrap(), 7);

        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(4 << 20).unwrap();
        let e = restore(&back, &table, &path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
