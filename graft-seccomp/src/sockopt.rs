//! Socket options by number (levels and names come off the wire, after
//! validation, or from [`graft_core::sockopt::SNAPSHOT`]), with opaque
//! values. graftd's supervisor reads the trapped program's options with
//! these, its socket factory applies them, graft-ebpf reads a registered
//! socket's cookie and family, and graft-ebpf's tests set the options its
//! hooks refuse.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `getsockopt` into `buf`; returns the length the kernel wrote.
pub fn get(
    sock: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = buf.len() as libc::socklen_t;
    let (fd, value) = (sock.as_raw_fd(), buf.as_mut_ptr().cast());
    // SAFETY: buf is writable for len bytes; the kernel writes at most len.
    if unsafe { libc::getsockopt(fd, level, name, value, &mut len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((len as usize).min(buf.len()))
}

/// An int socket option.
pub fn get_int(
    sock: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut b = [0u8; 4];
    get(sock, level, name, &mut b)?;
    Ok(libc::c_int::from_ne_bytes(b))
}

/// `setsockopt(sock, level, name, value)`.
pub fn set(
    sock: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let (fd, len) = (sock.as_raw_fd(), value.len() as libc::socklen_t);
    // SAFETY: value points to len readable bytes for the whole call; the
    // kernel copies at most len bytes from it.
    if unsafe { libc::setsockopt(fd, level, name, value.as_ptr().cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
