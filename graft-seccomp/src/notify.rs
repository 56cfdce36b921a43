//! The listener side: receive a trapped call, check it is still pending,
//! put a descriptor into the trapped process, answer.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const IOCTL_NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;
const IOCTL_NOTIF_ADDFD: libc::c_ulong = 0x4018_2103;
const USER_NOTIF_FLAG_CONTINUE: u32 = 1;
const ADDFD_FLAG_SETFD: u32 = 1;

/// struct seccomp_data.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Data {
    pub nr: i32,
    pub arch: u32,
    pub instruction_pointer: u64,
    pub args: [u64; 6],
}

/// struct seccomp_notif: one trapped call.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Notif {
    pub id: u64,
    /// The caller's thread id, in the receiver's pid namespace.
    pub pid: u32,
    pub flags: u32,
    pub data: Data,
}

#[repr(C)]
struct Resp {
    id: u64,
    val: i64,
    error: i32,
    flags: u32,
}

#[repr(C)]
struct AddFd {
    id: u64,
    flags: u32,
    srcfd: u32,
    newfd: u32,
    newfd_flags: u32,
}

fn ioctl<T>(fd: BorrowedFd<'_>, req: libc::c_ulong, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: every caller passes a pointer to a live, correctly sized
    // repr(C) value matching the request's size encoded in `req`.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Waits for the next trapped call (blocking; poll the listener first for
/// a bounded wait). `ENOENT`: the caller died before it could be read.
pub fn recv(listener: BorrowedFd<'_>) -> io::Result<Notif> {
    // The kernel wants the buffer zeroed.
    let mut n = Notif::default();
    ioctl(listener, IOCTL_NOTIF_RECV, &mut n)?;
    Ok(n)
}

/// Whether the call `id` is still waiting for its answer: after reading the
/// caller's memory or opening its pidfd, this proves the pid was not reused.
pub fn id_valid(listener: BorrowedFd<'_>, id: u64) -> bool {
    let mut id = id;
    ioctl(listener, IOCTL_NOTIF_ID_VALID, &mut id).is_ok()
}

fn send(listener: BorrowedFd<'_>, mut r: Resp) -> io::Result<()> {
    ioctl(listener, IOCTL_NOTIF_SEND, &mut r).map(|_| ())
}

/// Lets the trapped call run in the kernel as if it had not been trapped.
pub fn continue_call(listener: BorrowedFd<'_>, id: u64) -> io::Result<()> {
    send(
        listener,
        Resp {
            id,
            val: 0,
            error: 0,
            flags: USER_NOTIF_FLAG_CONTINUE,
        },
    )
}

/// Completes the trapped call with return value `val` (it does not run).
pub fn complete(listener: BorrowedFd<'_>, id: u64, val: i64) -> io::Result<()> {
    send(
        listener,
        Resp {
            id,
            val,
            error: 0,
            flags: 0,
        },
    )
}

/// Fails the trapped call with `errno` (it does not run).
pub fn fail(listener: BorrowedFd<'_>, id: u64, errno: i32) -> io::Result<()> {
    send(
        listener,
        Resp {
            id,
            val: 0,
            error: -errno,
            flags: 0,
        },
    )
}

/// Installs `src` in the trapped process as descriptor number `target`,
/// replacing (and closing) what was there, like `dup3`.
pub fn install_fd(
    listener: BorrowedFd<'_>,
    id: u64,
    src: BorrowedFd<'_>,
    target: i32,
    cloexec: bool,
) -> io::Result<()> {
    let mut a = AddFd {
        id,
        flags: ADDFD_FLAG_SETFD,
        srcfd: src.as_raw_fd() as u32,
        newfd: target as u32,
        newfd_flags: if cloexec { libc::O_CLOEXEC as u32 } else { 0 },
    };
    ioctl(listener, IOCTL_NOTIF_ADDFD, &mut a).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_ioctl_numbers() {
        // _IOWR/_IOW encode the argument size in bits 16..30.
        let size = |req: libc::c_ulong| ((req >> 16) & 0x3fff) as usize;
        assert_eq!(size(IOCTL_NOTIF_RECV), std::mem::size_of::<Notif>());
        assert_eq!(size(IOCTL_NOTIF_SEND), std::mem::size_of::<Resp>());
        assert_eq!(size(IOCTL_NOTIF_ID_VALID), 8);
        assert_eq!(size(IOCTL_NOTIF_ADDFD), std::mem::size_of::<AddFd>());
    }
}
