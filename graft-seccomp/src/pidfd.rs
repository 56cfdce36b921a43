//! Reaching into the trapped process: its descriptors (`pidfd_getfd`) and
//! its memory (`process_vm_readv`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn owned(rc: libc::c_long) -> io::Result<OwnedFd> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this new descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(rc as libc::c_int) })
}

/// `pidfd_open(pid)`: a handle on process `pid` that cannot be confused
/// with a later process reusing the number.
pub fn open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })
}

/// A pidfd for thread `tid` (`PIDFD_THREAD`, Linux 6.9); on older kernels
/// for its thread group leader, read from `/proc/TID/status` (the caller
/// checks with `id_valid` afterwards that `tid` was not reused meanwhile).
pub fn open_thread(tid: libc::pid_t) -> io::Result<OwnedFd> {
    const PIDFD_THREAD: libc::c_int = libc::O_EXCL;
    // SAFETY: integer arguments only.
    match owned(unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) }) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        r => return r,
    }
    let status = std::fs::read_to_string(format!("/proc/{tid}/status"))?;
    let tgid = status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
    open(tgid)
}

/// The start time of process `pid` (field 22 of `/proc/PID/stat`, clock
/// ticks after boot): with the pid, it names one process for good.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields count from the
    // last ')'; after it come field 3 (state) onwards.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `pidfd_getfd`: a duplicate of the process's descriptor `fd` (same open
/// file description), close-on-exec in this process.
pub fn getfd(pidfd: BorrowedFd<'_>, fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) })
}

/// Reads `buf.len()` bytes at `addr` in process `pid`; returns how many
/// were read (short when the range ends in unmapped memory).
pub fn read_mem(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` describes `buf`, writable for its length; the remote
    // range is only read by the kernel, with the other process's checks.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The pidfd of a unix socket's peer (`SO_PEERPIDFD`, Linux 6.5), falling
/// back to `pidfd_open` of `SO_PEERCRED`'s pid on older kernels.
pub fn of_peer(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const SO_PEERPIDFD: libc::c_int = 77;
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: fd and len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && fd >= 0 {
        // SAFETY: SO_PEERPIDFD installed a new descriptor for us alone.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of their sizes.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if cred.pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    open(cred.pid)
}

/// The network namespace a socket belongs to (`SIOCGSKNS`), as an nsfs fd.
pub fn socket_netns(sock: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    const SIOCGSKNS: libc::c_ulong = 0x894c;
    // SAFETY: SIOCGSKNS takes no argument and returns a new descriptor.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGSKNS) };
    owned(rc as libc::c_long)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn start_time_names_a_live_process_only() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(t > 0);
        assert_eq!(start_time(me), Some(t));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn own_descriptor_and_memory() {
        let me = open(std::process::id() as i32).unwrap();
        let f = std::fs::File::open("/proc/self/stat").unwrap();
        let dup = getfd(me.as_fd(), f.as_raw_fd()).unwrap();
        assert_ne!(dup.as_raw_fd(), f.as_raw_fd());
        let src = *b"graft seccomp";
        let mut buf = [0u8; 13];
        let n = read_mem(std::process::id() as i32, src.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!((n, buf), (13, src));
        assert!(getfd(me.as_fd(), 100_000).is_err());
    }
}
