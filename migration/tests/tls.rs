//! Migration over TLS with mutual authentication: certificates from a
//! cluster CA made here with rcgen; a peer from another CA gets nothing.

mod common;

use common::*;
use migration::transport::{accept_tls, client_config, connect_tls, server_config, TlsFiles};
use migration::{CancelToken, SourceOptions, Stage, TargetOptions};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// Writes cert, key and CA PEM files for `host` under `dir`.
fn host_files(dir: &Path, ca: &Ca, host: &str) -> TlsFiles {
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca.params, &ca.key);
    let cert = CertificateParams::new(vec![host.to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let f = TlsFiles {
        cert: dir.join(format!("{host}.crt")),
        key: dir.join(format!("{host}.key")),
        ca: dir.join(format!("{host}-ca.crt")),
    };
    std::fs::write(&f.cert, cert.pem()).unwrap();
    std::fs::write(&f.key, key.serialize_pem()).unwrap();
    std::fs::write(&f.ca, &ca.pem).unwrap();
    f
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vigil-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn migration_over_mutual_tls_is_intact() {
    let dir = tempdir("ok");
    let cluster = ca();
    let a = host_files(&dir, &cluster, "host-a");
    let b = host_files(&dir, &cluster, "host-b");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut host = FakeHost::new();
    let seen = host.seen.clone();
    let scfg = server_config(&b).unwrap();
    let tgt = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let tls = accept_tls(s, scfg).unwrap();
        migration::receive(
            &mut host,
            tls,
            &TargetOptions::default(),
            &CancelToken::new(),
        )
        .map(|_| ())
    });
    let tls = connect_tls(
        TcpStream::connect(addr).unwrap(),
        "host-b",
        client_config(&a).unwrap(),
    )
    .unwrap();
    let mut vm = FakeVm::new(VmSpec {
        mib: 16,
        rate: 10_000,
        hot_pages: 1024,
    });
    let r = migration::migrate(
        &mut vm,
        tls,
        &SourceOptions::default(),
        &CancelToken::new(),
        &mut |_| {},
    );
    r.unwrap_or_else(|e| panic!("{}", e.report()));
    tgt.join().unwrap().unwrap();
    let s = seen.lock().unwrap();
    assert!(s.started);
    assert_eq!(vm.memory_at_pause().as_ref(), s.memory.as_ref());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn client_from_another_ca_gets_nothing() {
    let dir = tempdir("rogue-client");
    let cluster = ca();
    let rogue = ca();
    let mallory = host_files(&dir, &rogue, "host-a");
    // Mallory trusts the cluster CA, so she would accept the target.
    std::fs::write(&mallory.ca, &cluster.pem).unwrap();
    let b = host_files(&dir, &cluster, "host-b");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let scfg = server_config(&b).unwrap();
    let tgt = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        accept_tls(s, scfg).map(|_| ())
    });
    let sock = TcpStream::connect(addr).unwrap();
    // TLS 1.3: the client may finish its side before the server checks its
    // certificate; then the refusal arrives on the first read.
    let result = connect_tls(sock, "host-b", client_config(&mallory).unwrap()).map(|tls| {
        let mut vm = FakeVm::new(VmSpec {
            mib: 8,
            rate: 0,
            hot_pages: 1,
        });
        let opts = SourceOptions {
            reply_timeout: Duration::from_secs(5),
            ..Default::default()
        };
        migration::migrate(&mut vm, tls, &opts, &CancelToken::new(), &mut |_| {})
    });
    match result {
        Err(e) => println!("client refused at handshake: {e}"),
        Ok(Err(f)) => {
            assert_eq!(f.stage, Stage::Connect, "{}", f.report());
            println!("client refused at first read: {}", f.report());
        }
        Ok(Ok(_)) => panic!("rogue client migrated"),
    }
    let e = tgt.join().unwrap().unwrap_err();
    println!("target: {}", migration::error_chain(&e));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn target_from_another_ca_is_refused() {
    let dir = tempdir("rogue-server");
    let cluster = ca();
    let rogue = ca();
    let a = host_files(&dir, &cluster, "host-a");
    let fake_b = host_files(&dir, &rogue, "host-b");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let scfg = server_config(&fake_b).unwrap();
    let tgt = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        accept_tls(s, scfg).map(|_| ())
    });
    let e = connect_tls(
        TcpStream::connect(addr).unwrap(),
        "host-b",
        client_config(&a).unwrap(),
    )
    .unwrap_err();
    assert!(
        migration::error_chain(&e).contains("TLS handshake with host-b failed"),
        "{e}"
    );
    assert!(tgt.join().unwrap().is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn wrong_host_name_is_refused() {
    let dir = tempdir("name");
    let cluster = ca();
    let a = host_files(&dir, &cluster, "host-a");
    let c = host_files(&dir, &cluster, "host-c");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let scfg = server_config(&c).unwrap();
    let tgt = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        accept_tls(s, scfg).map(|_| ())
    });
    // We dialled host-b but host-c answered.
    let e = connect_tls(
        TcpStream::connect(addr).unwrap(),
        "host-b",
        client_config(&a).unwrap(),
    )
    .unwrap_err();
    println!("{}", migration::error_chain(&e));
    assert!(tgt.join().unwrap().is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn missing_files_are_named() {
    let f = TlsFiles {
        cert: "/nonexistent/host-a.crt".into(),
        key: "/nonexistent/host-a.key".into(),
        ca: "/nonexistent/ca.crt".into(),
    };
    let e = client_config(&f).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.crt"), "{e}");
}
