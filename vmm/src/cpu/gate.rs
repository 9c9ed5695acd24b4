//! Pausing vCPU threads and asking them for their state.
//!
//! A vCPU is paused by parking its thread *outside* KVM_RUN: [`VcpuGate::pause`]
//! raises a flag, kicks every thread with the vCPU kick signal (a blocked
//! KVM_RUN returns EINTR), and waits on a condvar until every thread reports
//! itself parked. Parked threads wait on the same condvar and, while parked,
//! serve "save your state" requests: vCPU ioctls are issued by the thread
//! that owns the vCPU fd, as KVM expects.
//!
//! Guest time while paused: nothing is done to kvmclock. KVM's clock follows
//! the host's monotonic clock, so on resume the guest sees its clock jump
//! forward by the length of the pause, like a laptop waking from suspend
//! (timers that expired fire at once). Snapshot/restore is different: the
//! restored VM gets the saved KVM clock back (`KVM_SET_CLOCK`), so the time
//! the snapshot spent on disk does not appear in the guest.
//!
//! The gate also holds each vCPU's progress counter, bumped on every return
//! from KVM_RUN, which the watchdog reads.
//!
//! Throttling (live migration's auto-converge): with a throttle of P %, a
//! kicker thread ([`VcpuGate::set_throttle`]) kicks every vCPU out of
//! KVM_RUN once per [`THROTTLE_SLICE`], and each vCPU, on its way back in,
//! sleeps `P / (100 - P)` slices ([`VcpuGate::throttle_sleep`]), so it runs
//! about `100 - P` % of the time (QEMU's scheme). The sleep is cut short by
//! a pause or stop request, so a throttled VM still pauses promptly.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::Killable;

use super::state::VcpuState;
use super::vcpu::vcpu_kick_signal;

/// Errors pausing vCPUs or collecting their state.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// Not every vCPU parked in time.
    #[error(
        "vCPUs {stuck:?} did not pause within {timeout_ms} ms (they may be stuck inside KVM; see \
         GET /vm/watchdog)"
    )]
    PauseTimeout {
        /// vCPUs that did not park.
        stuck: Vec<u32>,
        /// How long we waited.
        timeout_ms: u64,
    },
    /// The VM is stopping.
    #[error("the VM is shutting down")]
    Stopping,
    /// The VM is not paused (state is only consistent while paused).
    #[error("the VM is not paused")]
    NotPaused,
    /// A vCPU failed to read its state.
    #[error("vCPU {id} could not save its state: {reason}")]
    Save {
        /// vCPU index.
        id: u32,
        /// The error, as text (it crossed a thread).
        reason: String,
    },
}

#[derive(Default)]
struct Inner {
    parked: Vec<bool>,
    /// Save request generation; a vCPU answers when `answered[id] < gen`.
    gen: u64,
    answered: Vec<u64>,
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// Shared by the vCPU threads, the API and the watchdog.
pub struct VcpuGate {
    paused: AtomicBool,
    stopping: AtomicBool,
    inner: Mutex<Inner>,
    cv: Condvar,
    progress: Vec<AtomicU64>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    throttle: AtomicU8,
    kicker: Mutex<Option<JoinHandle<()>>>,
}

/// The run slice of a throttled vCPU (QEMU uses 10 ms too).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

/// How long [`VcpuGate::pause`] waits for all vCPUs to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl VcpuGate {
    /// A gate for `n` vCPUs, running.
    pub fn new(n: u32) -> Self {
        let n = n as usize;
        Self {
            paused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            inner: Mutex::new(Inner {
                parked: vec![false; n],
                gen: 0,
                answered: vec![0; n],
                saved: (0..n).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
            progress: (0..n).map(|_| AtomicU64::new(0)).collect(),
            threads: Mutex::new(Vec::new()),
            throttle: AtomicU8::new(0),
            kicker: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.progress.len()
    }

    /// Whether there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.progress.is_empty()
    }

    /// Hands the vCPU threads to the gate (for kicking and joining).
    pub fn set_threads(&self, t: Vec<JoinHandle<()>>) {
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = t;
    }

    /// Takes the threads back (to join them at stop).
    pub fn take_threads(&self) -> Vec<JoinHandle<()>> {
        std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Kicks vCPU `id` out of KVM_RUN (no-op if its thread is gone).
    pub fn kick(&self, id: u32) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = threads.get(id as usize) {
            // The handle is not joined, so the pthread id is still valid
            // even if the thread has finished.
            if let Err(e) = t.kill(vcpu_kick_signal()) {
                tracing::debug!(vcpu = id, error = %e, "kick failed");
            }
        }
    }

    /// Bumps vCPU `id`'s progress counter (every return from KVM_RUN).
    pub fn bump(&self, id: u32) {
        if let Some(p) = self.progress.get(id as usize) {
            p.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// vCPU `id`'s progress counter.
    pub fn progress(&self, id: u32) -> u64 {
        self.progress
            .get(id as usize)
            .map_or(0, |p| p.load(Ordering::Relaxed))
    }

    /// Whether a pause was requested (checked by vCPUs before KVM_RUN).
    pub fn pause_requested(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Whether vCPU `id` is parked.
    pub fn is_parked(&self, id: u32) -> bool {
        self.lock()
            .parked
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Tells parked vCPUs the VM is stopping, so they leave the gate.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _g = self.lock();
        self.cv.notify_all();
    }

    /// Called by vCPU `id`'s thread when it sees a pause request: parks
    /// until resumed or stopped, answering save requests meanwhile with
    /// `save`.
    pub fn park(&self, id: u32, mut save: impl FnMut() -> Result<VcpuState, String>) {
        let i = id as usize;
        let mut g = self.lock();
        if let Some(p) = g.parked.get_mut(i) {
            *p = true;
        }
        self.cv.notify_all();
        while self.paused.load(Ordering::SeqCst) && !self.stopping.load(Ordering::SeqCst) {
            if g.answered.get(i).is_some_and(|a| *a < g.gen) {
                let gen = g.gen;
                g.answered[i] = gen;
                g.saved[i] = Some(save());
                self.cv.notify_all();
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if let Some(p) = g.parked.get_mut(i) {
            *p = false;
        }
        self.cv.notify_all();
    }

    /// Pauses every vCPU; returns once all are parked. Idempotent.
    pub fn pause(&self, timeout: Duration) -> Result<(), GateError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(GateError::Stopping);
        }
        self.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        loop {
            let not_parked: Vec<u32> = {
                let g = self.lock();
                (0u32..)
                    .zip(&g.parked)
                    .filter(|(_, p)| !**p)
                    .map(|(i, _)| i)
                    .collect()
            };
            if not_parked.is_empty() {
                return Ok(());
            }
            if self.stopping.load(Ordering::SeqCst) {
                return Err(GateError::Stopping);
            }
            if Instant::now() >= deadline {
                // Leave the flag set: the stragglers park when they get out
                // of KVM; the caller may resume to undo.
                return Err(GateError::PauseTimeout {
                    stuck: not_parked,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            // A kick can land just before a thread enters KVM_RUN and be
            // lost, so kick until parked.
            for id in &not_parked {
                self.kick(*id);
            }
            let g = self.lock();
            let _ = self
                .cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Lets the vCPUs run again. Idempotent.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        let _g = self.lock();
        self.cv.notify_all();
    }

    /// Whether the VM is paused (requested; see [`Self::pause`]).
    pub fn is_paused(&self) -> bool {
        self.pause_requested()
    }

    /// Current throttle, percent (0 = none).
    pub fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Throttles the vCPUs to run about `100 - percent` % of the time
    /// (capped at 99); 0 stops throttling and the kicker thread.
    pub fn set_throttle(self: &Arc<Self>, percent: u8) {
        let percent = percent.min(99);
        self.throttle.store(percent, Ordering::SeqCst);
        let mut kicker = self.kicker.lock().unwrap_or_else(|p| p.into_inner());
        if percent == 0 {
            if let Some(t) = kicker.take() {
                let _ = t.join();
            }
            return;
        }
        if kicker.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let gate = self.clone();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while gate.throttle() > 0 && !gate.stopping.load(Ordering::SeqCst) {
                    for id in 0..gate.len() as u32 {
                        gate.kick(id);
                    }
                    std::thread::sleep(THROTTLE_SLICE);
                }
            });
        match spawned {
            Ok(t) => *kicker = Some(t),
            Err(e) => tracing::warn!(error = %e, "cannot start the vCPU throttle thread"),
        }
    }

    /// Called by a vCPU thread between two KVM_RUNs: sleeps its share of
    /// the throttle, unless a pause or stop is requested meanwhile.
    pub fn throttle_sleep(&self) {
        let p = u32::from(self.throttle());
        if p == 0 {
            return;
        }
        let deadline = Instant::now() + THROTTLE_SLICE * p / (100 - p);
        while Instant::now() < deadline {
            if self.pause_requested()
                || self.stopping.load(Ordering::SeqCst)
                || self.throttle() == 0
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(2).min(deadline - Instant::now()));
        }
    }

    /// Asks every parked vCPU for its state; the VM must be paused.
    pub fn collect_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, GateError> {
        if !self.pause_requested() {
            return Err(GateError::NotPaused);
        }
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        g.gen += 1;
        let gen = g.gen;
        for s in g.saved.iter_mut() {
            *s = None;
        }
        self.cv.notify_all();
        while g.answered.iter().any(|a| *a < gen) {
            if Instant::now() >= deadline || self.stopping.load(Ordering::SeqCst) {
                let stuck = (0u32..)
                    .zip(&g.answered)
                    .filter(|(_, a)| **a < gen)
                    .map(|(i, _)| i)
                    .collect();
                return Err(GateError::PauseTimeout {
                    stuck,
                    timeout_ms: timeout.as_millis() as u64,
                });
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut out = Vec::with_capacity(g.saved.len());
        for (id, s) in (0u32..).zip(g.saved.iter_mut()) {
            match s.take() {
                Some(Ok(st)) => out.push(st),
                Some(Err(reason)) => return Err(GateError::Save { id, reason }),
                None => {
                    return Err(GateError::Save {
                        id,
                        reason: "no answer".to_string(),
                    })
                }
            }
        }
        Ok(out)
    }
}
