//! `vigil support-bundle`: one `.tar.gz` with what is needed to understand
//! what happened on a host after the fact: each agent directory's logs,
//! health summaries (and their rotations), cluster state and VM configs,
//! plus host facts and a fresh health record. Secrets are never included.
//!
//! Archive layout (`NAME` = `vigil-support-HOST-UNIXTIME`):
//!
//! ```text
//! NAME/MANIFEST.txt           every file included, and every file skipped with the reason
//! NAME/host/summary.txt       a health record taken now (ha::health)
//! NAME/host/{meminfo,uptime,loadavg,version}   copies of /proc files
//! NAME/agents/N-DIRNAME/...   the Nth --agent-dir, recursively
//! NAME/cluster/status.txt     with --config: `cluster status` as the agent answered (or why not)
//! ```
//!
//! Skipped: files whose name says they hold a secret (`*secret*`, `*.key`,
//! `*.pem`), sockets, FIFOs and devices, symlinks (not followed), and
//! regular files over [`MAX_FILE_BYTES`] (disk images, memory snapshots).
//! The archive is written to a temporary name and renamed at the end, so a
//! failed run leaves no partial bundle behind.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use flate2::write::GzEncoder;
use flate2::Compression;
use vmm::control::EXIT_ERROR;

use crate::cli::SupportBundleArgs;

/// The default agent directory when none is given.
pub const DEFAULT_AGENT_DIR: &str = "/var/lib/vigil";

/// Files larger than this are listed in the manifest but not copied.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// Errors making a bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An agent directory is missing or not a directory.
    #[error("agent directory {0} does not exist or is not a directory: pass the agent's state directory with --agent-dir")]
    NoAgentDir(PathBuf),
    /// The archive could not be created or written.
    #[error("cannot write the bundle {path}")]
    Write {
        /// The archive (its temporary name while being written).
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A directory could not be listed.
    #[error("cannot list {path}")]
    List {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What went in and what did not.
#[derive(Debug, Default)]
struct Manifest {
    included: Vec<(String, u64)>,
    skipped: Vec<(String, String)>,
}

fn secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("secret") || n.ends_with(".key") || n.ends_with(".pem")
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

struct Bundle<W: Write> {
    tar: tar::Builder<W>,
    root: String,
    manifest: Manifest,
    tmp: PathBuf,
}

impl<W: Write> Bundle<W> {
    fn werr(&self) -> impl FnOnce(std::io::Error) -> BundleError {
        let path = self.tmp.clone();
        move |source| BundleError::Write { path, source }
    }

    fn add_bytes(&mut self, rel: &str, data: &[u8]) -> Result<(), BundleError> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
        h.set_cksum();
        let path = format!("{}/{rel}", self.root);
        let e = self.werr();
        self.tar.append_data(&mut h, &path, data).map_err(e)?;
        self.manifest
            .included
            .push((rel.to_string(), data.len() as u64));
        Ok(())
    }

    /// Adds `dir` recursively under `rel`, skipping what the module doc says.
    fn add_dir(&mut self, dir: &Path, rel: &str) -> Result<(), BundleError> {
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
            .map_err(|source| BundleError::List {
                path: dir.to_path_buf(),
                source,
            })?
            .filter_map(Result::ok)
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = format!("{rel}/{name}");
            let Ok(ft) = e.file_type() else {
                self.manifest.skipped.push((rel, "unreadable".into()));
                continue;
            };
            if ft.is_dir() {
                self.add_dir(&e.path(), &rel)?;
            } else if ft.is_symlink() {
                self.manifest
                    .skipped
                    .push((rel, "symlink (not followed)".into()));
            } else if ft.is_socket() || ft.is_fifo() || ft.is_block_device() || ft.is_char_device()
            {
                self.manifest
                    .skipped
                    .push((rel, "socket, FIFO or device".into()));
            } else if secret_name(&name) {
                self.manifest
                    .skipped
                    .push((rel, "may hold a secret".into()));
            } else {
                let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                if size > MAX_FILE_BYTES {
                    self.manifest.skipped.push((
                        rel,
                        format!("{size} bytes, over the {MAX_FILE_BYTES}-byte limit"),
                    ));
                    continue;
                }
                // Read whole: logs are being appended to while we copy,
                // and a size that changes under tar's reader breaks it.
                match fs::read(e.path()) {
                    Ok(data) => self.add_bytes(&rel, &data)?,
                    Err(err) => self
                        .manifest
                        .skipped
                        .push((rel, format!("unreadable: {err}"))),
                }
            }
        }
        Ok(())
    }
}

/// Writes the bundle to `out` from `agent_dirs` and the generated files in
/// `extra` (`(path in the bundle, text)`, such as the cluster status an
/// agent answered with); returns the manifest text.
pub fn make_bundle(
    out: &Path,
    agent_dirs: &[PathBuf],
    extra: &[(String, String)],
) -> Result<String, BundleError> {
    for d in agent_dirs {
        if !d.is_dir() {
            return Err(BundleError::NoAgentDir(d.clone()));
        }
    }
    let host = hostname();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let root = format!("vigil-support-{host}-{ts}");
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let werr = |source| BundleError::Write {
        path: tmp.clone(),
        source,
    };
    let file = File::create(&tmp).map_err(werr)?;
    let result = (|| {
        let gz = GzEncoder::new(BufWriter::new(file), Compression::default());
        let mut b = Bundle {
            tar: tar::Builder::new(gz),
            root,
            manifest: Manifest::default(),
            tmp: tmp.clone(),
        };
        let summary = ha::health::HostSummary::collect(
            &ha::health::ProcSource::system(),
            &host,
            std::process::id(),
            &[],
            ha::health::DEFAULT_TOP,
        )
        .map(|s| s.line())
        .unwrap_or_else(|e| format!("health record unavailable: {e}"));
        b.add_bytes("host/summary.txt", format!("{summary}\n").as_bytes())?;
        for f in ["meminfo", "uptime", "loadavg", "version"] {
            match fs::read(Path::new("/proc").join(f)) {
                Ok(data) => b.add_bytes(&format!("host/{f}"), &data)?,
                Err(e) => b
                    .manifest
                    .skipped
                    .push((format!("host/{f}"), format!("unreadable: {e}"))),
            }
        }
        for (rel, text) in extra {
            b.add_bytes(rel, text.as_bytes())?;
        }
        for (i, d) in agent_dirs.iter().enumerate() {
            let name = d
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "root".into());
            b.add_dir(d, &format!("agents/{i}-{name}"))?;
        }
        let mut text = format!(
            "vigil support bundle\nhost: {host}\ncreated (unix): {ts}\nagent directories:\n"
        );
        for (i, d) in agent_dirs.iter().enumerate() {
            text.push_str(&format!("  {i}: {}\n", d.display()));
        }
        text.push_str("included:\n");
        for (p, n) in &b.manifest.included {
            text.push_str(&format!("  {p} ({n} bytes)\n"));
        }
        text.push_str("skipped:\n");
        for (p, why) in &b.manifest.skipped {
            text.push_str(&format!("  {p}: {why}\n"));
        }
        b.add_bytes("MANIFEST.txt", text.as_bytes())?;
        let gz = b.tar.into_inner().map_err(werr)?;
        let w = gz.finish().map_err(werr)?;
        let f = w.into_inner().map_err(|x| x.into_error()).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        Ok(text)
    })();
    match result {
        Ok(text) => {
            fs::rename(&tmp, out).map_err(|source| BundleError::Write {
                path: out.to_path_buf(),
                source,
            })?;
            Ok(text)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Runs `vigil support-bundle`.
pub fn support_bundle(args: SupportBundleArgs) -> i32 {
    let mut dirs = args.agent_dir;
    let mut extra = Vec::new();
    if let Some(config) = &args.config {
        // The agent's directories come from its host.toml; its cluster
        // status is included when an agent answers.
        let host = match ha::runtime::files::HostConfig::load(config) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("vigil: {e}");
                return EXIT_ERROR;
            }
        };
        dirs.push(host.run_dir.clone());
        let status = match ha::runtime::ask(&host, &ha::runtime::control::Request::Status) {
            Ok((from, v)) => format!(
                "answered by {from}\n{}\n",
                serde_json::to_string_pretty(&v).unwrap_or_default()
            ),
            Err(e) => format!("no agent answered: {e}\n"),
        };
        extra.push(("cluster/status.txt".to_string(), status));
    }
    if dirs.is_empty() {
        dirs.push(PathBuf::from(DEFAULT_AGENT_DIR));
    }
    let out = args.out.unwrap_or_else(|| {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("vigil-support-{}-{ts}.tar.gz", hostname()))
    });
    match make_bundle(&out, &dirs, &extra) {
        Ok(manifest) => {
            let skipped = manifest
                .split("skipped:\n")
                .nth(1)
                .map_or(0, |s| s.lines().count());
            println!(
                "support bundle written to {} ({} skipped; see MANIFEST.txt inside)",
                out.display(),
                skipped
            );
            0
        }
        Err(e) => {
            eprintln!("vigil: {}", crate::run::chain(&e));
            EXIT_ERROR
        }
    }
}
