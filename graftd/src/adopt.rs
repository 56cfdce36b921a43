//! Seccomp listeners across graftd restarts.
//!
//! A program in seccomp mode (and the filter a preloaded program carries)
//! keeps a copy of its listener at a descriptor the launcher named in its
//! `Op::Attach` (graft-launcher's `seccomp` module), so the filter outlives
//! graftd: while no graftd runs, a trapped call waits. For the next graftd
//! to take the listener again, each served listener is written down as one
//! file, `STATE_DIR/seccomp/ID.json`, ID being the pid and start time of
//! the process graft started: the process holding the listener now (pid
//! and start time, so a reused pid is never taken for it), the descriptor,
//! the namespace and the rules of the `Op::Attach`. The file goes when the
//! supervisor ends (the program and every child sharing its filter
//! exited); a crash leaves it for [`readopt`], which runs at start, after
//! the endpoint tables are restored, and serves every listener it finds
//! again with `pidfd_getfd`, as [`crate::seccomp::attach`] does.
//!
//! When that process is gone but children it forked go on (a daemon that
//! detached), the listener is looked for in any process whose environment
//! names it (`GRAFT_SECCOMP_LISTENER=ID:FD`, set by the launcher and
//! inherited) and that holds it at that descriptor; the file then names
//! that process. A program that closed the descriptor or cleared its
//! environment is not found: its trapped calls fail (no holder) or wait
//! (a child still holds it) until it is restarted. A file that does not
//! parse is dropped with one log line.

use std::fs;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use graft_core::proto::broker::Attach;
use graft_core::NetnsId;
use graft_seccomp::pidfd;
use serde::{Deserialize, Serialize};

use crate::Ctx;

/// What each file starts with.
const MAGIC: &str = "graftd-seccomp-listener";
const VERSION: u32 = 1;
/// Folder inside the state directory.
const DIR: &str = "seccomp";

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    magic: String,
    version: u32,
    /// `PID-START` of the process graft started (the file's name).
    id: String,
    /// The process that holds the listener now.
    pid: u32,
    /// Field 22 of `/proc/PID/stat`: with the pid, names one process.
    start: u64,
    fd: i32,
    netns: NetnsId,
    flags: u32,
    ingress: String,
    egress: String,
    exclude: String,
}

/// A listener written down; the file goes with this value (the supervisor
/// holds it), not when graftd dies.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
}

impl Drop for Record {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Writes down the listener that process `pid` attached through `ns`'s
/// broker (its own copy at `a.listener_fd`). `None` without a state
/// directory, or when the process or the file cannot be read or written
/// (logged): the listener is served anyway, only not taken again after a
/// restart.
pub fn record(ctx: &Ctx, ns: NetnsId, pid: u32, a: &Attach) -> Option<Record> {
    let dir = ctx.state_dir()?.join(DIR);
    let start = pidfd::start_time(pid)?;
    let saved = Saved {
        magic: MAGIC.into(),
        version: VERSION,
        id: format!("{pid}-{start}"),
        pid,
        start,
        fd: a.listener_fd,
        netns: ns,
        flags: a.flags,
        ingress: a.ingress.clone(),
        egress: a.egress.clone(),
        exclude: a.exclude.clone(),
    };
    let path = dir.join(format!("{}.json", saved.id));
    match write(&dir, &path, &saved) {
        Ok(()) => Some(Record { path }),
        Err(e) => {
            log::warn!(
                "cannot write down the seccomp listener of pid {pid} in {}: {e}; \
                 it will not be served again after a restart of graftd",
                dir.display()
            );
            None
        }
    }
}

fn write(dir: &Path, path: &Path, saved: &Saved) -> std::io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let tmp = dir.join(format!(".{}.tmp", saved.id));
    let mut f = crate::persist::open_private(&tmp, true)?;
    f.write_all(&serde_json::to_vec(saved).map_err(std::io::Error::other)?)?;
    // No fsync: the file only has to outlive graftd, not the machine (its
    // program would not), and this runs on the broker thread.
    fs::rename(&tmp, path)
}

/// Serves again every listener written down by an earlier graftd whose
/// program still runs; drops the other files. Returns how many.
pub fn readopt(ctx: &Arc<Ctx>) -> usize {
    let Some(dir) = ctx.state_dir().map(|d| d.join(DIR)) else {
        return 0;
    };
    let Ok(entries) = fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for path in entries.flatten().map(|e| e.path()) {
        if path.extension().is_none_or(|x| x != "json") {
            let _ = fs::remove_file(&path);
            continue;
        }
        let record = Record { path };
        match take_again(ctx, &record.path) {
            Ok((saved, a, listener)) => {
                if let Some(dir) = record.path.parent() {
                    // Now naming the process found holding it.
                    if let Err(e) = write(dir, &record.path, &saved) {
                        log::warn!("{}: cannot rewrite: {e}", record.path.display());
                    }
                }
                if crate::seccomp::serve(ctx, saved.netns, &a, listener, saved.pid, Some(record))
                    .is_ok()
                {
                    log::info!(
                        "seccomp listener of pid {} in {} served again",
                        saved.pid,
                        saved.netns
                    );
                    n += 1;
                }
            }
            // Dropping `record` removes the file.
            Err(why) => log::info!("{}: {why}", record.path.display()),
        }
    }
    n
}

/// The listener a file names, taken from its program.
fn take_again(ctx: &Ctx, path: &Path) -> Result<(Saved, Attach, std::os::fd::OwnedFd), String> {
    let text = fs::read_to_string(path).map_err(|e| format!("unreadable ({e})"))?;
    let saved: Saved =
        serde_json::from_str(&text).map_err(|e| format!("not a listener record ({e})"))?;
    if saved.magic != MAGIC || saved.version != VERSION {
        return Err("not a listener record of this graftd version".into());
    }
    if !ctx.state().has(saved.netns) {
        return Err(format!(
            "{} has no endpoints any more: its program is not served again",
            saved.netns
        ));
    }
    let mut saved = saved;
    let listener = match holder_listener(saved.pid, saved.start, saved.fd) {
        Ok(l) => l,
        Err(why) => {
            let Some((pid, start, l)) = find_inheritor(&saved) else {
                return Err(format!(
                    "pid {}: {why}, and no process holds its listener: \
                     its program is not served again",
                    saved.pid
                ));
            };
            log::info!(
                "seccomp listener of pid {} ({why}): found in pid {pid}",
                saved.pid
            );
            saved.pid = pid;
            saved.start = start;
            l
        }
    };
    let a = Attach {
        listener_fd: saved.fd,
        flags: saved.flags,
        ingress: saved.ingress.clone(),
        egress: saved.egress.clone(),
        exclude: saved.exclude.clone(),
    };
    Ok((saved, a, listener))
}

/// Process `pid`'s listener at `fd`, if `pid` is still the process
/// started at `start` and `fd` a seccomp listener.
fn holder_listener(pid: u32, start: u64, fd: i32) -> Result<std::os::fd::OwnedFd, String> {
    if pidfd::start_time(pid) != Some(start) {
        return Err("exited".into());
    }
    let pidfd = pidfd::open(pid as libc::pid_t).map_err(|e| format!("pidfd_open: {e}"))?;
    // Checked again now that the pidfd pins the process: the pid was not
    // reused between the two reads.
    if pidfd::start_time(pid) != Some(start) {
        return Err("exited".into());
    }
    crate::seccomp::listener_at(pidfd.as_fd(), fd)
        .map_err(|e| format!("its copy of the listener (fd {fd}) is gone ({e})"))
}

/// Whether an environment block (`/proc/PID/environ`) lists the listener
/// `item` (`PID-START:FD`) in [`graft_core::ENV_SECCOMP_LISTENER`], a
/// comma-separated list when `graft` ran inside a grafted program.
fn names_listener(environ: &[u8], item: &str) -> bool {
    let prefix = format!("{}=", graft_core::ENV_SECCOMP_LISTENER);
    environ
        .split(|&b| b == 0)
        .filter_map(|v| v.strip_prefix(prefix.as_bytes()))
        .any(|list| list.split(|&b| b == b',').any(|i| i == item.as_bytes()))
}

/// A process other than the recorded one that holds `saved`'s listener:
/// in the listener's namespace, its environment names it, and its
/// descriptor is a seccomp listener. (pid, start time, the listener.)
/// (Taking a stranger's listener would grant nothing: a supervisor grafts
/// only sockets of its own namespace.)
fn find_inheritor(saved: &Saved) -> Option<(u32, u64, std::os::fd::OwnedFd)> {
    let want = format!("{}:{}", saved.id, saved.fd);
    let procs = fs::read_dir("/proc").ok()?;
    for pid in procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let link = fs::read_link(format!("/proc/{pid}/fd/{}", saved.fd));
        if !link.is_ok_and(|l| l.as_os_str() == "anon_inode:seccomp notify") {
            continue;
        }
        let netns = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| NetnsId {
            dev: m.dev(),
            ino: m.ino(),
        });
        if netns.ok() != Some(saved.netns) {
            continue;
        }
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !names_listener(&env, &want) {
            continue;
        }
        let Some(start) = pidfd::start_time(pid) else {
            continue;
        };
        if let Ok(l) = holder_listener(pid, start, saved.fd) {
            return Some((pid, start, l));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_environment_names_a_listener_alone_or_in_a_nested_list() {
        let env = |v: &str| format!("A=1\0{}={v}\0B=2\0", graft_core::ENV_SECCOMP_LISTENER);
        assert!(names_listener(env("5-42:100").as_bytes(), "5-42:100"));
        assert!(names_listener(
            env("5-42:100,7-99:101").as_bytes(),
            "5-42:100"
        ));
        assert!(names_listener(
            env("5-42:100,7-99:101").as_bytes(),
            "7-99:101"
        ));
        assert!(!names_listener(env("5-42:1000").as_bytes(), "5-42:100"));
        assert!(!names_listener(env("15-42:100").as_bytes(), "5-42:100"));
        assert!(!names_listener(b"OTHER=5-42:100\0", "5-42:100"));
    }
}
