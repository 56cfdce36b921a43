//! The listener side: receive a trapped call, check it is still pending,
//! put a descriptor into the trapped process, answer.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

const IOCTL_NOTIF_RECV: libc::c_ulong = 0xc050_2100;
const IOCTL_NOTIF_SEND: libc::c_ulong = 0xc018_2101;
const IOCTL_NOTIF_ID_VALID: libc::c_ulong = 0x4008_2102;
const IOCTL_NOTIF_ADDFD: libc::c_ulong = 0x4018_2103;
const IOCTL_NOTIF_SET_FLAGS: libc::c_ulong = 0x4008_2104;
const USER_NOTIF_FD_SYNC_WAKE_UP: u64 = 1;
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

/// Asks the kernel (Linux 6.6) to hand each trapped call to the thread
/// waiting in [`recv`] on the trapping thread's own CPU, and the answer back
/// the same way: the caller sleeps while graftd decides, so the two take
/// turns on one CPU instead of waking each other across CPUs, which costs
/// more than the work itself on a small VM. Only a thread blocked in
/// `recv` gets this (not one in `poll`). `false`: an older kernel.
pub fn sync_wake_up(listener: BorrowedFd<'_>) -> bool {
    // SAFETY: this request takes its argument (the flags) by value.
    let rc = unsafe {
        libc::ioctl(
            listener.as_raw_fd(),
            IOCTL_NOTIF_SET_FLAGS,
            USER_NOTIF_FD_SYNC_WAKE_UP,
        )
    };
    rc == 0
}

/// What a listener has, as `poll` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// A trapped call to [`recv`].
    Call,
    /// Nothing yet (only without waiting).
    Nothing,
    /// Every process under the filter is gone: nothing more will come (a
    /// blocked [`recv`] returns `ENOENT` then, on Linux 6.11 and later).
    Orphaned,
}

/// Looks at the listener; with `wait`, until there is a call or none can
/// come (`EINTR` when a signal came first).
pub fn pending(listener: BorrowedFd<'_>, wait: bool) -> io::Result<Pending> {
    let mut p = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd, count 1.
    let rc = unsafe { libc::poll(&mut p, 1, if wait { -1 } else { 0 }) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if p.revents & libc::POLLIN != 0 {
        Pending::Call
    } else if rc == 1 {
        Pending::Orphaned
    } else {
        Pending::Nothing
    })
}

/// Whether a thread blocked in [`recv`] returns (`ENOENT`) once every
/// process under the filter is gone, as on Linux 6.11 and later. Before,
/// only `poll` hears of it, so a supervisor that waits in `recv` (as
/// [`sync_wake_up`] needs) would sleep forever after its program exited.
/// Found out on a throwaway filter: a thread installs it and exits, another
/// waits in `recv` on its listener. Up to `wait`; on a kernel that fails the
/// test, that waiting thread stays asleep for good (one, once).
pub fn recv_ends_when_orphaned(wait: std::time::Duration) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let installer = std::thread::Builder::new()
        .name("seccomp-probe".into())
        .spawn(crate::filter::install_silent);
    let Ok(Ok(listener)) = installer.map(|t| t.join()) else {
        return false;
    };
    let Ok(listener) = listener else {
        return false;
    };
    let waiter = std::thread::Builder::new()
        .name("seccomp-probe".into())
        .spawn(move || {
            let r = recv(listener.as_fd());
            let _ = tx.send(r.err().and_then(|e| e.raw_os_error()));
        });
    waiter.is_ok() && rx.recv_timeout(wait) == Ok(Some(libc::ENOENT))
}

/// Waits for the next trapped call (blocking; see [`pending`] for a
/// bounded wait). `ENOENT`: the caller died before it could be read.
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
        assert_eq!(size(IOCTL_NOTIF_SET_FLAGS), 8);
    }

    fn kernel_at_least(major: u32, minor: u32) -> bool {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = r
            .trim()
            .split(['.', '-'])
            .map(|x| x.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (major, minor)
    }

    #[test]
    fn the_probe_finds_what_the_kernel_does() {
        let ends = recv_ends_when_orphaned(std::time::Duration::from_secs(5));
        if kernel_at_least(6, 11) {
            assert!(ends, "Linux 6.11+ ends a recv whose filter has no users");
        } else {
            println!("the probe says {ends} on a kernel before 6.11");
        }
    }

    #[test]
    fn a_listener_takes_the_same_cpu_hand_over_and_shows_its_end() {
        let l = std::thread::spawn(crate::filter::install_silent)
            .join()
            .expect("installer thread")
            .expect("filter installed");
        if kernel_at_least(6, 6) {
            assert!(
                sync_wake_up(l.as_fd()),
                "Linux 6.6+ has SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP"
            );
        }
        // The installing thread is gone (the kernel lets go of its filter
        // just after join returns): no process is under the filter.
        let orphaned = || pending(l.as_fd(), false).ok() == Some(Pending::Orphaned);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !orphaned() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(orphaned());
        if kernel_at_least(6, 11) {
            let e = recv(l.as_fd()).expect_err("nothing can be trapped any more");
            assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
        }
    }
}
