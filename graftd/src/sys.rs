//! The few system calls nix does not wrap the way graftd needs them: raw
//! `socket` with caller-given numbers (they come off the wire after
//! validation; socket options by number are `graft_seccomp::sockopt`),
//! sockaddrs as bytes, the nsfs type query, and closing a batch of
//! descriptors with `close_range`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use nix::sys::socket::{SockaddrLike, SockaddrStorage};

/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// The namespace type (`CLONE_NEW*`) of an nsfs descriptor; fails with
/// `ENOTTY`/`EINVAL` for anything that is not a namespace file.
pub fn ns_type(fd: BorrowedFd<'_>) -> io::Result<libc::c_int> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the descriptor,
    // which is valid for the duration of the borrow.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// `socket(family, sotype | SOCK_CLOEXEC, protocol)` with numbers that were
/// validated by the caller.
pub fn socket(
    family: libc::c_int,
    sotype: libc::c_int,
    protocol: libc::c_int,
) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments.
    let fd = unsafe { libc::socket(family, sotype | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket() returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The raw bytes of a socket address, as the broker reply carries them.
pub fn sockaddr_bytes<A: SockaddrLike>(a: &A) -> Vec<u8> {
    // SAFETY: SockaddrLike guarantees as_ptr() points to len() initialized
    // bytes that live as long as `a`, which outlives this copy.
    unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len() as usize) }.to_vec()
}

/// `getsockname()` as raw sockaddr bytes.
pub fn getsockname(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let a: SockaddrStorage =
        nix::sys::socket::getsockname(fd.as_raw_fd()).map_err(io::Error::from)?;
    Ok(sockaddr_bytes(&a))
}

/// `accept4()` of a pending connection, non-blocking and close-on-exec.
pub fn accept(listener: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: null address pointers are allowed (peer address not wanted).
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: accept4() returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of descriptors the kernel just installed for us
/// (SCM_RIGHTS), so every one of them is closed exactly once.
pub fn own_received(fds: &[RawFd]) -> Vec<OwnedFd> {
    fds.iter()
        .filter(|&&fd| fd >= 0)
        // SAFETY: these descriptors were installed by recvmsg for this process
        // and are referenced nowhere else; wrapping them gives them one owner.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}

/// One record received from a `SOCK_SEQPACKET` peer.
#[derive(Debug)]
pub struct Received {
    /// The record's real length (larger than the buffer when truncated).
    pub len: usize,
    /// The record did not fit the buffer.
    pub truncated: bool,
    /// Ancillary data did not fit (descriptors beyond the space were dropped).
    pub ctrunc: bool,
    /// Descriptors that came with it, each owned once.
    pub fds: Vec<OwnedFd>,
}

/// Receives one record without blocking. `Ok(None)`: the peer closed (a
/// zero-length record is treated the same way: no valid record is empty).
pub fn recv_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Option<Received>> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    // Room for a few descriptors; more set MSG_CTRUNC (and are not installed).
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    if let Ok(cmsgs) = msg.cmsgs() {
        for c in cmsgs {
            if let ControlMessageOwned::ScmRights(raw) = c {
                fds.extend(own_received(&raw));
            }
        }
    }
    let truncated = msg.flags.contains(MsgFlags::MSG_TRUNC);
    let ctrunc = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    if msg.bytes == 0 && !truncated {
        return Ok(None);
    }
    Ok(Some(Received {
        len: msg.bytes,
        truncated,
        ctrunc,
        fds,
    }))
}

/// What reading a connection's next record gave, for a loop serving it.
pub enum Next {
    /// A record arrived.
    Record(Received),
    /// Nothing to read now: serve the others.
    Idle,
    /// The peer closed or the connection failed: drop it.
    Gone,
}

/// Receives a connection's next record without blocking; an interrupted
/// call is retried.
pub fn next_record(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Next {
    loop {
        return match recv_record(fd, buf) {
            Ok(Some(rx)) => Next::Record(rx),
            Ok(None) => Next::Gone,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Next::Idle,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Next::Gone,
        };
    }
}

/// Sends one record (and optionally one descriptor) without blocking; a peer
/// that does not read its replies gets `EAGAIN` here, never a stalled daemon.
/// Closes `fds` (a batch of sockets sent): see `graft_core::fds`.
pub fn close_all(fds: Vec<OwnedFd>) {
    let mut raw: Vec<RawFd> = fds.into_iter().map(IntoRawFd::into_raw_fd).collect();
    graft_core::fds::close_runs(&mut raw);
}

pub fn send_record(fd: BorrowedFd<'_>, data: &[u8], pass: &[BorrowedFd<'_>]) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [io::IoSlice::new(data)];
    let raw: Vec<std::os::fd::RawFd> = pass.iter().map(|p| p.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &rights };
    let n = sendmsg::<()>(
        fd.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if n != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "short send of a record",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn ns_type_tells_netns_from_other_files() {
        let f = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert_eq!(ns_type(f.as_fd()).unwrap(), libc::CLONE_NEWNET);
        let f = std::fs::File::open("/proc/self/ns/uts").unwrap();
        assert_eq!(ns_type(f.as_fd()).unwrap(), libc::CLONE_NEWUTS);
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(ns_type(f.as_fd()).is_err());
    }

    /// Runs and single numbers alike are closed, and nothing else: another
    /// test's thread may take a closed number at once, so "closed" is "no
    /// longer the same file".
    #[test]
    fn close_all_closes_exactly_its_descriptors() {
        let files: Vec<OwnedFd> = (0..7)
            .map(|_| OwnedFd::from(std::os::unix::net::UnixDatagram::unbound().unwrap()))
            .collect();
        let ino = |fd: RawFd| nix::sys::stat::fstat(fd).ok().map(|s| (s.st_dev, s.st_ino));
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let before: Vec<_> = raw.iter().map(|&fd| ino(fd)).collect();
        let mut files: Vec<Option<OwnedFd>> = files.into_iter().map(Some).collect();
        let kept = [files[2].take().unwrap(), files[5].take().unwrap()];
        let mut given: Vec<OwnedFd> = files.into_iter().flatten().collect();
        given.reverse();
        close_all(given);
        for (i, &fd) in raw.iter().enumerate() {
            let same = ino(fd) == before[i] && before[i].is_some();
            assert_eq!(same, i == 2 || i == 5, "{fd}");
        }
        drop(kept);
    }

    #[test]
    fn sockaddr_bytes_of_inet() {
        let a = nix::sys::socket::SockaddrIn::new(127, 0, 0, 1, 8080);
        let b = sockaddr_bytes(&a);
        assert_eq!(b.len(), std::mem::size_of::<libc::sockaddr_in>());
        assert_eq!(u16::from_ne_bytes([b[0], b[1]]), libc::AF_INET as u16);
        assert_eq!(&b[2..8], &[0x1f, 0x90, 127, 0, 0, 1]);
    }
}
