//! Placing the process in a cgroup v2 of its own.
//!
//! The programs are attached to a child of the cgroup the process runs in, and
//! the whole process (every thread: `cgroup.procs`) moves into it. A child of
//! the current cgroup is the one place we can always move to without breaking
//! cgroup v2's "no internal processes" rule: the current cgroup already holds
//! processes, so it has no domain controllers enabled for its children.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use graft_core::mountinfo::unescape;

use crate::Error;

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let op = op.into();
    move |source| Error::Io { op, source }
}

/// Every cgroup2 mount as (mount point, root inside the hierarchy).
pub(crate) fn cgroup2_mounts(mountinfo: &str) -> Vec<(PathBuf, String)> {
    let mut v = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        if post.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let f: Vec<&str> = pre.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        v.push((PathBuf::from(unescape(f[4])), unescape(f[3])));
    }
    v
}

/// The process's cgroup v2 path (the `0::PATH` line of /proc/self/cgroup).
pub(crate) fn own_cgroup_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim_end_matches(" (deleted)").to_owned())
}

/// The directory of cgroup `path` under one of the mounts whose root holds it.
pub(crate) fn cgroup_dir(mounts: &[(PathBuf, String)], path: &str) -> Option<PathBuf> {
    for (mnt, root) in mounts {
        let rest = if root == "/" {
            Some(path)
        } else {
            path.strip_prefix(root.as_str())
                .filter(|r| r.is_empty() || r.starts_with('/'))
        };
        if let Some(rest) = rest {
            let rest = rest.trim_start_matches('/');
            return Some(if rest.is_empty() {
                mnt.clone()
            } else {
                mnt.join(rest)
            });
        }
    }
    None
}

/// The directory of process `pid`'s cgroup v2, if a cgroup2 mount shows
/// it; `None` for the hierarchy's root.
pub(crate) fn of_process(pid: u32) -> Result<Option<PathBuf>, Error> {
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(io_err(format!("read /proc/{pid}/cgroup")))?;
    let Some(path) = own_cgroup_path(&own).filter(|p| p != "/") else {
        return Ok(None);
    };
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(io_err("read /proc/self/mountinfo"))?;
    Ok(cgroup_dir(&cgroup2_mounts(&mountinfo), &path))
}

/// The cgroup the process now runs in, which it leaves on drop.
#[derive(Debug)]
pub struct Placement {
    /// Where the process was, and goes back to.
    pub original: PathBuf,
    /// The cgroup made for it.
    pub dir: PathBuf,
    /// Opened directory, what programs attach to.
    pub fd: fs::File,
    /// Left in place on drop (pinned programs are attached to it).
    persistent: bool,
    /// The cgroup2 mount we made when none was visible; dropped last.
    _mount: Option<PrivateMount>,
}

/// A cgroup2 mount of our own in a fresh directory, detached and removed on
/// drop.
#[derive(Debug)]
struct PrivateMount {
    path: PathBuf,
}

impl PrivateMount {
    fn new() -> Result<Self, Error> {
        let path = std::env::temp_dir().join(format!("graft-cgroup2-{}", std::process::id()));
        match fs::create_dir(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err(format!("create {}", path.display()))(e)),
        }
        if let Err(e) = crate::pin::mount_fs("cgroup2", &path) {
            let _ = fs::remove_dir(&path);
            return Err(Error::Io {
                op: format!(
                    "no cgroup v2 hierarchy is mounted, and mounting one on {} failed",
                    path.display()
                ),
                source: e,
            });
        }
        log::info!(
            "no cgroup v2 mount visible: mounted one on {}",
            path.display()
        );
        Ok(PrivateMount { path })
    }
}

impl Drop for PrivateMount {
    fn drop(&mut self) {
        if let Ok(t) = std::ffi::CString::new(self.path.to_string_lossy().as_bytes()) {
            // SAFETY: t is a valid NUL-terminated path.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&self.path);
    }
}

fn move_pid(dir: &Path, pid: u32) -> Result<(), Error> {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(io_err(format!(
        "move process {pid} into cgroup {}",
        dir.display()
    )))
}

/// Removes leftovers of earlier runs that died without cleaning up: sibling
/// cgroups named `graftd-PID` whose PID is gone and that hold no process.
fn remove_stale(parent: &Path) {
    let Ok(rd) = fs::read_dir(parent) else {
        return;
    };
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("graftd-")) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let empty = fs::read_to_string(e.path().join("cgroup.procs"))
            .map(|s| s.trim().is_empty())
            .unwrap_or(false);
        if empty && fs::remove_dir(e.path()).is_ok() {
            log::info!("removed stale cgroup {}", e.path().display());
        }
    }
}

/// Where the process's cgroup v2 is, the mount that shows it (made
/// privately when none is visible), and where cgroup `name` is: a child of
/// the process's cgroup, or, for an absolute `name`, that path from the
/// hierarchy's root.
fn resolve(name: &str) -> Result<(PathBuf, PathBuf, Option<PrivateMount>), Error> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").map_err(io_err("read /proc/self/mountinfo"))?;
    let own = fs::read_to_string("/proc/self/cgroup").map_err(io_err("read /proc/self/cgroup"))?;
    let path = own_cgroup_path(&own).ok_or(Error::NoCgroup2)?;
    let mounts = cgroup2_mounts(&mountinfo);
    let (original, mount, mounts) = match cgroup_dir(&mounts, &path) {
        Some(d) => (d, None, mounts),
        None => {
            // `ip netns exec` remounts /sys, hiding /sys/fs/cgroup, and a
            // v1-only host mounts no v2 at all; the v2 hierarchy is still
            // there: mount it privately for as long as we need it.
            let m = PrivateMount::new()?;
            let mounts = vec![(m.path.clone(), "/".to_owned())];
            let d = cgroup_dir(&mounts, &path)
                .ok_or_else(|| Error::CgroupNotVisible { path: path.clone() })?;
            (d, Some(m), mounts)
        }
    };
    if name.starts_with('/') {
        let dir = cgroup_dir(&mounts, name).ok_or_else(|| Error::CgroupNotVisible {
            path: name.to_owned(),
        })?;
        return Ok((original, dir, mount));
    }
    // Already in it (a process that placed itself before and starts the
    // companion again): the same cgroup, not a child of the same name.
    if original.file_name().is_some_and(|f| f == name) {
        if let Some(parent) = original.parent() {
            let dir = original.clone();
            return Ok((parent.to_owned(), dir, mount));
        }
    }
    let dir = original.join(name);
    Ok((original, dir, mount))
}

/// The directory of cgroup `name` (as [`Placement::enter`] takes it), if it
/// exists.
pub(crate) fn locate(name: &str) -> Result<Option<PathBuf>, Error> {
    let (_, dir, _mount) = resolve(name)?;
    Ok(dir.exists().then_some(dir))
}

impl Placement {
    /// Creates cgroup `name` (a child of the process's current cgroup v2, or
    /// an absolute path in the hierarchy) unless it exists, and moves the
    /// whole process into it. A `persistent` placement is left as it is when
    /// dropped: pinned programs stay attached to it.
    pub fn enter(name: &str, persistent: bool) -> Result<Self, Error> {
        let (original, dir, mount) = resolve(name)?;
        remove_stale(&original);
        let made = match fs::create_dir_all(&dir) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(io_err(format!("create cgroup {}", dir.display()))(e)),
        };
        let fd = fs::File::open(&dir).map_err(io_err(format!("open cgroup {}", dir.display())))?;
        if let Err(e) = move_pid(&dir, std::process::id()) {
            if made && !persistent {
                let _ = fs::remove_dir(&dir);
            }
            return Err(e);
        }
        Ok(Placement {
            original,
            dir,
            fd,
            persistent,
            _mount: mount,
        })
    }
}

impl Drop for Placement {
    fn drop(&mut self) {
        if self.persistent {
            return;
        }
        if let Err(e) = move_pid(&self.original, std::process::id()) {
            log::warn!("{e}");
            return;
        }
        if let Err(e) = fs::remove_dir(&self.dir) {
            log::warn!("remove cgroup {}: {e}", self.dir.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// `mountinfo` yields the one cgroup2 `mount` (point, root), and each
    /// cgroup path in `dirs` maps to its directory (or to none).
    fn check(mountinfo: &str, mount: (&str, &str), dirs: &[(&str, Option<&str>)]) {
        let m = cgroup2_mounts(mountinfo);
        assert_eq!(m, vec![(PathBuf::from(mount.0), mount.1.to_owned())]);
        for (path, dir) in dirs {
            assert_eq!(cgroup_dir(&m, path), dir.map(PathBuf::from), "{path}");
        }
    }

    #[test]
    fn finds_hybrid_mount() {
        check(
            HYBRID,
            ("/sys/fs/cgroup/unified", "/"),
            &[
                ("/", Some("/sys/fs/cgroup/unified")),
                (
                    "/system.slice/graftd.service",
                    Some("/sys/fs/cgroup/unified/system.slice/graftd.service"),
                ),
            ],
        );
    }

    #[test]
    fn non_root_mount_and_escapes() {
        check(
            "50 1 0:40 /kubepods/pod\\0401 /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n",
            ("/mnt/cg x", "/kubepods/pod 1"),
            &[
                ("/kubepods/pod 1/c", Some("/mnt/cg x/c")),
                ("/kubepods/pod 10", None),
                ("/other", None),
            ],
        );
    }

    #[test]
    fn own_path() {
        assert_eq!(
            own_cgroup_path("4:memory:/x\n0::/a/b\n").as_deref(),
            Some("/a/b")
        );
        assert_eq!(own_cgroup_path("4:memory:/x\n"), None);
    }
}
