//! The endpoint tables on disk, so a restart, a crash or an upgrade of graftd
//! loses nothing.
//!
//! One file, `STATE_DIR/endpoints.json`, rewritten after every change (add,
//! del, a namespace forgotten) by atomic replacement: a temporary file in the
//! same directory, fsync, rename over the old one, fsync of the directory. A
//! reader therefore sees either the old or the new table, never a mix. The
//! directory defaults to /run/graft: a tmpfs, because namespaces do not
//! outlive a reboot and neither should their tables.
//!
//! The file carries a magic string and a format version; graftd refuses to
//! start on a file that is corrupt, foreign or of another version (it never
//! loads half of one). Each namespace is one [`NsRecord`]; fields added later
//! (e.g. mapping rules) must be `#[serde(default)]` so older files still load.
//!
//! At start the namespaces are found again by device and inode: every
//! process's `/proc/PID/ns/net` and every nsfs mount (`ip netns`, Docker).
//! Those that are gone are dropped with one log line each.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use graft_core::{EndpointSpec, NetnsId};
use serde::{Deserialize, Serialize};

/// What the file starts with, so a stray JSON file is never taken for ours.
pub const MAGIC: &str = "graftd-endpoints";
/// Format version written and accepted.
pub const VERSION: u32 = 1;
/// File name inside the state directory.
pub const FILE: &str = "endpoints.json";
/// Lock file: one graftd per state directory.
pub const LOCK: &str = "graftd.lock";
/// Largest state file read (256 endpoints x 4096 namespaces would be far
/// beyond; a bigger file is not ours).
const MAX_FILE: u64 = 64 << 20;

/// Why the state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is corrupt ({why}); move it away to start with empty tables")]
    Corrupt { path: PathBuf, why: String },
    #[error(
        "state file {path} is not a graftd endpoint table (magic {found:?}); \
         give graftd another --state-dir or move the file away"
    )]
    Foreign { path: PathBuf, found: String },
    #[error(
        "state file {path} has format version {found}, this graftd reads version {VERSION}; \
         start the graftd that wrote it, or move the file away"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("another graftd already uses the state directory {0} (it holds {LOCK})")]
    Locked(PathBuf),
    #[error("state file {path} is too large ({len} bytes)")]
    TooLarge { path: PathBuf, len: u64 },
}

/// One endpoint on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpRecord {
    pub spec: EndpointSpec,
    /// The namespace its sockets are made in.
    pub target: NetnsId,
}

/// One namespace's table on disk. New per-namespace data goes here as new
/// `#[serde(default)]` fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsRecord {
    pub netns: NetnsId,
    pub endpoints: Vec<EpRecord>,
    /// The namespace's mapping rules (`ip graft rules`, graft-cni).
    #[serde(
        default,
        skip_serializing_if = "graft_core::nsrules::NsRules::is_empty"
    )]
    pub rules: graft_core::nsrules::NsRules,
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub magic: String,
    pub version: u32,
    pub namespaces: Vec<NsRecord>,
}

impl StateFile {
    pub fn new(namespaces: Vec<NsRecord>) -> Self {
        StateFile {
            magic: MAGIC.to_owned(),
            version: VERSION,
            namespaces,
        }
    }
}

/// The state directory, locked for this graftd's lifetime.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: nix::fcntl::Flock<fs::File>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Opens (creating, 0600, close-on-exec) a file only root may read: the
/// lock, or the next state file, emptied when `truncate`.
pub fn open_private(path: &Path, truncate: bool) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(truncate)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

impl Store {
    /// Creates the directory (0700) if missing and takes its lock; fails when
    /// another graftd holds it.
    pub fn open(dir: &Path) -> Result<Self, PersistError> {
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err("create", dir))?;
        }
        let lp = dir.join(LOCK);
        let f = open_private(&lp, false).map_err(io_err("open", &lp))?;
        let lock = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| {
                if e == nix::errno::Errno::EWOULDBLOCK {
                    PersistError::Locked(dir.to_owned())
                } else {
                    PersistError::Io {
                        op: "lock",
                        path: lp.clone(),
                        source: e.into(),
                    }
                }
            })?;
        Ok(Store {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The endpoint table's file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Reads the tables; an absent file is an empty table.
    pub fn load(&self) -> Result<Vec<NsRecord>, PersistError> {
        let path = self.path();
        let text = match fs::File::open(&path) {
            Ok(f) => {
                let len = f.metadata().map_err(io_err("stat", &path))?.len();
                if len > MAX_FILE {
                    return Err(PersistError::TooLarge { path, len });
                }
                io::read_to_string(f).map_err(io_err("read", &path))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        parse(&path, &text)
    }

    /// Replaces the file with `records`, atomically.
    pub fn save(&self, records: Vec<NsRecord>) -> Result<(), PersistError> {
        let path = self.path();
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        let mut body = serde_json::to_vec_pretty(&StateFile::new(records)).map_err(|e| {
            PersistError::Corrupt {
                path: path.clone(),
                why: e.to_string(),
            }
        })?;
        body.push(b'\n');
        let mut f = open_private(&tmp, true).map_err(io_err("create", &tmp))?;
        f.write_all(&body).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io_err("rename onto", &path))?;
        // The rename itself is durable only once the directory is synced.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", &self.dir))?;
        Ok(())
    }
}

/// Decodes a state file: magic first (a foreign file is named as such, not as
/// corrupt), then version, then the whole table.
pub fn parse(path: &Path, text: &str) -> Result<Vec<NsRecord>, PersistError> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| PersistError::Corrupt {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let magic = v.get("magic").and_then(|m| m.as_str()).unwrap_or("");
    if magic != MAGIC {
        return Err(PersistError::Foreign {
            path: path.to_owned(),
            found: magic.chars().take(64).collect(),
        });
    }
    let version = v.get("version").and_then(|m| m.as_u64()).unwrap_or(0);
    if version != u64::from(VERSION) {
        return Err(PersistError::Version {
            path: path.to_owned(),
            found: u32::try_from(version).unwrap_or(u32::MAX),
        });
    }
    let f: StateFile = serde_json::from_value(v).map_err(|e| PersistError::Corrupt {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    Ok(f.namespaces)
}

/// Opens every network namespace in `want` that still exists, by scanning
/// processes and nsfs mounts; the ones not found are absent from the result.
pub fn find_namespaces(want: &[NetnsId]) -> HashMap<NetnsId, OwnedFd> {
    let mut found: HashMap<NetnsId, OwnedFd> = HashMap::new();
    let try_path = |p: &Path, found: &mut HashMap<NetnsId, OwnedFd>| {
        let Ok(md) = fs::metadata(p) else {
            return;
        };
        let id = NetnsId {
            dev: md.dev(),
            ino: md.ino(),
        };
        if !want.contains(&id) || found.contains_key(&id) {
            return;
        }
        // Opened, then checked again: the path may now name another one.
        let Ok(f) = fs::File::open(p) else {
            return;
        };
        let fd = OwnedFd::from(f);
        if crate::netns::identify(fd.as_fd()).ok() == Some(id) {
            found.insert(id, fd);
        }
    };
    if want.is_empty() {
        return found;
    }
    if let Ok(text) = fs::read_to_string("/proc/self/mountinfo") {
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(root), Some(mnt)) = (f.nth(3), f.next()) else {
                continue;
            };
            if root.starts_with("net:[") {
                try_path(
                    &PathBuf::from(graft_core::mountinfo::unescape(mnt)),
                    &mut found,
                );
            }
        }
    }
    if let Ok(procs) = fs::read_dir("/proc") {
        for p in procs.flatten() {
            if found.len() == want.len() {
                break;
            }
            if p.file_name()
                .to_str()
                .is_some_and(|s| s.parse::<u32>().is_ok())
            {
                try_path(&p.path().join("ns/net"), &mut found);
            }
        }
    }
    found
}

/// Loads the saved tables into graftd: each namespace found again gets its
/// broker back and its endpoints re-added (with their eBPF policy); the
/// namespaces and target namespaces that are gone are dropped, one log line
/// each. Returns how many endpoints were restored.
pub fn restore(ctx: &crate::Ctx, brokers: &crate::broker::Handle, records: Vec<NsRecord>) -> usize {
    use crate::factory::TargetWorker;
    use crate::state::Target;
    use std::sync::Arc;

    let mut want: Vec<NetnsId> = Vec::new();
    for r in &records {
        want.push(r.netns);
        want.extend(r.endpoints.iter().map(|e| e.target));
    }
    want.sort();
    want.dedup();
    let own = ctx.state().own();
    want.retain(|id| *id != own);
    let fds = find_namespaces(&want);
    let mut restored = 0;
    for r in records {
        let ns = r.netns;
        let Some(ns_fd) = fds.get(&ns) else {
            let names: Vec<String> = r
                .endpoints
                .iter()
                .map(|e| e.spec.name.to_string())
                .collect();
            log::info!(
                "saved network namespace {ns} is gone: dropped its endpoints ({})",
                names.join(", ")
            );
            continue;
        };
        let mut st = ctx.state();
        let mut added = Vec::new();
        for e in r.endpoints {
            let name = e.spec.name;
            if let Err(err) = st.check_add(ns, &e.spec, e.target) {
                log::warn!("{ns}: saved endpoint {name} dropped: {err}");
                continue;
            }
            let target = if e.target == own {
                Target::Own
            } else if let Some(w) = st.worker(e.target) {
                Target::Foreign(w)
            } else {
                let spawned = fds
                    .get(&e.target)
                    .ok_or_else(|| "it is gone".to_owned())
                    .and_then(|fd| fd.try_clone().map_err(|e| e.to_string()))
                    .and_then(|fd| TargetWorker::spawn(fd, e.target).map_err(|e| e.to_string()));
                match spawned {
                    Ok(w) => {
                        let w = Arc::new(w);
                        st.remember_worker(&w);
                        Target::Foreign(w)
                    }
                    Err(why) => {
                        log::info!(
                            "{ns}: saved endpoint {name} dropped: its target namespace {} ({why})",
                            e.target
                        );
                        continue;
                    }
                }
            };
            let listener = if st.has(ns) {
                None
            } else {
                match crate::netns::make_broker(ns_fd.as_fd(), ns, &ctx.broker_name) {
                    Ok(l) => Some(l),
                    Err(err) => {
                        log::warn!(
                            "{ns}: cannot reopen the broker ({err}): its endpoints are dropped"
                        );
                        break;
                    }
                }
            };
            let Ok(fd) = ns_fd.try_clone() else {
                log::warn!("{ns}: out of descriptors: saved endpoint {name} dropped");
                continue;
            };
            let ep = st.insert(ns, fd, e.spec, e.target, target);
            if let Some(l) = listener {
                brokers.open(ns, l);
            }
            added.push(ep);
        }
        if !added.is_empty() && !r.rules.is_empty() {
            if let Err(err) = st.set_rules(ns, &r.rules) {
                log::warn!("{ns}: saved mapping rules dropped: {err}");
            }
        }
        drop(st);
        for ep in &added {
            ctx.hooks.endpoint_added(&ep.hook_ref());
        }
        restored += added.len();
        if !added.is_empty() {
            log::info!("{ns}: restored {} endpoint(s)", added.len());
        }
    }
    restored
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::{EndpointAddr, EndpointName};

    fn rec() -> NsRecord {
        NsRecord {
            netns: NetnsId { dev: 4, ino: 99 },
            endpoints: vec![EpRecord {
                spec: EndpointSpec {
                    name: EndpointName::new("ep-in4").unwrap(),
                    addr: EndpointAddr::Ipv4 {
                        addr: "127.0.0.1".parse().unwrap(),
                        port: Some(8080),
                    },
                    netns: None,
                    policy: vec!["deny 10.0.0.0/8".parse().unwrap()],
                    limit: None,
                },
                target: NetnsId { dev: 4, ino: 1 },
            }],
            rules: graft_core::nsrules::NsRules::default(),
        }
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("graftd-persist-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn round_trip_and_lock() {
        let d = tmpdir("rt");
        let s = Store::open(&d).unwrap();
        assert_eq!(s.load().unwrap(), vec![]);
        s.save(vec![rec()]).unwrap();
        assert_eq!(s.load().unwrap(), vec![rec()]);
        assert!(matches!(Store::open(&d), Err(PersistError::Locked(_))));
        drop(s);
        let s = Store::open(&d).unwrap();
        assert_eq!(s.load().unwrap(), vec![rec()]);
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");
        drop(s);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn corrupt_foreign_and_other_versions_are_refused() {
        let p = Path::new("/x/endpoints.json");
        let e = parse(
            p,
            "{\"magic\":\"graftd-endpoints\",\"version\":1,\"namespaces\":[",
        )
        .unwrap_err();
        assert!(matches!(e, PersistError::Corrupt { .. }), "{e}");
        let e = parse(p, "[1,2]").unwrap_err();
        assert!(matches!(e, PersistError::Foreign { .. }), "{e}");
        let e = parse(
            p,
            "{\"magic\":\"graftd-endpoints\",\"version\":7,\"namespaces\":[]}",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "state file /x/endpoints.json has format version 7, this graftd reads version 1; \
             start the graftd that wrote it, or move the file away"
        );
        // A bad endpoint anywhere refuses the whole file.
        let mut good = serde_json::to_value(StateFile::new(vec![rec(), rec()])).unwrap();
        good["namespaces"][1]["endpoints"][0]["spec"]["addr"]["type"] = "ipv5".into();
        let e = parse(p, &good.to_string()).unwrap_err();
        assert!(matches!(e, PersistError::Corrupt { .. }), "{e}");
    }

    #[test]
    fn finds_own_namespace_only() {
        let own = NetnsId::current().unwrap();
        let gone = NetnsId { dev: 1, ino: 1 };
        let f = find_namespaces(&[own, gone]);
        assert!(f.contains_key(&own));
        assert!(!f.contains_key(&gone));
    }
}
