//! One vCPU's architectural state for snapshot, restore and migration:
//! [`VcpuState`] (plain serde data) and the two functions that read it from
//! and write it to KVM, [`save`] and [`restore`].
//!
//! The order of the ioctls matters and is written down once, in those two
//! functions, with the reason for each step.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// IA32_TSC: must be written before anything derived from it.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: compared against the TSC, so written after it.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// MSRs that KVM lists but that must not be written back: read-only
/// capability MSRs whose value is the host's (writing them fails, or on a
/// different host lies to the guest). Everything else KVM lists is saved.
const MSR_DENY: &[u32] = &[
    0x10a, // IA32_ARCH_CAPABILITIES (read-only, host property; fails on this host)
    0x48a, // IA32_VMX_* capability range start (nested VMX, read-only)
];

/// Errors reading or writing vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {id}: KVM {op} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u32,
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A FAM wrapper could not be built (too many entries in the state).
    #[error("vCPU {id}: {what} has too many entries ({n}) for KVM")]
    TooMany {
        /// vCPU index.
        id: u32,
        /// Which list.
        what: &'static str,
        /// How many.
        n: usize,
    },
    /// KVM accepted only part of the MSR list.
    #[error(
        "vCPU {id}: KVM refused to restore MSR {index:#x} (restored {done} of {total}): the \
         snapshot was taken on a host whose KVM has MSRs this host lacks"
    )]
    Msr {
        /// vCPU index.
        id: u32,
        /// The MSR KVM stopped at.
        index: u32,
        /// How many were written.
        done: usize,
        /// How many were asked.
        total: usize,
    },
}

/// The x87/SSE state when KVM lacks XSAVE (KVM_GET_FPU layout). kvm-bindings
/// has no serde for `kvm_fpu`, so it is mirrored here.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers, 16 bytes each.
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: Vec<[u8; 16]>,
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> kvm_fpu {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        for (d, s) in f.fpr.iter_mut().zip(&self.fpr) {
            *d = *s;
        }
        for (d, s) in f.xmm.iter_mut().zip(&self.xmm) {
            *d = *s;
        }
        f
    }
}

/// Floating-point/vector state: XSAVE area when KVM supports it, else FPU.
#[derive(Debug, Serialize, Deserialize)]
pub enum FloatState {
    /// KVM_GET_XSAVE (4 KiB legacy area; covers x87, SSE, AVX).
    Xsave(Box<kvm_xsave>),
    /// KVM_GET_FPU.
    Fpu(FpuState),
}

/// One vCPU's saved state. Plain data: no fds.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u32,
    /// The CPUID table the guest saw (restored as is, not recomputed from
    /// a template, so the guest sees the same CPU after a restore).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU/vector state.
    pub float: FloatState,
    /// XCR0 and friends (None when KVM lacks KVM_CAP_XCRS).
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Every readable MSR KVM lists, TSC first and TSC deadline last.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub vcpu_events: kvm_vcpu_events,
    /// The TSC frequency the guest calibrated against (0 if unknown).
    pub tsc_khz: u32,
}

/// What KVM on this host can do, for [`save`]: asked once per VM.
#[derive(Debug, Clone, Default)]
pub struct StateCaps {
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// KVM_GET_MSR_INDEX_LIST minus [`MSR_DENY`], TSC first, deadline last.
    pub msrs: Vec<u32>,
}

impl StateCaps {
    /// Asks KVM once.
    pub fn probe(kvm: &kvm_ioctls::Kvm) -> Self {
        let mut msrs: Vec<u32> = match kvm.get_msr_index_list() {
            Ok(l) => l.as_slice().to_vec(),
            Err(e) => {
                tracing::warn!(error = %e, "KVM_GET_MSR_INDEX_LIST failed; saving no MSRs");
                Vec::new()
            }
        };
        msrs.retain(|m| !MSR_DENY.contains(m) && !(0x480..=0x491).contains(m));
        order_msrs(&mut msrs);
        Self {
            xsave: kvm.check_extension(kvm_ioctls::Cap::Xsave),
            xcrs: kvm.check_extension(kvm_ioctls::Cap::Xcrs),
            msrs,
        }
    }
}

/// KVM writes MSRs in array order: the TSC goes first (other MSRs and the
/// guest's kvmclock are relative to it) and the TSC deadline last (KVM
/// converts it against the current TSC and LAPIC timer mode).
fn order_msrs(msrs: &mut Vec<u32>) {
    msrs.sort_by_key(|m| match *m {
        MSR_IA32_TSC => (0, *m),
        MSR_IA32_TSC_DEADLINE => (2, *m),
        _ => (1, *m),
    });
    msrs.dedup();
}

/// Reads vCPU `id`'s state. The vCPU must not be inside KVM_RUN (it is
/// parked) and, for a consistent snapshot, no vCPU of the VM may run.
///
/// Order, and why:
/// 1. mp_state first: KVM_GET_MP_STATE makes KVM process pending INIT/SIPI
///    events (`kvm_apic_accept_events`), which changes registers and LAPIC
///    state; everything read after it is then consistent with it.
/// 2. regs, sregs, fpu/xsave, xcrs: plain register files.
/// 3. lapic: after mp_state for the reason above.
/// 4. msrs: after lapic; includes TSC and the kvmclock MSRs.
/// 5. vcpu_events last: it holds pending exceptions/interrupts, which the
///    earlier GETs may still move (sregs also carries a pending interrupt
///    bitmap; vcpu_events is the authoritative copy, read last).
pub fn save(fd: &VcpuFd, id: u32, caps: &StateCaps) -> Result<VcpuState, StateError> {
    let io = |op| move |source| StateError::Ioctl { id, op, source };
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(io("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let mp_state = fd.get_mp_state().map_err(io("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(io("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(io("KVM_GET_SREGS"))?;
    let float = if caps.xsave {
        FloatState::Xsave(Box::new(fd.get_xsave().map_err(io("KVM_GET_XSAVE"))?))
    } else {
        FloatState::Fpu(FpuState::from(&fd.get_fpu().map_err(io("KVM_GET_FPU"))?))
    };
    let xcrs = if caps.xcrs {
        Some(fd.get_xcrs().map_err(io("KVM_GET_XCRS"))?)
    } else {
        None
    };
    let lapic = fd.get_lapic().map_err(io("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, id, &caps.msrs)?;
    let vcpu_events = fd.get_vcpu_events().map_err(io("KVM_GET_VCPU_EVENTS"))?;
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        float,
        xcrs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// KVM_GET_MSRS stops at the first MSR it cannot read (some listed MSRs
/// depend on CPUID bits the guest lacks); drop that one and retry, so every
/// MSR that can be read is saved.
fn read_msrs(fd: &VcpuFd, id: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut want: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = want
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooMany {
            id,
            what: "the MSR list",
            n: entries.len(),
        })?;
        let n = fd.get_msrs(&mut msrs).map_err(|source| StateError::Ioctl {
            id,
            op: "KVM_GET_MSRS",
            source,
        })?;
        if n >= want.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        tracing::debug!(vcpu = id, msr = want[n], "MSR not readable; not saved");
        want.remove(n);
    }
}

/// Writes `state` into a freshly created vCPU that has not run yet.
///
/// Order, and why:
/// 1. cpuid first: KVM derives which MSRs, XSAVE components and LAPIC
///    features exist from it; later SETs are checked against it.
/// 2. tsc_khz (only if it differs and the host can scale): before the TSC
///    MSR is written, since the TSC value is interpreted at that rate.
/// 3. mp_state, regs, sregs: sregs sets the APIC base MSR and EFER/CR
///    modes that the LAPIC and MSR writes depend on.
/// 4. fpu/xsave then xcrs: xsave's XSTATE_BV must fit XCR0, which
///    KVM checks against CPUID (set above).
/// 5. lapic: after sregs (APIC base / x2APIC mode decide how it's read).
/// 6. msrs: after lapic, because TSC_DEADLINE is only accepted with the
///    LAPIC in TSC-deadline mode; TSC first within the list (see
///    [`order_msrs`]).
/// 7. vcpu_events last: pending events are validated against the mode set
///    by sregs and the LAPIC, and must not be overwritten by earlier SETs.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let id = state.id;
    let io = |op| move |source| StateError::Ioctl { id, op, source };
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::TooMany {
        id,
        what: "the CPUID table",
        n: state.cpuid.len(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(io("KVM_SET_CPUID2"))?;
    if state.tsc_khz != 0 {
        match fd.get_tsc_khz() {
            Ok(host) if host != state.tsc_khz => {
                if let Err(e) = fd.set_tsc_khz(state.tsc_khz) {
                    tracing::warn!(
                        vcpu = id,
                        saved_khz = state.tsc_khz,
                        host_khz = host,
                        error = %e,
                        "cannot scale the TSC to the snapshot's rate; the guest's clock may drift"
                    );
                }
            }
            _ => {}
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(io("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(io("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(io("KVM_SET_SREGS"))?;
    match &state.float {
        // SAFETY: `x` is a complete `kvm_xsave` (the 4 KiB legacy layout)
        // that KVM_GET_XSAVE filled on save; KVM reads exactly that size.
        FloatState::Xsave(x) => unsafe { fd.set_xsave(x) }.map_err(io("KVM_SET_XSAVE"))?,
        FloatState::Fpu(f) => fd.set_fpu(&f.to_kvm()).map_err(io("KVM_SET_FPU"))?,
    }
    if let Some(x) = &state.xcrs {
        fd.set_xcrs(x).map_err(io("KVM_SET_XCRS"))?;
    }
    fd.set_lapic(&state.lapic).map_err(io("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| StateError::TooMany {
        id,
        what: "the MSR list",
        n: state.msrs.len(),
    })?;
    let n = fd.set_msrs(&msrs).map_err(io("KVM_SET_MSRS"))?;
    if n < state.msrs.len() {
        return Err(StateError::Msr {
            id,
            index: state.msrs[n].index,
            done: n,
            total: state.msrs.len(),
        });
    }
    fd.set_vcpu_events(&state.vcpu_events)
        .map_err(io("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> VcpuState {
        let mut regs = kvm_regs {
            rip: 0xffff_ffff_8100_0000,
            rsp: 0x1234,
            rflags: 0x246,
            ..Default::default()
        };
        regs.rax = 42;
        let mut xsave = kvm_xsave::default();
        xsave.region[0] = 0x37f;
        xsave.region[1023] = 7;
        VcpuState {
            id: 1,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x1234,
                ..Default::default()
            }],
            mp_state: kvm_mp_state { mp_state: 3 },
            regs,
            sregs: kvm_sregs {
                cr3: 0x9000,
                efer: 0x500,
                ..Default::default()
            },
            float: FloatState::Xsave(Box::new(xsave)),
            xcrs: Some(kvm_xcrs::default()),
            lapic: kvm_lapic_state::default(),
            msrs: vec![kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: 0xdead_beef,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
            tsc_khz: 2_000_000,
        }
    }

    #[test]
    fn json_round_trip() {
        let s = sample();
        let text = serde_json::to_string(&s).unwrap();
        let back: VcpuState = serde_json::from_str(&text).unwrap();
        assert_eq!(serde_json::to_string(&back).unwrap(), text);
        assert_eq!(back.regs, s.regs);
        assert_eq!(back.msrs[0].data, 0xdead_beef);
        match back.float {
            FloatState::Xsave(x) => assert_eq!(x.region[1023], 7),
            FloatState::Fpu(_) => panic!("xsave expected"),
        }
        assert_eq!(back.regs.rip, 0xffff_ffff_8100_0000);
    }

    #[test]
    fn fpu_round_trip() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.xmm[15][3] = 9;
        f.fpr[7][0] = 1;
        let s = FpuState::from(&f);
        let text = serde_json::to_string(&FloatState::Fpu(s.clone())).unwrap();
        let back: FloatState = serde_json::from_str(&text).unwrap();
        assert!(matches!(back, FloatState::Fpu(ref b) if *b == s));
        let k = s.to_kvm();
        assert_eq!(k.xmm[15][3], 9);
        assert_eq!(k.fpr[7][0], 1);
        assert_eq!(k.mxcsr, 0x1f80);
    }

    #[test]
    fn msr_order() {
        let mut m = vec![0x6e0, 0xc000_0080, 0x10, 0x4b56_4d00, 0x10];
        order_msrs(&mut m);
        assert_eq!(m, vec![0x10, 0x4b56_4d00, 0xc000_0080, 0x6e0]);
    }
}
