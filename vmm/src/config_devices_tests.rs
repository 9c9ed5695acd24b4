//! Unit tests for the device sections of the config: disks, NICs, vsock.

use std::path::Path;

use super::*;

fn base() -> ConfigOverrides {
    ConfigOverrides {
        kernel: Some("/k".into()),
        ..Default::default()
    }
}

fn err(r: Result<VmConfig, ConfigError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn disks_from_file_and_flags() {
    let text = r#"
        id = "vm1"
        [[disks]]
        path = "a.img"
        [[disks]]
        path = "/abs/b.img"
        read_only = true
        id = "b"
    "#;
    let c = VmConfig::from_toml(text, Path::new("/cfg"), base()).unwrap();
    assert_eq!(
        c.disks,
        vec![
            DiskConfig {
                path: "/cfg/a.img".into(),
                read_only: false,
                id: "vigil-disk0".into()
            },
            DiskConfig {
                path: "/abs/b.img".into(),
                read_only: true,
                id: "b".into()
            },
        ]
    );
    let mut ov = base();
    ov.disks = vec!["path=x.img,ro,id=x".into()];
    let c = VmConfig::from_toml(text, Path::new("/cfg"), ov).unwrap();
    assert_eq!(c.disks.len(), 1, "flags replace the file's disks");
    assert_eq!(
        c.disks[0].path,
        Path::new("x.img"),
        "flag paths stay as given"
    );
    assert!(c.disks[0].read_only);

    for (bad, needle) in [
        ("ro", "no path=IMG"),
        ("path=a,rw", "`rw`"),
        ("path=a,id=this-id-is-longer-than-20", "1 to 20"),
    ] {
        let mut ov = base();
        ov.disks = vec![bad.into()];
        assert!(
            err(VmConfig::from_toml("", Path::new("/"), ov)).contains(needle),
            "{bad}"
        );
    }
    let mut ov = base();
    ov.disks = vec!["path=a,id=x".into(), "path=b,id=x".into()];
    assert!(err(VmConfig::from_toml("", Path::new("/"), ov)).contains("used by two disks"));
    let typo = "[[disks]]\npath = \"a\"\nreadonly = true\n";
    assert!(err(VmConfig::from_toml(typo, Path::new("/"), base())).contains("readonly"));
}

#[test]
fn nics_and_macs() {
    let text = r#"
        id = "vm1"
        [[nics]]
        tap = "tap0"
        mac = "52:54:00:aa:bb:cc"
        network = "Prod"
        [[nics]]
        tap = "tap1"
    "#;
    let c = VmConfig::from_toml(text, Path::new("/"), base()).unwrap();
    assert_eq!(c.nics[0].mac, [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc]);
    assert_eq!(c.nics[0].network, "Prod");
    assert_eq!(c.nics[1].network, "default");
    // The default MAC is stable, locally administered, unicast, per NIC.
    let again = VmConfig::from_toml(text, Path::new("/"), base()).unwrap();
    assert_eq!(c.nics[1].mac, again.nics[1].mac);
    assert_eq!(c.nics[1].mac[0] & 3, 2);
    assert_ne!(default_mac("vm1", 0), default_mac("vm1", 1));
    assert_ne!(default_mac("vm1", 0), default_mac("vm2", 0));

    assert!(parse_mac("52:54:00:aa:bb").is_err());
    assert!(parse_mac("52:54:00:aa:bb:zz").is_err());
    assert!(parse_mac("01:00:5e:00:00:01")
        .unwrap_err()
        .contains("multicast"));
    let mut ov = base();
    ov.nics = vec!["tap=averyveryverylongtapname".into()];
    assert!(err(VmConfig::from_toml("", Path::new("/"), ov)).contains("1 to 15"));
    let mut ov = base();
    ov.nics = vec!["mac=52:54:00:00:00:01".into()];
    assert!(err(VmConfig::from_toml("", Path::new("/"), ov)).contains("no tap=NAME"));
}

#[test]
fn vsock_section_and_flag() {
    let text = "[vsock]\ncid = 7\nsocket = \"v.sock\"\n";
    let c = VmConfig::from_toml(text, Path::new("/run"), base()).unwrap();
    assert_eq!(
        c.vsock,
        Some(VsockConfig {
            cid: 7,
            socket: "/run/v.sock".into()
        })
    );
    for (bad, needle) in [
        ("cid=2,socket=/s", "reserved"),
        ("cid=x,socket=/s", "not a number"),
        ("cid=3", "no socket=PATH"),
        ("socket=/s", "no cid=N"),
    ] {
        let mut ov = base();
        ov.vsock = Some(bad.into());
        assert!(
            err(VmConfig::from_toml("", Path::new("/"), ov)).contains(needle),
            "{bad}"
        );
    }
}
