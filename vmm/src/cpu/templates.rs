//! CPU templates as data: which CPUID bits each named template hides.
//!
//! A template is a list of [`CpuidMask`] rows (leaf, optional subleaf,
//! register, bits to clear) applied to KVM's supported CPUID. Keeping it a
//! table means a migration compatibility check can compare templates, and a
//! reviewer can read what `baseline` promises without following code paths.
//!
//! Templates only ever clear bits: a template cannot invent a feature the
//! host's KVM does not support. On this project's nested test hosts the guest
//! kernel still sees the host's CPUID (see docs), but on bare metal and for
//! migration between different hosts the template is what the guest sees.

use kvm_bindings::kvm_cpuid_entry2;

use crate::config::CpuTemplateName;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One rule: clear `clear` in `reg` of `leaf` (and `subleaf`, if given; else
/// every subleaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidMask {
    /// CPUID function (EAX input).
    pub leaf: u32,
    /// CPUID index (ECX input); `None` = all.
    pub subleaf: Option<u32>,
    /// Register the bits are in.
    pub reg: Reg,
    /// Bits to clear.
    pub clear: u32,
    /// What the bits are, for reviewers and for logs.
    pub what: &'static str,
}

const fn m(leaf: u32, subleaf: Option<u32>, reg: Reg, clear: u32, what: &'static str) -> CpuidMask {
    CpuidMask {
        leaf,
        subleaf,
        reg,
        clear,
        what,
    }
}

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// `baseline`: roughly x86-64-v2 plus AES/PCLMUL/XSAVE, the features every
/// x86-64 server of the last decade has. Hides AVX and later vector
/// extensions, TSX, protection keys, WAITPKG, SGX, AMX, virtualisation
/// extensions and vendor-specific oddities, so a guest started here can move
/// to an older host.
pub const BASELINE: &[CpuidMask] = &[
    m(0x1, None, Reg::Ecx, bits(&[3, 5, 6, 7, 8, 11, 12, 15, 18, 22, 28, 29]),
      "MONITOR VMX SMX EST TM2 SDBG FMA PDCM DCA MOVBE AVX F16C"),
    m(0x7, Some(0), Reg::Ebx, bits(&[2, 3, 4, 5, 8, 11, 12, 14, 15, 16, 17, 21, 26, 27, 28, 30, 31]),
      "SGX BMI1 HLE AVX2 BMI2 RTM PQM MPX PQE AVX512F/DQ/IFMA/PF/ER/CD/BW/VL"),
    m(0x7, Some(0), Reg::Ecx, bits(&[1, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16, 23, 27, 28, 29, 30, 31]),
      "AVX512VBMI PKU OSPKE WAITPKG AVX512VBMI2 CET_SS GFNI VAES VPCLMULQDQ AVX512VNNI/BITALG TME \
       AVX512VPOPCNTDQ LA57 KL MOVDIRI MOVDIR64B ENQCMD SGX_LC PKS"),
    m(0x7, Some(0), Reg::Edx, bits(&[2, 3, 8, 14, 16, 18, 22, 23, 24, 25]),
      "AVX512_4VNNIW/4FMAPS/VP2INTERSECT SERIALIZE TSXLDTRK PCONFIG AMX-BF16 AVX512FP16 AMX-TILE AMX-INT8"),
    m(0x7, Some(1), Reg::Eax, u32::MAX, "all leaf 7.1 features (AVX-VNNI, AVX512-BF16, ...)"),
    m(0xd, Some(0), Reg::Eax, bits(&[2, 3, 4, 5, 6, 7, 9, 17, 18]),
      "XCR0 state components AVX MPX AVX-512 PKRU AMX"),
    m(0xd, Some(1), Reg::Eax, bits(&[1, 3, 4]), "XSAVEC XSAVES XFD"),
    m(0x8000_0001, None, Reg::Ecx, bits(&[2, 5, 6, 11, 16, 21]), "SVM LZCNT SSE4A XOP FMA4 TBM"),
];

/// `host`: everything KVM supports, nothing hidden.
pub const HOST: &[CpuidMask] = &[];

/// The mask table for a template name.
pub fn template(name: CpuTemplateName) -> &'static [CpuidMask] {
    match name {
        CpuTemplateName::Baseline => BASELINE,
        CpuTemplateName::Host => HOST,
    }
}

fn reg_mut(e: &mut kvm_cpuid_entry2, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Applies a template's masks to CPUID entries in place.
pub fn apply(entries: &mut [kvm_cpuid_entry2], masks: &[CpuidMask]) {
    for e in entries.iter_mut() {
        let (leaf, index) = (e.function, e.index);
        for rule in masks
            .iter()
            .filter(|r| r.leaf == leaf && r.subleaf.is_none_or(|s| s == index))
        {
            *reg_mut(e, rule.reg) &= !rule.clear;
        }
    }
}
