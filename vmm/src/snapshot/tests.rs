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
            disks: Vec::new(),
            nics: Vec::new(),
            vsock: None,
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
    assert!(bytes.starts_with(b"{\"format_version\":2,"));
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
        "snapshot format 3 was written by a newer vigil; this vigil reads formats 1 to 2: upgrade \
         vigil or take a new snapshot"
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
        e.contains("format 0") && e.contains("reads formats 1 to 2 only"),
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
fn format_1_snapshots_still_load_without_devices() {
    // Format 1 had no device fields: they default to none.
    let mut v: serde_json::Value = serde_json::from_slice(&encode(&sample_state())).unwrap();
    v["format_version"] = 1.into();
    for k in ["disks", "nics", "vsock"] {
        v["config"].as_object_mut().unwrap().remove(k);
    }
    v["devices"].as_object_mut().unwrap().remove("virtio");
    let s = VmState::from_slice(v.to_string().as_bytes(), Path::new("x")).unwrap();
    assert!(s.devices.virtio.is_empty() && s.config.disks.is_empty());
    let cfg = s.config.to_config(&RestoreOverrides::default()).unwrap();
    assert!(cfg.disks.is_empty() && cfg.nics.is_empty() && cfg.vsock.is_none());
}

fn config_with_devices() -> VmConfig {
    let mut cfg = sample_state()
        .config
        .to_config(&RestoreOverrides::default())
        .unwrap();
    cfg.disks.push(crate::config::DiskConfig {
        path: "/srv/ds1/vm1.img".into(),
        read_only: true,
        id: "vm1".into(),
    });
    cfg.nics.push(crate::config::NicConfig {
        tap: "vdstap0".into(),
        mac: [0x52, 0x54, 0, 1, 2, 3],
        network: "lab".into(),
    });
    cfg.vsock = Some(crate::config::VsockConfig {
        cid: 7,
        socket: "/run/vm1.vsock".into(),
    });
    cfg
}

#[test]
fn saved_config_keeps_the_devices_and_applies_overrides() {
    let cfg = config_with_devices();
    let saved = SavedConfig::from_config(&cfg);
    let back = saved.to_config(&RestoreOverrides::default()).unwrap();
    assert_eq!(back.disks, cfg.disks);
    assert_eq!(back.nics, cfg.nics);
    assert_eq!(back.vsock, cfg.vsock);
    let ov = RestoreOverrides {
        taps: vec!["vdstap9".into()],
        vsock_socket: Some("/run/elsewhere.vsock".into()),
        ..Default::default()
    };
    let moved = saved.to_config(&ov).unwrap();
    assert_eq!(moved.nics[0].tap, "vdstap9");
    assert_eq!(moved.nics[0].mac, cfg.nics[0].mac, "the MAC is the guest's");
    assert_eq!(
        moved.vsock.unwrap().socket,
        PathBuf::from("/run/elsewhere.vsock")
    );
    let too_many = RestoreOverrides {
        taps: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let e = saved.to_config(&too_many).unwrap_err().to_string();
    assert_eq!(e, "2 tap name(s) given but the snapshot's VM has 1 NIC(s)");
    let none = sample_state().config;
    let e = none
        .to_config(&RestoreOverrides {
            vsock_socket: Some("/x".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no vsock device"), "{e}");
}

#[test]
fn device_states_must_match_the_saved_config() {
    let mut s = sample_state();
    s.config = SavedConfig::from_config(&config_with_devices());
    let e = VmState::from_slice(&encode(&s), Path::new("x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "config lists 1 disk(s), 1 NIC(s), 1 vsock but device states are saved for 0, 0, 0"
        ),
        "{e}"
    );
}
