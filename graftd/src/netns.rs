//! Network namespace handles: validating descriptors that clients send, and
//! running code inside another namespace.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so graftd never calls
//! it on a thread that does anything else afterwards: every entry into a
//! namespace happens on a thread made for that purpose, which either ends when
//! its work is done ([`run_in`]) or stays in that namespace for life (the
//! socket factory's per-target workers).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use graft_core::NetnsId;
use nix::sched::CloneFlags;
use nix::sys::socket::{self, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};

use crate::sys;

/// Why a descriptor or a namespace operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("descriptor is not a network namespace ({0})")]
    NotNetns(String),
    #[error("cannot identify namespace: {0}")]
    Stat(io::Error),
    #[error("cannot enter network namespace {0}: {1}")]
    Enter(NetnsId, io::Error),
    #[error("cannot start a thread for network namespace {0}: {1}")]
    Thread(NetnsId, io::Error),
    #[error("thread working in network namespace {0} panicked")]
    Panicked(NetnsId),
    #[error("cannot create the broker socket in network namespace {0}: {1}")]
    Broker(NetnsId, io::Error),
}

impl NetnsError {
    /// The errno a control reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            NetnsError::NotNetns(_) => libc::EINVAL,
            NetnsError::Stat(e)
            | NetnsError::Enter(_, e)
            | NetnsError::Thread(_, e)
            | NetnsError::Broker(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
            NetnsError::Panicked(_) => libc::EIO,
        }
    }
}

/// Checks that `fd` is a network namespace (nsfs, `CLONE_NEWNET`) and returns
/// its identity. Anything else (a regular file, a socket, another namespace
/// type) is refused.
pub fn identify(fd: BorrowedFd<'_>) -> Result<NetnsId, NetnsError> {
    match sys::ns_type(fd) {
        Ok(t) if t == libc::CLONE_NEWNET => NetnsId::of_fd(fd).map_err(NetnsError::Stat),
        Ok(t) => Err(NetnsError::NotNetns(format!("namespace type {t:#x}"))),
        Err(e) => Err(NetnsError::NotNetns(e.to_string())),
    }
}

/// graftd's own network namespace, opened once at start on the main thread
/// (which never leaves it).
pub fn open_own() -> io::Result<(OwnedFd, NetnsId)> {
    let f = std::fs::File::open("/proc/thread-self/ns/net")?;
    let fd = OwnedFd::from(f);
    let id = NetnsId::of_fd(fd.as_fd())?;
    Ok((fd, id))
}

/// Runs `f` on a fresh thread that first joins the namespace `ns`; the thread
/// ends when `f` returns, so it is never reused for anything else.
pub fn run_in<R: Send>(
    ns: BorrowedFd<'_>,
    id: NetnsId,
    f: impl FnOnce() -> R + Send,
) -> Result<R, NetnsError> {
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(format!("enter {id}"))
            .spawn_scoped(s, move || {
                nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| NetnsError::Enter(id, e.into()))?;
                Ok(f())
            })
            .map_err(|e| NetnsError::Thread(id, e))?;
        h.join().map_err(|_| NetnsError::Panicked(id))?
    })
}

/// Creates the broker's listening socket, abstract name "\0" + `name`, inside
/// the namespace `ns`. Abstract unix names are scoped by network namespace, so
/// only processes of that namespace can reach it. Non-blocking, close-on-exec.
pub fn make_broker(ns: BorrowedFd<'_>, id: NetnsId, name: &str) -> Result<OwnedFd, NetnsError> {
    let name = name.as_bytes().to_vec();
    run_in(ns, id, move || -> io::Result<OwnedFd> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::SeqPacket,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new_abstract(&name)?;
        use std::os::fd::AsRawFd;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))?;
        Ok(fd)
    })?
    .map_err(|e| NetnsError::Broker(id, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identify_accepts_netns_only() {
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        let id = identify(f.as_fd()).unwrap();
        assert_eq!(id, NetnsId::current().unwrap());
        let f = std::fs::File::open("/proc/self/ns/mnt").unwrap();
        assert!(matches!(identify(f.as_fd()), Err(NetnsError::NotNetns(_))));
        let f = std::fs::File::open("/etc/hostname").unwrap();
        assert!(matches!(identify(f.as_fd()), Err(NetnsError::NotNetns(_))));
    }

    #[test]
    fn run_in_own_namespace_returns_value() {
        let (fd, id) = open_own().unwrap();
        let seen = run_in(fd.as_fd(), id, || NetnsId::current().unwrap()).unwrap();
        assert_eq!(seen, id);
    }
}
