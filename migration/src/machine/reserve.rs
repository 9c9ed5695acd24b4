//! How much memory this process can reserve, and committing it.
//!
//! The figure the memory pre-check compares against is the smaller of
//! `MemAvailable` (/proc/meminfo) and, for the memory cgroup this process
//! is in and each of its ancestors that has a limit, the limit minus what
//! the group already uses. Both cgroup versions are read: v2
//! (`memory.max`, `memory.current`) and v1 (`memory.limit_in_bytes`,
//! `memory.usage_in_bytes`), wherever `/proc/self/mountinfo` says the
//! memory controller is mounted. Swap does not count: a reservation is
//! RAM the guest can use without being paged out.
//!
//! [`commit`] makes a reservation real: every page of the guest memory is
//! faulted in (`MADV_POPULATE_WRITE`), so the memory is this process's
//! before any of it is needed. It is called only after the figure said the
//! memory fits: past a cgroup's limit the kernel would not fail the fault
//! but pick a process in the group to kill.

use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm::memory::GuestMemory;

/// Memory this process can reserve, with where the figure comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservable {
    /// MiB that can be reserved (the smallest of the limits below).
    pub mib: u64,
    /// How it was found, for messages: `MemAvailable 20480 MiB; memory
    /// cgroup /a/b (v1): limit 32 MiB, 5 MiB used`.
    pub detail: String,
}

/// A memory cgroup limit that applies to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Limit {
    /// The group, as /proc/self/cgroup names it.
    name: String,
    version: u8,
    limit: u64,
    usage: u64,
}

/// Where this process's memory cgroup lives: the group's directory and its
/// name, from /proc/self/cgroup and /proc/self/mountinfo. v2 is preferred
/// when its hierarchy has the memory controller; else the v1 memory
/// hierarchy.
fn memory_cgroup(cgroup: &str, mountinfo: &str) -> Option<(PathBuf, PathBuf, String, u8)> {
    let mut v1 = None;
    let mut v2 = None;
    for line in cgroup.lines() {
        let mut it = line.splitn(3, ':');
        let (Some(_), Some(ctrl), Some(path)) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if ctrl.is_empty() {
            v2 = Some(path.to_string());
        } else if ctrl.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_string());
        }
    }
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTS
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.is_empty() {
            continue;
        }
        let (root, mnt) = (pre[3], PathBuf::from(pre[4]));
        let (version, path) = match post[0] {
            "cgroup2" => {
                let ctl =
                    std::fs::read_to_string(mnt.join("cgroup.controllers")).unwrap_or_default();
                if !ctl.split_whitespace().any(|c| c == "memory") {
                    continue;
                }
                (2, v2.as_deref())
            }
            "cgroup"
                if post
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|c| c == "memory")) =>
            {
                (1, v1.as_deref())
            }
            _ => continue,
        };
        let Some(path) = path else { continue };
        // A container may mount its own group as the hierarchy's root.
        let rel = Path::new(path)
            .strip_prefix(root)
            .unwrap_or_else(|_| Path::new(path.trim_start_matches('/')));
        let rel = rel.strip_prefix("/").unwrap_or(rel);
        return Some((mnt.join(rel), mnt, path.to_string(), version));
    }
    None
}

fn read_u64(p: &Path) -> Option<u64> {
    let t = std::fs::read_to_string(p).ok()?;
    t.trim().parse().ok()
}

/// The limits of `dir` and of each ancestor up to `mnt` (`max`, or a v1
/// limit near 2^63, means none).
fn limits(dir: &Path, mnt: &Path, name: &str, version: u8) -> Vec<Limit> {
    let (max_file, cur_file) = if version == 2 {
        ("memory.max", "memory.current")
    } else {
        ("memory.limit_in_bytes", "memory.usage_in_bytes")
    };
    let mut out = Vec::new();
    let mut d = dir.to_path_buf();
    let mut n = PathBuf::from(name);
    loop {
        if let (Some(limit), Some(usage)) =
            (read_u64(&d.join(max_file)), read_u64(&d.join(cur_file)))
        {
            if limit < (1 << 62) {
                out.push(Limit {
                    name: n.display().to_string(),
                    version,
                    limit,
                    usage,
                });
            }
        }
        if d == mnt || !d.pop() || !d.starts_with(mnt) {
            break;
        }
        n.pop();
    }
    out
}

/// The reservable figure from `MemAvailable` (KiB) and the limits found.
fn combine(mem_available_kib: u64, limits: &[Limit]) -> Reservable {
    let mut mib = mem_available_kib >> 10;
    let mut detail = format!("MemAvailable {mib} MiB");
    for l in limits {
        let room = l.limit.saturating_sub(l.usage) >> 20;
        mib = mib.min(room);
        detail.push_str(&format!(
            "; memory cgroup {} (v{}): limit {} MiB, {} MiB used",
            l.name,
            l.version,
            l.limit >> 20,
            l.usage >> 20
        ));
    }
    Reservable { mib, detail }
}

/// What this process can reserve now.
pub fn reservable() -> Reservable {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = vmm::memory::parse_meminfo(&meminfo).mem_available_kib;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let lim = match memory_cgroup(&cgroup, &mountinfo) {
        Some((dir, mnt, name, version)) => limits(&dir, &mnt, &name, version),
        None => Vec::new(),
    };
    combine(avail, &lim)
}

/// Faults in every page of `mem` for writing, so the memory is committed
/// to this process now rather than on first use.
pub fn commit(mem: &GuestMemory) -> std::io::Result<()> {
    for r in mem.iter() {
        let len = r.len() as usize;
        let host = r.as_ptr();
        // SAFETY: [host, host + len) is one mmap'd region of `mem`, alive
        // for this call; MADV_POPULATE_WRITE only faults its pages in
        // (they read as zero, as before).
        let rc = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            // A kernel before 5.14: touch each page instead.
            for off in (0..len).step_by(4096) {
                // SAFETY: `off` < len, inside the region; a volatile write
                // of zero to anonymous memory that reads as zero changes
                // nothing but residency.
                unsafe { std::ptr::write_volatile(host.add(off), 0u8) };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_group_under_a_container_root() {
        let dir = std::env::temp_dir().join(format!("vigil-reserve-{}", std::process::id()));
        let grp = dir.join("a/b");
        std::fs::create_dir_all(&grp).unwrap();
        std::fs::write(grp.join("memory.limit_in_bytes"), "33554432\n").unwrap();
        std::fs::write(grp.join("memory.usage_in_bytes"), "5242880\n").unwrap();
        std::fs::write(dir.join("a/memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        std::fs::write(dir.join("a/memory.usage_in_bytes"), "1\n").unwrap();
        let cgroup = "4:memory:/a/b\n1:cpu:/\n0::/\n";
        let mountinfo = format!(
            "30 25 0:26 / {} rw,relatime shared:5 - cgroup cgroup rw,memory\n",
            dir.display()
        );
        let (d, mnt, name, v) = memory_cgroup(cgroup, &mountinfo).unwrap();
        assert_eq!((d.clone(), v), (grp.clone(), 1));
        let l = limits(&d, &mnt, &name, v);
        assert_eq!(l.len(), 1, "{l:?}");
        let r = combine(1 << 20, &l);
        assert_eq!(r.mib, 27);
        assert!(
            r.detail.contains("/a/b (v1): limit 32 MiB, 5 MiB used"),
            "{}",
            r.detail
        );
        // MemAvailable is smaller: it wins.
        assert_eq!(combine(10 << 10, &l).mib, 10);
        // Usage above the limit leaves nothing, not an underflow.
        std::fs::write(grp.join("memory.usage_in_bytes"), "99999999\n").unwrap();
        assert_eq!(combine(1 << 20, &limits(&d, &mnt, &name, v)).mib, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_memory_controller_means_memavailable_only() {
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(memory_cgroup("1:cpu:/\n", mountinfo), None);
        let r = combine(2048 << 10, &[]);
        assert_eq!((r.mib, r.detail.as_str()), (2048, "MemAvailable 2048 MiB"));
    }

    #[test]
    fn commit_faults_every_page_in() {
        let mem = vmm::memory::create_guest_memory(8 << 20).unwrap();
        commit(&mem).unwrap();
        for r in mem.iter() {
            let pages = (r.len() as usize).div_ceil(4096);
            let mut vec = vec![0u8; pages];
            // SAFETY: the region is mapped for `r.len()` bytes; mincore
            // writes one byte per page into `vec`.
            let rc =
                unsafe { libc::mincore(r.as_ptr().cast(), r.len() as usize, vec.as_mut_ptr()) };
            assert_eq!(rc, 0);
            assert!(vec.iter().all(|b| b & 1 == 1), "a page is not resident");
        }
    }
}
