//! Seccomp listeners across graftd restarts.
//!
//! A program in seccomp mode (and the filter a preloaded program carries)
//! keeps a copy of its listener at a descriptor the launcher named in its
//! `Op::Attach` (graft-launcher's `seccomp` module), so the filter outlives
//! graftd: while no graftd runs, a trapped call waits. For the next graftd
//! to take the listener again, each served listener is written down as one
//! file, `STATE_DIR/seccomp/PID.json`: the program's pid and start time
//! (so a reused pid is never taken for it), the descriptor, its namespace
//! and the rules of its `Op::Attach`. The file goes when the supervisor ends
//! (the program and every child that shares its filter exited); a crash
//! leaves it for [`readopt`], which runs at start, after the endpoint tables
//! are restored, and serves every listener it finds again with
//! `pidfd_getfd`, as [`crate::seccomp::attach`] does.
//!
//! A listener is not taken again when the process graft started has
//! exited and only children it forked remain: their trapped calls then
//! wait until they are restarted. A file that does not parse is dropped with
//! one log line (it only ever names a program, never an endpoint).

use std::fs;
use std::io::Write as _;
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
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

/// The start time of process `pid`, if it exists.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields count from the
    // last ')'; after it come field 3 (state) onwards.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Writes down the listener that process `pid` attached through `ns`'s
/// broker (its own copy at `a.listener_fd`). `None` without a state
/// directory, or when the process or the file cannot be read or written
/// (logged): the listener is served anyway, only not taken again after a
/// restart.
pub fn record(ctx: &Ctx, ns: NetnsId, pid: u32, a: &Attach) -> Option<Record> {
    let dir = ctx.state_dir()?.join(DIR);
    let saved = Saved {
        magic: MAGIC.into(),
        version: VERSION,
        pid,
        start: start_time(pid)?,
        fd: a.listener_fd,
        netns: ns,
        flags: a.flags,
        ingress: a.ingress.clone(),
        egress: a.egress.clone(),
        exclude: a.exclude.clone(),
    };
    let path = dir.join(format!("{pid}.json"));
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
    let tmp = dir.join(format!(".{}.tmp", saved.pid));
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec(saved).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
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
    if start_time(saved.pid) != Some(saved.start) {
        return Err(format!("pid {} has exited", saved.pid));
    }
    let pidfd = pidfd::open(saved.pid as libc::pid_t)
        .map_err(|e| format!("pid {}: pidfd_open: {e}", saved.pid))?;
    // Checked again now that the pidfd pins the process: the pid was not
    // reused between the two reads.
    if start_time(saved.pid) != Some(saved.start) {
        return Err(format!("pid {} has exited", saved.pid));
    }
    let listener = pidfd::getfd(pidfd.as_fd(), saved.fd).map_err(|e| {
        format!(
            "pid {}: its copy of the listener (fd {}) is gone ({e}): its trapped calls fail until it is restarted",
            saved.pid, saved.fd
        )
    })?;
    if !crate::seccomp::is_listener(listener.as_fd()) {
        return Err(format!(
            "pid {}: fd {} is no longer a seccomp listener",
            saved.pid, saved.fd
        ));
    }
    let a = Attach {
        listener_fd: saved.fd,
        flags: saved.flags,
        ingress: saved.ingress.clone(),
        egress: saved.egress.clone(),
        exclude: saved.exclude.clone(),
    };
    Ok((saved, a, listener))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_names_a_live_process_only() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }
}
