//! Unit tests for config parsing, overrides and validation.

use super::*;

fn base() -> ConfigOverrides {
    ConfigOverrides {
        kernel: Some("/k".into()),
        ..Default::default()
    }
}

#[test]
fn sizes() {
    assert_eq!(parse_size("512M").unwrap(), 512 << 20);
    assert_eq!(parse_size("2G").unwrap(), 2 << 30);
    assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
    assert_eq!(parse_size("1024").unwrap(), 1024 << 20);
    assert_eq!(parse_size("1048576K").unwrap(), 1 << 30);
    assert_eq!(parse_size("1t").unwrap(), 1 << 40);
    assert_eq!(parse_size("1048576B").unwrap(), 1 << 20);
    assert!(parse_size("").is_err());
    assert!(parse_size("M").is_err());
    assert!(parse_size("12X").unwrap_err().contains("unknown unit"));
    assert!(parse_size("1500K")
        .unwrap_err()
        .contains("whole number of MiB"));
    assert!(parse_size("99999999999999999999").is_err());
    assert!(parse_size("99999999999T")
        .unwrap_err()
        .contains("too large"));
}

#[test]
fn console_modes() {
    assert_eq!(ConsoleMode::parse("stdio").unwrap(), ConsoleMode::Stdio);
    assert_eq!(ConsoleMode::parse("none").unwrap(), ConsoleMode::None);
    assert_eq!(
        ConsoleMode::parse("file:/tmp/x").unwrap(),
        ConsoleMode::File("/tmp/x".into())
    );
    assert!(ConsoleMode::parse("file:").is_err());
    assert!(ConsoleMode::parse("tty").is_err());
}

#[test]
fn defaults_from_flags_only() {
    let c = VmConfig::load(None, base()).unwrap();
    assert_eq!(c.vcpus, 1);
    assert_eq!(c.memory_bytes, DEFAULT_MEMORY_BYTES);
    assert_eq!(c.name, "vigil");
    assert_eq!(c.id, "vigil");
    assert_eq!(c.cpu_template, CpuTemplateName::Baseline);
    assert_eq!(c.on_reboot, OnReboot::Exit);
    assert_eq!(c.console, ConsoleMode::Stdio);
    assert_eq!(c.cmdline, DEFAULT_CMDLINE);
}

#[test]
fn missing_kernel() {
    let e = VmConfig::load(None, ConfigOverrides::default()).unwrap_err();
    assert!(e.to_string().contains("missing kernel"), "{e}");
}

#[test]
fn file_fields_and_relative_paths() {
    let t = r#"
        name = "web1"
        id = "0001"
        vcpus = 2
        memory = "1G"
        kernel = "out/vmlinux"
        initrd = "/abs/initrd"
        cmdline = "console=ttyS0"
        cpu_template = "host"
        console = "file:logs/console.txt"
        on_reboot = "restart"
    "#;
    let c = VmConfig::from_toml(t, Path::new("/cfg"), ConfigOverrides::default()).unwrap();
    assert_eq!(c.name, "web1");
    assert_eq!(c.id, "0001");
    assert_eq!(c.vcpus, 2);
    assert_eq!(c.memory_bytes, 1 << 30);
    assert_eq!(c.kernel, PathBuf::from("/cfg/out/vmlinux"));
    assert_eq!(c.initrd, Some(PathBuf::from("/abs/initrd")));
    assert_eq!(c.cpu_template, CpuTemplateName::Host);
    assert_eq!(c.console, ConsoleMode::File("/cfg/logs/console.txt".into()));
    assert_eq!(c.on_reboot, OnReboot::Restart);
}

#[test]
fn flags_override_file() {
    let t = "vcpus = 2\nmemory = 512\nkernel = \"k\"\ncmdline = \"a\"\n";
    let ov = ConfigOverrides {
        vcpus: Some(4),
        memory: Some("2G".into()),
        kernel: Some("rel/k2".into()),
        cmdline: Some("b".into()),
        console: Some("none".into()),
        cpu_template: Some(CpuTemplateName::Host),
        ..Default::default()
    };
    let c = VmConfig::from_toml(t, Path::new("/cfg"), ov).unwrap();
    assert_eq!(c.vcpus, 4);
    assert_eq!(c.memory_bytes, 2 << 30);
    // A path from the command line stays relative to the current directory.
    assert_eq!(c.kernel, PathBuf::from("rel/k2"));
    assert_eq!(c.cmdline, "b");
    assert_eq!(c.console, ConsoleMode::None);
    assert_eq!(c.cpu_template, CpuTemplateName::Host);
}

#[test]
fn memory_as_integer_is_mib() {
    let c = VmConfig::from_toml("memory = 512\nkernel=\"k\"", Path::new("/"), base()).unwrap();
    assert_eq!(c.memory_bytes, 512 << 20);
}

#[test]
fn unknown_field_is_named() {
    let e = VmConfig::from_toml("vcpu = 2\nkernel=\"k\"", Path::new("/"), base()).unwrap_err();
    let msg = format!("{e}: {}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("unknown field `vcpu`"), "{msg}");
}

#[test]
fn wrong_type_is_named() {
    let e = VmConfig::from_toml("vcpus = \"two\"", Path::new("/"), base()).unwrap_err();
    let msg = format!("{}", std::error::Error::source(&e).unwrap());
    assert!(msg.contains("vcpus"), "{msg}");
}

#[test]
fn invalid_values_name_the_field() {
    let cases: &[(&str, &str)] = &[
        ("vcpus = 0", "vcpus"),
        ("vcpus = 1000", "vcpus"),
        ("memory = 4", "memory"),
        ("memory = \"8X\"", "memory"),
        ("memory = 99999999", "memory"),
        ("cpu_template = \"fast\"", "cpu_template"),
        ("console = \"tty\"", "console"),
        ("on_reboot = \"maybe\"", "on_reboot"),
        ("name = \"a b\"", "name"),
        ("cmdline = \"a\\u0007b\"", "cmdline"),
    ];
    for (text, field) in cases {
        let e = VmConfig::from_toml(text, Path::new("/"), base()).unwrap_err();
        let mut msg = e.to_string();
        if let Some(s) = std::error::Error::source(&e) {
            msg.push_str(&s.to_string());
        }
        assert!(msg.contains(field), "{text}: {msg}");
    }
}

#[test]
fn overrides_are_validated_too() {
    let ov = ConfigOverrides {
        vcpus: Some(0),
        ..base()
    };
    let e = VmConfig::load(None, ov).unwrap_err();
    assert!(e.to_string().contains("--cpus"), "{e}");
    let ov = ConfigOverrides {
        memory: Some("1K".into()),
        ..base()
    };
    let e = VmConfig::load(None, ov).unwrap_err();
    assert!(e.to_string().contains("--memory"), "{e}");
}

#[test]
fn unreadable_file() {
    let e = VmConfig::load(Some(Path::new("/nonexistent/vm.toml")), base()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/vm.toml"), "{e}");
}
