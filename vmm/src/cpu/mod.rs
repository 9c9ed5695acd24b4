//! vCPUs: CPUID shaping (template + per-vCPU topology), boot register state,
//! and the run loop on one thread per vCPU.
//!
//! CPUID for each vCPU is computed as: KVM's supported CPUID ->
//! the named template's masks ([`templates`]) -> per-vCPU fix-ups (APIC ID,
//! topology, hypervisor bit). The KVM paravirtual leaves (0x4000_0000..) that
//! KVM reports are kept, so the guest finds kvmclock.

pub mod gate;
pub mod regs;
pub mod state;
pub mod templates;
pub mod vcpu;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::config::CpuTemplateName;

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 1 ECX: TSC deadline timer, which KVM's in-kernel LAPIC emulates even
/// when the host's supported CPUID does not say so.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0xB/0x1F level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Errors preparing CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read KVM's supported CPUID: {0}")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// Building the CPUID list failed (too many entries).
    #[error("cannot build the CPUID table: {0:?}")]
    Build(vmm_sys_util::fam::Error),
}

/// Number of bits needed to hold IDs `0..n` (ceil(log2(n))).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// The CPUID a vCPU sees: `supported` passed through `template`, fixed up
/// for vCPU `id` of `count` (one package, one thread per core, APIC ID = id).
pub fn vcpu_cpuid(
    supported: &CpuId,
    template: CpuTemplateName,
    id: u32,
    count: u32,
) -> Result<CpuId, CpuError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    templates::apply(&mut entries, templates::template(template));
    ensure_topology_subleaves(&mut entries);
    for e in entries.iter_mut() {
        fixup_entry(e, id, count);
    }
    CpuId::from_entries(&entries).map_err(CpuError::Build)
}

/// Makes sure the extended topology leaves (0xB, and 0x1F when reported)
/// have the SMT, core and terminating subleaves. Some hosts report only
/// subleaf 0; a guest then sees no core level, derives a package ID from
/// each APIC ID and believes every vCPU is its own socket.
fn ensure_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    for leaf in [0xb, 0x1f] {
        let Some(template) = entries.iter().find(|e| e.function == leaf).copied() else {
            continue;
        };
        for index in 0..3 {
            if !entries
                .iter()
                .any(|e| e.function == leaf && e.index == index)
            {
                entries.push(kvm_cpuid_entry2 {
                    index,
                    flags: template.flags | kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..template
                });
            }
        }
    }
}

fn fixup_entry(e: &mut kvm_cpuid_entry2, id: u32, count: u32) {
    match e.function {
        0x1 => {
            // EBX: [31:24] initial APIC ID, [23:16] logical processors,
            // [15:8] CLFLUSH size (kept).
            e.ebx = (id << 24) | ((count & 0xff) << 16) | (e.ebx & 0xffff);
            e.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
            if count > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: [31:26] cores per package - 1,
            // [25:14] logical processors sharing this cache - 1: L1/L2 per
            // core, L3 shared by the whole package.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { count - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (1 thread), level 1 = core
            // (count cores), further levels invalid. EDX = x2APIC ID.
            let (eax, ebx, ecx) = match e.index {
                0 => (0, 1, (LEVEL_TYPE_SMT << 8) | e.index),
                1 => (id_bits(count), count, (LEVEL_TYPE_CORE << 8) | e.index),
                _ => (0, 0, e.index),
            };
            e.eax = eax;
            e.ebx = ebx;
            e.ecx = ecx;
            e.edx = id;
        }
        0x8000_0008 => {
            // AMD: ECX[7:0] = number of cores - 1, [15:12] APIC ID size.
            e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | (id_bits(count) << 12);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    fn synthetic() -> CpuId {
        CpuId::from_entries(&[
            entry(0x0, 0, [0x1f, 0, 0, 0]),
            entry(0x1, 0, [0x906ea, 0x0010_0800, !(1 << 31), u32::MAX]),
            entry(0x4, 0, [0x1c00_4121, 0, 0, 0]),
            entry(0x4, 3, [0x1c00_4163, 0, 0, 0]),
            entry(0x7, 0, [0, u32::MAX, u32::MAX, u32::MAX]),
            entry(0x7, 1, [u32::MAX, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [4, 8, 0x201, 7]),
            entry(0xb, 2, [0, 0, 2, 7]),
            entry(0xd, 0, [0x2ff, 0, 0, 0]),
            entry(0x4000_0000, 0, [0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d]),
            entry(0x4000_0001, 0, [0x0100_7afb, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, u32::MAX, u32::MAX]),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn baseline_hides_avx512_tsx_pku_waitpkg() {
        let c = vcpu_cpuid(&synthetic(), CpuTemplateName::Baseline, 0, 1).unwrap();
        let l7 = find(&c, 7, 0);
        assert_eq!(l7.ebx & (1 << 16), 0, "AVX512F");
        assert_eq!(l7.ebx & (1 << 11), 0, "RTM");
        assert_eq!(l7.ebx & (1 << 4), 0, "HLE");
        assert_eq!(l7.ebx & (1 << 5), 0, "AVX2");
        assert_eq!(l7.ecx & (1 << 3), 0, "PKU");
        assert_eq!(l7.ecx & (1 << 5), 0, "WAITPKG");
        // Kept: FSGSBASE (bit 0), ERMS (bit 9).
        assert_ne!(l7.ebx & 1, 0);
        assert_ne!(l7.ebx & (1 << 9), 0);
        assert_eq!(find(&c, 7, 1).eax, 0);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ecx & (1 << 28), 0, "AVX");
        assert_ne!(l1.ecx & (1 << 23), 0, "POPCNT kept");
        assert_ne!(l1.ecx & (1 << 20), 0, "SSE4.2 kept");
        assert_eq!(find(&c, 0xd, 0).eax & (1 << 2), 0, "AVX state");
        assert_ne!(find(&c, 0xd, 0).eax & 3, 0, "x87/SSE state kept");
        assert_eq!(find(&c, 0x8000_0001, 0).ecx & (1 << 2), 0, "SVM");
    }

    #[test]
    fn host_template_keeps_everything() {
        let c = vcpu_cpuid(&synthetic(), CpuTemplateName::Host, 0, 1).unwrap();
        assert_eq!(find(&c, 7, 0).ebx, u32::MAX);
        assert_eq!(find(&c, 7, 1).eax, u32::MAX);
    }

    #[test]
    fn template_masks_only_their_subleaf() {
        let mut e = vec![entry(0xd, 0, [u32::MAX; 4]), entry(0xd, 1, [u32::MAX; 4])];
        templates::apply(
            &mut e,
            &[templates::CpuidMask {
                leaf: 0xd,
                subleaf: Some(1),
                reg: templates::Reg::Eax,
                clear: 1,
                what: "test",
            }],
        );
        assert_eq!(e[0].eax, u32::MAX);
        assert_eq!(e[1].eax, u32::MAX - 1);
    }

    #[test]
    fn per_vcpu_topology() {
        let c = vcpu_cpuid(&synthetic(), CpuTemplateName::Baseline, 2, 3).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical count");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let smt = find(&c, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
        let inv = find(&c, 0xb, 2);
        assert_eq!((inv.eax, inv.ebx, inv.ecx & 0xff00, inv.edx), (0, 0, 0, 2));
        assert_eq!(find(&c, 4, 0).eax >> 26, 2, "cores - 1");
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 2, "L3 shared by 3");
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0, "L1 per core");
        // KVM paravirt leaves survive untouched.
        assert_eq!(find(&c, 0x4000_0000, 0).ebx, 0x4b4d564b);
        assert_eq!(find(&c, 0x4000_0001, 0).eax, 0x0100_7afb);
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        let only_sub0 = CpuId::from_entries(&[
            entry(0x0, 0, [0xb, 0, 0, 0]),
            entry(0xb, 0, [1, 1, 0x100, 0]),
        ])
        .unwrap();
        let c = vcpu_cpuid(&only_sub0, CpuTemplateName::Host, 1, 2).unwrap();
        let core = find(&c, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (1, 2, 0x201, 1));
        assert_eq!(find(&c, 0xb, 2).ecx & 0xff00, 0, "terminator");
        assert!(
            c.as_slice().iter().all(|e| e.function != 0x1f),
            "no 0x1f invented"
        );
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let c = vcpu_cpuid(&synthetic(), CpuTemplateName::Host, 0, 1).unwrap();
        assert_eq!(find(&c, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn id_bits_values() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
