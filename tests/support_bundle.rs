//! `vigil support-bundle`: the real binary on a made-up agent directory;
//! the test opens the archive and checks what is in it and what is not.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

mod common;

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmp(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("vhp-bundle-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// Archive path -> contents.
fn read_bundle(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(p).unwrap());
    let mut ar = tar::Archive::new(gz);
    let mut out = BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().into_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.insert(path, data);
    }
    out
}

#[test]
fn bundle_holds_logs_summaries_state_and_configs_but_no_secrets() {
    let d = tmp("ok");
    let agent = d.0.join("agent-h1");
    std::fs::create_dir_all(agent.join("vms")).unwrap();
    std::fs::write(agent.join("agent.log"), "INFO HA state change to=master\n").unwrap();
    std::fs::write(agent.join("summary.log"), "t=1 host=h1 vms_running=2\n").unwrap();
    std::fs::write(agent.join("summary.log.1"), "t=0 host=h1 vms_running=1\n").unwrap();
    std::fs::write(agent.join("cluster.json"), r#"{"hosts":{}}"#).unwrap();
    std::fs::write(agent.join("vms/vm-a.toml"), "name = \"vm-a\"\n").unwrap();
    std::fs::write(agent.join("cluster.secret"), "TOP-SECRET-KEY").unwrap();
    std::fs::write(agent.join("tls.key"), "PRIVATE").unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(agent.join("api.sock")).unwrap();
    let second = d.0.join("agent-h2");
    std::fs::create_dir_all(&second).unwrap();
    std::fs::write(second.join("agent.log"), "INFO slave\n").unwrap();
    let out = d.0.join("bundle.tar.gz");

    let o = common::vigil(
        &[
            "support-bundle",
            "--out",
            out.to_str().unwrap(),
            "--agent-dir",
            agent.to_str().unwrap(),
            "--agent-dir",
            second.to_str().unwrap(),
        ],
        common::QUICK_TIMEOUT,
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("support bundle written to"), "{o:?}");
    assert!(!d.0.join("bundle.tar.gz.partial").exists());

    let b = read_bundle(&out);
    let root = b
        .keys()
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    assert!(root.starts_with("vigil-support-"), "{root}");
    let get = |rel: &str| -> String {
        let k = format!("{root}/{rel}");
        String::from_utf8(
            b.get(&k)
                .unwrap_or_else(|| panic!("{k} missing: {:?}", b.keys()))
                .clone(),
        )
        .unwrap()
    };
    assert_eq!(
        get("agents/0-agent-h1/agent.log"),
        "INFO HA state change to=master\n"
    );
    assert!(get("agents/0-agent-h1/summary.log").contains("vms_running=2"));
    assert!(get("agents/0-agent-h1/summary.log.1").contains("vms_running=1"));
    assert_eq!(get("agents/0-agent-h1/cluster.json"), r#"{"hosts":{}}"#);
    assert_eq!(get("agents/0-agent-h1/vms/vm-a.toml"), "name = \"vm-a\"\n");
    assert_eq!(get("agents/1-agent-h2/agent.log"), "INFO slave\n");
    assert!(get("host/meminfo").contains("MemTotal:"));
    let summary = get("host/summary.txt");
    assert!(
        summary.contains("mem_total_mib=") && summary.contains("top_rss_kib="),
        "{summary}"
    );
    // No secret anywhere, in any file.
    for (k, v) in &b {
        assert!(!k.contains("secret") && !k.ends_with(".key"), "{k}");
        let text = String::from_utf8_lossy(v);
        assert!(
            !text.contains("TOP-SECRET-KEY") && !text.contains("PRIVATE"),
            "{k}"
        );
    }
    let manifest = get("MANIFEST.txt");
    for line in [
        "agents/0-agent-h1/cluster.secret: may hold a secret",
        "agents/0-agent-h1/tls.key: may hold a secret",
        "agents/0-agent-h1/api.sock: socket, FIFO or device",
        "agents/0-agent-h1/vms/vm-a.toml (14 bytes)",
    ] {
        assert!(manifest.contains(line), "{line:?} not in\n{manifest}");
    }
}

#[test]
fn bad_inputs_are_precise_errors_and_leave_no_file() {
    let d = tmp("bad");
    let out = d.0.join("b.tar.gz");
    let o = common::vigil(
        &[
            "support-bundle",
            "--out",
            out.to_str().unwrap(),
            "--agent-dir",
            "/nonexistent-vhp-agent",
        ],
        common::QUICK_TIMEOUT,
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr.contains(
            "agent directory /nonexistent-vhp-agent does not exist or is not a directory"
        ),
        "{o:?}"
    );
    assert!(!out.exists());
    let o = common::vigil(
        &[
            "support-bundle",
            "--out",
            "/nonexistent-vhp-dir/b.tar.gz",
            "--agent-dir",
            d.0.to_str().unwrap(),
        ],
        common::QUICK_TIMEOUT,
    );
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(
        o.stderr
            .contains("cannot write the bundle /nonexistent-vhp-dir/b.tar.gz.partial"),
        "{o:?}"
    );
}
