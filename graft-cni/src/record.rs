//! Per-attachment records: what ADD registered for one (container ID,
//! interface) pair, so DEL and GC know what to remove even when the config
//! changed or the namespace path is gone.
//!
//! They live in files, `DATADIR/NETWORK/CONTAINERID-IFNAME.json` (DATADIR is
//! the config's `dataDir`, by default `/var/lib/cni/graft`), like the
//! reference host-local plugin's leases, and not in graftd: graftd knows
//! namespaces, not container IDs, and forgets a namespace by itself once no
//! process uses it, while GC must find attachments whose namespace may be
//! long gone. A record written before its namespace's identity (device and
//! inode) lets DEL and GC refuse to touch a different namespace that reuses
//! the same path.

use std::io;
use std::path::{Path, PathBuf};

use graft_core::{EndpointName, NetnsId};
use serde::{Deserialize, Serialize};

use crate::cni::{code, CniError};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    /// The namespace path ADD was given.
    pub netns: String,
    pub netns_id: NetnsId,
    pub endpoints: Vec<EndpointName>,
    /// Whether ADD set the namespace's rules.
    pub rules: bool,
}

/// The records of one network.
pub struct Store {
    dir: PathBuf,
}

fn io_err(what: &str, p: &Path, e: io::Error) -> CniError {
    CniError::new(code::IO, format!("cannot {what} {}: {e}", p.display()))
}

/// Container IDs and interface names become file names: the spec limits
/// them to safe characters, and we check it.
pub fn check_key(container_id: &str, ifname: &str) -> Result<(), CniError> {
    let ok = |s: &str, extra: &[u8]| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
            && !s.starts_with('.')
    };
    if !ok(container_id, b"_.-") {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID \"{container_id}\" must be letters, digits, '_', '.' or '-'"),
        ));
    }
    if !ok(ifname, b"_.-@:") || ifname.len() > 15 {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_IFNAME \"{ifname}\" is not a valid interface name"),
        ));
    }
    Ok(())
}

impl Store {
    pub fn new(data_dir: &Path, network: &str) -> Result<Self, CniError> {
        if network.contains('/') || network.starts_with('.') {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("network name \"{network}\" may not contain '/' or start with '.'"),
            ));
        }
        Ok(Store {
            dir: data_dir.join(network),
        })
    }

    fn path(&self, container_id: &str, ifname: &str) -> PathBuf {
        self.dir.join(format!("{container_id}-{ifname}.json"))
    }

    /// Writes a record atomically (temporary file, then rename).
    pub fn save(&self, r: &Record) -> Result<(), CniError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        let p = self.path(&r.container_id, &r.ifname);
        let tmp = p.with_extension("tmp");
        let text = serde_json::to_vec_pretty(r)
            .map_err(|e| CniError::new(code::IO, format!("cannot encode a record: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| io_err("write", &tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| io_err("rename", &tmp, e))
    }

    pub fn load(&self, container_id: &str, ifname: &str) -> Result<Option<Record>, CniError> {
        Self::read(&self.path(container_id, ifname))
    }

    fn read(p: &Path) -> Result<Option<Record>, CniError> {
        match std::fs::read(p) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                CniError::new(code::IO, format!("corrupt record {}: {e}", p.display()))
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", p, e)),
        }
    }

    pub fn remove(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        let p = self.path(container_id, ifname);
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &p, e)),
        }
    }

    /// Every record of the network.
    pub fn all(&self) -> Result<Vec<Record>, CniError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &self.dir, e)),
        };
        let mut v = Vec::new();
        for ent in rd {
            let p = ent.map_err(|e| io_err("list", &self.dir, e))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                v.extend(Self::read(&p)?);
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_remove() {
        let dir = std::env::temp_dir().join(format!("graft-cni-rec-{}", std::process::id()));
        let s = Store::new(&dir, "net1").unwrap();
        let r = Record {
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            netns_id: NetnsId { dev: 4, ino: 5 },
            endpoints: vec![EndpointName::new("pm-80").unwrap()],
            rules: true,
        };
        s.save(&r).unwrap();
        assert_eq!(s.load("abc", "eth0").unwrap(), Some(r.clone()));
        assert_eq!(s.all().unwrap(), vec![r]);
        s.remove("abc", "eth0").unwrap();
        s.remove("abc", "eth0").unwrap();
        assert_eq!(s.load("abc", "eth0").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(Store::new(&dir, "../x").is_err());
        assert_eq!(check_key("a/b", "eth0").unwrap_err().code, 7);
        assert!(check_key("abc", "eth0").is_ok());
    }
}
