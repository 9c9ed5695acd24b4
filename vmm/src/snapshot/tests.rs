//! Format tests: versioning, corruption, consistency, round trip.

use super::*;
use crate::vm::VmKvmState;

fn sample_state() -> VmState {
    VmState {
        format_version: FORMAT_VERSION,
        vigil_version: "test".into(),
        config: SavedConfig {
            name: "t".into(),
            id: "t".into(),
            vcpus: 1,
            memory_bytes: 8 << 20,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            cpu_template: CpuTemplateName::Baseline,
            on_reboot: OnReboot::Exit,
        },
        vcpus: vec![{
            let mut v = crate::cpu::state::tests::sample();
            v.id = 0;
            v
        }],
        vm: VmKvmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: kvm_bindings::kvm_clock_data {
                clock: 123_456,
                ..Default::default()
            },
        },
        devices: DeviceStates::default(),
        memory: vec![RegionInfo {
            guest_addr: 0,
            size: 8 << 20,
            file_offset: 0,
        }],
    }
}

fn encode(s: &VmState) -> Vec<u8> {
    let mut v = Vec::new();
    s.to_writer(&mut v).unwrap();
    v
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vigil-snaptest-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn round_trip() {
    let s = sample_state();
    let bytes = encode(&s);
    assert!(bytes.starts_with(b"{\"format_version\":1,"));
    let back = VmState::from_slice(&bytes, Path::new("x")).unwrap();
    assert_eq!(back.config, s.config);
    assert_eq!(back.vm.clock.clock, 123_456);
    assert_eq!(back.vcpus[0].regs, s.vcpus[0].regs);
    assert_eq!(encode(&back), bytes);
}

#[test]
fn newer_version_refused_naming_both() {
    let mut s = sample_state();
    s.format_version = FORMAT_VERSION + 1;
    let e = VmState::from_slice(&encode(&s), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "snapshot format 2 was written by a newer vigil; this vigil reads format 1: upgrade vigil \
         or take a new snapshot"
    );
}

#[test]
fn older_version_refused_naming_both() {
    // An old format may not even have today's fields: only the version is
    // looked at.
    let e = VmState::from_slice(br#"{"format_version":0,"whatever":[]}"#, Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("format 0") && e.contains("reads format 1"),
        "{e}"
    );
}

#[test]
fn truncated_and_garbage_refused() {
    let bytes = encode(&sample_state());
    for cut in [10, bytes.len() / 2, bytes.len() - 1] {
        let e = VmState::from_slice(&bytes[..cut], Path::new("/s/state.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("snapshot state file /s/state.json is corrupt or truncated"),
            "{e}"
        );
    }
    let e = VmState::from_slice(b"\x00\xffnot json", Path::new("f"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt or truncated"), "{e}");
}

#[test]
fn inconsistent_refused() {
    let mut s = sample_state();
    s.config.vcpus = 2;
    let e = VmState::from_slice(&encode(&s), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 vCPUs but 1"), "{e}");
    let mut s = sample_state();
    s.memory[0].size = 4 << 20;
    let e = VmState::from_slice(&encode(&s), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("region table"), "{e}");
}

#[test]
fn load_from_dir() {
    let d = tmpdir("load");
    let e = load(&d).unwrap_err().to_string();
    assert!(e.contains("is not a vigil snapshot"), "{e}");
    fs::write(d.join(STATE_FILE), encode(&sample_state())).unwrap();
    assert_eq!(load(&d).unwrap().config.name, "t");
    fs::write(d.join(STATE_FILE), b"{\"format_version\":1,\"vigil_ver").unwrap();
    assert!(load(&d).unwrap_err().to_string().contains("truncated"));
    fs::remove_dir_all(&d).unwrap();
}

#[test]
fn vms_with_virtio_devices_are_refused_by_name() {
    let mut cfg = sample_state()
        .config
        .to_config(&RestoreOverrides::default());
    assert!(check_devices(&cfg).is_ok(), "no devices: nothing to refuse");
    cfg.disks.push(crate::config::DiskConfig {
        path: "/srv/ds1/vm1.img".into(),
        read_only: false,
        id: "vm1".into(),
    });
    let e = check_devices(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("cannot snapshot VM t") && e.contains("disk /srv/ds1/vm1.img"),
        "{e}"
    );
}
