//! Datastore I/O for the agent's actions: heartbeat records, the protected
//! list, lease records and lease acquisition (layout in `files.rs`).

use super::files::{vm_dir, write_json};
use crate::agent::{DsRecord, ProtectedList};
use crate::lease::LeaseRecord;
use crate::types::HostId;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// This host's heartbeat record file on a datastore.
pub fn heartbeat_path(ds: &Path, host: &HostId) -> PathBuf {
    ds.join(".vigil/hb").join(format!("{host}.json"))
}

/// Writes a heartbeat record.
pub fn write_heartbeat(ds: &Path, rec: &DsRecord) -> Result<(), String> {
    write_json(&heartbeat_path(ds, &rec.host), rec).map_err(|e| e.to_string())
}

/// Reads every host's heartbeat record on a datastore. A datastore whose
/// heartbeat directory cannot be listed is an error (unreachable), one
/// unreadable record is skipped.
pub fn read_heartbeats(ds: &Path) -> Result<Vec<DsRecord>, String> {
    let dir = ds.join(".vigil/hb");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        match std::fs::read(&p) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => out.push(r),
                Err(error) => {
                    tracing::warn!(file = %p.display(), %error, "corrupt heartbeat record")
                }
            },
            Err(error) => return Err(format!("{}: {error}", p.display())),
        }
    }
    Ok(out)
}

fn protected_path(ds: &Path) -> PathBuf {
    ds.join(".vigil/protected.json")
}

/// Writes the protected list.
pub fn write_protected(ds: &Path, list: &ProtectedList) -> Result<(), String> {
    write_json(&protected_path(ds), list).map_err(|e| e.to_string())
}

/// Reads the protected list (`Ok(None)`: none yet).
pub fn read_protected(ds: &Path) -> Result<Option<ProtectedList>, String> {
    let p = protected_path(ds);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| format!("{}: {e}", p.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", p.display())),
    }
}

/// The lease record file of a VM.
pub fn lease_path(ds: &Path, vm: &str) -> PathBuf {
    vm_dir(ds, vm).join("lease")
}

/// Reads a VM's lease record (`Ok(None)`: never acquired).
pub fn read_lease(ds: &Path, vm: &str) -> Result<Option<LeaseRecord>, String> {
    let p = lease_path(ds, vm);
    if !vm_dir(ds, vm).exists() {
        // A missing VM directory is a datastore we cannot see, not a free lease.
        return Err(format!("{} is missing", vm_dir(ds, vm).display()));
    }
    let rec = vmm::lease::read_record(&p)?;
    Ok(rec.map(|r| LeaseRecord {
        owner: r.owner.map(HostId::new),
        generation: r.generation,
        counter: r.counter,
    }))
}

/// Acquires generation `rec.generation + 1` for `me`: creates the claim file
/// for that generation exclusively (so two hosts racing for the same free
/// lease cannot both win), then writes the record. Returns the new record.
pub fn acquire_lease(
    ds: &Path,
    vm: &str,
    prev: &LeaseRecord,
    me: &HostId,
) -> Result<LeaseRecord, String> {
    let new = prev.acquired_by(me);
    let claim = vm_dir(ds, vm).join(format!("lease.claim.{}", new.generation));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&claim)
    {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(format!(
                "another host acquired generation {} of the lease first",
                new.generation
            ))
        }
        Err(e) => return Err(format!("{}: {e}", claim.display())),
    }
    let _ = std::fs::write(&claim, me.as_str());
    write_lease(ds, vm, &new)?;
    Ok(new)
}

/// Writes a lease record.
pub fn write_lease(ds: &Path, vm: &str, rec: &LeaseRecord) -> Result<(), String> {
    vmm::lease::write_record(
        &lease_path(ds, vm),
        &vmm::lease::LeaseRecord {
            owner: rec.owner.as_ref().map(|h| h.to_string()),
            generation: rec.generation,
            counter: rec.counter,
        },
    )
}

/// Releases the lease if `me` still holds `generation`.
pub fn release_lease(ds: &Path, vm: &str, me: &HostId, generation: u64) -> Result<(), String> {
    match read_lease(ds, vm)? {
        Some(r) if r.owner.as_ref() == Some(me) && r.generation == generation => {
            write_lease(ds, vm, &r.released())
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_one_host_acquires_a_generation() {
        let d = std::env::temp_dir().join(format!("vha-store-{}", std::process::id()));
        std::fs::create_dir_all(vm_dir(&d, "vm1")).unwrap();
        let free = LeaseRecord {
            owner: None,
            generation: 0,
            counter: 0,
        };
        let a = acquire_lease(&d, "vm1", &free, &HostId::new("a")).unwrap();
        assert_eq!(a.generation, 1);
        let e = acquire_lease(&d, "vm1", &free, &HostId::new("b")).unwrap_err();
        assert!(e.contains("acquired generation 1"), "{e}");
        assert_eq!(read_lease(&d, "vm1").unwrap(), Some(a.clone()));
        release_lease(&d, "vm1", &HostId::new("b"), 1).unwrap();
        assert_eq!(read_lease(&d, "vm1").unwrap(), Some(a));
        release_lease(&d, "vm1", &HostId::new("a"), 1).unwrap();
        assert_eq!(read_lease(&d, "vm1").unwrap().unwrap().owner, None);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
