//! What the migration engine needs from a VM: the traits the VMM implements,
//! and the dirty-page bitmap they exchange.
//!
//! `migration` never links the VMM's internals (arrows go `migration -> vmm`
//! only through these traits or the control API). The VMM's side:
//!
//! - [`MigratableVm`] on the source: memory layout and reads, the dirty log
//!   (KVM_MEM_LOG_DIRTY_PAGES per slot + KVM_GET_DIRTY_LOG, OR-ed with the
//!   `AtomicBitmap` of guest memory that records the VMM's own writes from
//!   device emulation), vCPU throttling, pause/quiesce/resume and the state
//!   blob produced by the snapshot code.
//! - [`TargetHost`] + [`IncomingVm`] on the target: facts for pre-checks, a
//!   VM shell with memory reserved, page writes, state restore and start.
//!
//! End-to-end tests with real guests come when the VMM implements these; the
//! tests in this crate drive fakes over real loopback TCP.

use crate::precheck::{HostFacts, VmFacts};
pub use crate::protocol::LeaseHandoff;
pub use crate::protocol::Region;
use crate::protocol::PAGE_SIZE;

/// Why a VM operation failed; the VMM's own error, boxed.
pub type VmError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The source VM, as the engine drives it. Called from the migration
/// thread only; the guest keeps running on its own vCPU threads.
pub trait MigratableVm {
    /// Facts for the target's pre-checks (CPU features, memory, disks,
    /// networks, host-local devices).
    fn facts(&self) -> VmFacts;
    /// Guest RAM regions (page aligned; one per KVM slot).
    fn memory_layout(&self) -> Vec<Region>;
    /// Copies guest memory at `gpa` into `buf` (a whole number of pages
    /// inside one region). The guest may be writing concurrently: a torn
    /// page is fine because the dirty log will report it again.
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;
    /// Like [`read_pages`](Self::read_pages), but pages the VM knows to be
    /// zero without reading them (never touched) may be left unread:
    /// `zero[i]` is set for each such page `i` of `buf` (its bytes in `buf`
    /// are then unspecified) and cleared for every page read. The default
    /// reads every page.
    fn read_pages_sparse(
        &self,
        gpa: u64,
        buf: &mut [u8],
        zero: &mut [bool],
    ) -> Result<(), VmError> {
        zero.fill(false);
        self.read_pages(gpa, buf)
    }
    /// Starts dirty logging on every region; pages written from now on are
    /// reported by [`take_dirty`](Self::take_dirty).
    fn start_dirty_log(&mut self) -> Result<(), VmError>;
    /// Pages written since the previous call (or since logging started),
    /// clearing the log: KVM's per-slot log OR the VMM's own bitmap.
    fn take_dirty(&mut self) -> Result<DirtyBitmap, VmError>;
    /// Stops dirty logging (also on failure paths; must not fail).
    fn stop_dirty_log(&mut self);
    /// Throttles the vCPUs to run `100 - percent` % of the time; 0 stops
    /// throttling (auto-converge).
    fn set_throttle(&mut self, percent: u8);
    /// Stops the vCPUs.
    fn pause(&mut self) -> Result<(), VmError>;
    /// Stops devices from touching guest memory or their state (drain
    /// in-flight I/O, stop the queues).
    fn quiesce_devices(&mut self) -> Result<(), VmError>;
    /// vCPU + device state, from the VMM's snapshot code; opaque here.
    fn save_state(&mut self) -> Result<Vec<u8>, VmError>;
    /// Undoes [`pause`](Self::pause) and
    /// [`quiesce_devices`](Self::quiesce_devices): the guest runs again on
    /// the source. Called on every failure before the target's ack
    /// (unless the target holds the VM's lease, see
    /// [`race_lease`](Self::race_lease)).
    fn resume(&mut self) -> Result<(), VmError>;
    /// Switchover, with the guest paused and its devices drained: stop
    /// renewing the VM's HA disk lease (after a renewal in flight lands)
    /// and return it for the target; `None` without a lease (the default).
    fn stop_lease(&mut self) -> Result<Option<LeaseHandoff>, VmError> {
        Ok(None)
    }
    /// The lease is about to go out with the final state.
    fn lease_sent(&mut self) {}
    /// The migration failed before the lease was sent: renew it again.
    fn keep_lease(&mut self) {}
    /// The target acknowledged: the lease is its own; never write it again.
    fn lease_gone(&mut self) {}
    /// The migration failed after the lease was sent: claim its next
    /// generation, as the target does before it runs the guest.
    fn race_lease(&mut self) -> LeaseRace {
        LeaseRace::Won
    }
}

/// Who holds the lease after a switchover that failed once the lease was
/// sent (both sides claim generation G+1; one wins).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseRace {
    /// The source: the guest resumes there.
    Won,
    /// The target: the guest runs there (only its ack was lost); the
    /// source stops without writing anything.
    Lost(String),
    /// Undecided (datastore I/O): the source keeps the guest paused,
    /// lease-suspended, and re-acquires the lease as a peer would.
    Unknown(String),
}

/// A VM being received. Dropped (and its memory freed) unless started.
pub trait IncomingVm {
    /// Writes whole pages at `gpa` (inside one region of the layout).
    fn write_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), VmError>;
    /// Sets `pages` pages at `gpa` to zero.
    fn zero_pages(&mut self, gpa: u64, pages: u32) -> Result<(), VmError> {
        let zeros = vec![0u8; pages as usize * PAGE_SIZE];
        self.write_pages(gpa, &zeros)
    }
    /// Whether the memory of a new VM reads as zero (a fresh anonymous
    /// mapping): then a zero run for pages that never received data needs
    /// no work. False by default.
    fn fresh_memory_is_zero(&self) -> bool {
        false
    }
    /// Guest memory at `gpa` to receive `len` bytes of pages into
    /// directly, straight from the stream (no copy through a buffer), or
    /// `None` to have them written with [`write_pages`](Self::write_pages).
    /// Only for a VM that has not run yet: nothing else reads or writes its
    /// memory meanwhile. `None` by default.
    fn pages_mut(&mut self, gpa: u64, len: usize) -> Option<&mut [u8]> {
        let _ = (gpa, len);
        None
    }
    /// Reads back pages: used only in end-to-end checksum mode.
    fn read_pages(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError>;
    /// Restores vCPU + device state from the source's blob.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), VmError>;
    /// Takes the lease handed over with `Complete`: [`start`](Self::start)
    /// claims its next generation before any vCPU runs and fails, without
    /// running the guest, if the claim is someone else's. The default
    /// refuses (a target without lease handoff).
    fn take_lease(&mut self, lease: &LeaseHandoff) -> Result<(), VmError> {
        Err(format!(
            "this target cannot take over the lease {} (generation {})",
            lease.file.display(),
            lease.generation
        )
        .into())
    }
    /// Starts the vCPUs (and announces the VM's MACs, M3).
    fn start(&mut self) -> Result<(), VmError>;
}

/// The target host: pre-check facts and VM creation.
pub trait TargetHost {
    /// The VM type it creates.
    type Vm: IncomingVm;
    /// This host's facts for the VM described by `vm` (disk lookups
    /// included).
    fn host_facts(&self, vm: &VmFacts) -> HostFacts;
    /// Creates a paused VM shell with `layout` reserved, ready for pages.
    fn create_vm(&mut self, vm: &VmFacts, layout: &[Region]) -> Result<Self::Vm, VmError>;
}

/// One bit per guest page, per region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    regions: Vec<Region>,
    words: Vec<Vec<u64>>,
}

fn region_pages(r: &Region) -> usize {
    (r.size / PAGE_SIZE as u64) as usize
}

impl DirtyBitmap {
    /// An empty bitmap over `layout`.
    pub fn new(layout: &[Region]) -> Self {
        let words = layout
            .iter()
            .map(|r| vec![0u64; region_pages(r).div_ceil(64)])
            .collect();
        DirtyBitmap {
            regions: layout.to_vec(),
            words,
        }
    }

    /// From per-region bitmaps as KVM_GET_DIRTY_LOG returns them (bit `i`
    /// of region `r` = page `i` of that region). Missing words are clean;
    /// bits past a region's end are ignored.
    pub fn from_words(layout: &[Region], words: Vec<Vec<u64>>) -> Self {
        let mut b = Self::new(layout);
        for (dst, src) in b.words.iter_mut().zip(words) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = s;
            }
        }
        b.mask_tails();
        b
    }

    fn mask_tails(&mut self) {
        for (r, w) in self.regions.iter().zip(self.words.iter_mut()) {
            let n = region_pages(r);
            if n % 64 != 0 {
                if let Some(last) = w.last_mut() {
                    *last &= (1u64 << (n % 64)) - 1;
                }
            }
        }
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions
            .iter()
            .position(|r| gpa >= r.gpa && gpa < r.gpa + r.size)
            .map(|i| {
                let page = ((gpa - self.regions[i].gpa) / PAGE_SIZE as u64) as usize;
                (i, page)
            })
    }

    /// Marks `pages` pages from `gpa`; false if any lies outside one region.
    pub fn set_range(&mut self, gpa: u64, pages: u32) -> bool {
        let Some((ri, first)) = self.locate(gpa) else {
            return false;
        };
        let end = first + pages as usize;
        if end > region_pages(&self.regions[ri]) {
            return false;
        }
        for p in first..end {
            self.words[ri][p / 64] |= 1 << (p % 64);
        }
        true
    }

    /// Whether the page at `gpa` is marked.
    pub fn is_set(&self, gpa: u64) -> bool {
        self.locate(gpa)
            .is_some_and(|(ri, p)| self.words[ri][p / 64] & (1 << (p % 64)) != 0)
    }

    /// ORs `other` in (same layout; other regions are ignored).
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (dst, src) in self.words.iter_mut().zip(&other.words) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d |= s;
            }
        }
    }

    /// Number of marked pages.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Pages in the layout.
    pub fn total_pages(&self) -> u64 {
        self.regions.iter().map(|r| region_pages(r) as u64).sum()
    }

    /// Runs of consecutive marked pages, each at most `max` pages.
    pub fn runs(&self, max: u32) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        for (r, w) in self.regions.iter().zip(&self.words) {
            let mut start: Option<usize> = None;
            let total = region_pages(r);
            let mut p = 0;
            while p <= total {
                // Outside a run, a clean word is skipped whole.
                if start.is_none() && p % 64 == 0 && p < total && w[p / 64] == 0 {
                    p += 64;
                    continue;
                }
                let set = p < total && w[p / 64] & (1 << (p % 64)) != 0;
                match (set, start) {
                    (true, None) => start = Some(p),
                    (true, Some(s)) if (p - s) as u32 == max => {
                        out.push((r.gpa + (s * PAGE_SIZE) as u64, max));
                        start = Some(p);
                    }
                    (false, Some(s)) => {
                        out.push((r.gpa + (s * PAGE_SIZE) as u64, (p - s) as u32));
                        start = None;
                    }
                    _ => {}
                }
                p += 1;
            }
        }
        out
    }

    /// Whether any of `pages` pages from `gpa` is marked (false outside
    /// the layout).
    pub fn any_set(&self, gpa: u64, pages: u32) -> bool {
        let Some((ri, first)) = self.locate(gpa) else {
            return false;
        };
        let end = (first + pages as usize).min(region_pages(&self.regions[ri]));
        (first..end).any(|p| self.words[ri][p / 64] & (1 << (p % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = PAGE_SIZE as u64;

    #[test]
    fn runs_split_at_gaps_regions_and_max() {
        let layout = [
            Region {
                gpa: 0,
                size: 100 * P,
            },
            Region {
                gpa: 1000 * P,
                size: 10 * P,
            },
        ];
        let mut b = DirtyBitmap::new(&layout);
        assert!(b.set_range(2 * P, 5));
        assert!(b.set_range(99 * P, 1));
        assert!(b.set_range(1000 * P, 10));
        assert!(!b.set_range(99 * P, 2), "crosses the region end");
        assert!(!b.set_range(500 * P, 1), "in the hole");
        assert_eq!(b.count(), 16);
        assert_eq!(
            b.runs(4),
            vec![
                (2 * P, 4),
                (6 * P, 1),
                (99 * P, 1),
                (1000 * P, 4),
                (1004 * P, 4),
                (1008 * P, 2)
            ]
        );
    }

    #[test]
    fn runs_skip_clean_words_and_cross_word_boundaries() {
        let layout = [Region {
            gpa: 0,
            size: 300 * P,
        }];
        let mut b = DirtyBitmap::new(&layout);
        assert!(b.runs(256).is_empty());
        assert!(b.set_range(60 * P, 10)); // 60..70 crosses a word
        assert!(b.set_range(200 * P, 100)); // to the region's end
        assert_eq!(b.runs(256), vec![(60 * P, 10), (200 * P, 100)]);
        assert_eq!(b.runs(64), vec![(60 * P, 10), (200 * P, 64), (264 * P, 36)]);
        assert!(b.any_set(0, 61) && b.any_set(69 * P, 1) && !b.any_set(70 * P, 130));
        assert!(!b.any_set(0, 60) && !b.any_set(400 * P, 1));
    }

    #[test]
    fn from_kvm_words_masks_tail_and_merges() {
        let layout = [Region {
            gpa: 0,
            size: 70 * P,
        }];
        let mut b = DirtyBitmap::from_words(&layout, vec![vec![1, u64::MAX]]);
        assert_eq!(b.count(), 1 + 6);
        let mut other = DirtyBitmap::new(&layout);
        other.set_range(P, 1);
        b.merge(&other);
        assert!(b.is_set(P) && b.is_set(0) && !b.is_set(2 * P));
        assert_eq!(b.count(), 8);
    }
}
