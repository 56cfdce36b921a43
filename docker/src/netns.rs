//! Entering a process's network namespace.

use std::fs::File;

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open /proc/{pid}/ns/net: {err}")]
    Open { pid: i32, err: std::io::Error },
    #[error("setns into the network namespace of pid {pid} failed: {err}")]
    Setns { pid: i32, err: nix::Error },
}

/// Opens `/proc/PID/ns/net`. Holding the file pins the namespace, so what we
/// enter later is the one opened now even if the process exits.
pub fn open(pid: i32) -> Result<File, NetnsError> {
    File::open(format!("/proc/{pid}/ns/net")).map_err(|err| NetnsError::Open { pid, err })
}

/// Moves the calling thread into the namespace. The caller is single-threaded
/// and about to exec, so the whole (new) program runs there; mount, pid and
/// user namespaces stay the host's.
pub fn enter(ns: &File, pid: i32) -> Result<(), NetnsError> {
    setns(ns, CloneFlags::CLONE_NEWNET).map_err(|err| NetnsError::Setns { pid, err })
}
