//! The exported C functions that shadow libc's, and the constructor.
//!
//! Each one is a thin shell: a relaxed load or two decides whether there is
//! anything to do at all; if so the decision runs in [`crate::decide`] (safe
//! code) under `catch_unwind`, with errno saved on entry and restored on every
//! success path.

use std::cell::Cell;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};

use libc::{c_int, c_uint, c_ulong, c_void, mmsghdr, msghdr, size_t, sockaddr, socklen_t, ssize_t};

use crate::decide::{self, Call, Next};
use crate::early;
use crate::sys::{self, errno, set_errno};
use crate::{addr, config, table};

thread_local! {
    /// Set while this thread runs the library's own initialization (dlsym,
    /// reading the environment, allocating the configuration): anything
    /// those call back into passes straight through.
    static INSIDE: Cell<bool> = const { Cell::new(false) };
}

#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn() = constructor;

extern "C" fn constructor() {
    INSIDE.set(true);
    let _ = catch_unwind(|| {
        sys::cache_pid();
        sys::resolve_all();
        crate::trampoline::map();
        config::init();
        if config::active() {
            inherited_connections();
        }
    });
    // SAFETY: the handlers only touch atomics and make raw system calls
    // (the child's closes its pooled sockets), valid in any state of
    // either process.
    unsafe { libc::pthread_atfork(None, Some(after_fork), Some(after_fork_child)) };
    INSIDE.set(false);
}

/// TCP connections the process inherited across exec (an inetd-style child
/// reading its stdin, a program re-executing itself) are connected sockets
/// like the ones `accept` gives: recorded as such now, so that a spliced
/// one's receives are repeated and `fdopen` gives it a stream of ours, as
/// in the process that made it. A few system calls per inherited
/// descriptor, once.
fn inherited_connections() {
    sys::sys_each_open_fd(decide::connection_seen);
    if table::state(0) == table::LOCAL {
        crate::stdio::adopt_stdin();
    }
}

/// After a recvmsg that returned control data: TCP connections received
/// over SCM_RIGHTS (a server handing accepted connections to a worker
/// process) are recorded as connections, as inherited ones are.
///
/// # Safety
/// `msg` is the caller's msghdr that the kernel just filled.
#[cold]
#[inline(never)]
unsafe fn received_connections(msg: *const msghdr) {
    let saved = errno();
    // SAFETY: the kernel filled msg_control up to msg_controllen; the CMSG
    // macros stay inside it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<c_int>();
                let n = ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<c_int>();
                for i in 0..n {
                    decide::connection_seen(std::ptr::read_unaligned(data.add(i)));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    set_errno(saved);
}

/// After fork(), in parent and child: sockets made before are shared with
/// the other process, which may set options on them that this one never
/// sees, so their option records stop being trusted.
extern "C" fn after_fork() {
    table::forked();
}

/// After fork(), in the child: as [`after_fork`], and the pooled egress
/// sockets are the parent's, so the child's copies are closed.
extern "C" fn after_fork_child() {
    table::forked();
    crate::pool::forked_child();
}

/// Runs a decision; a panic (a bug) fails the call rather than unwinding
/// into C.
fn decide(f: impl FnOnce() -> Next) -> Next {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(Next::Fail(libc::EIO))
}

/// Copies the caller's address and parses it; `None` for anything that is
/// not AF_INET/AF_INET6 (or too short).
///
/// # Safety
/// `p` must be null or point at `len` readable bytes (the caller's contract
/// with the kernel).
unsafe fn read_addr(p: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if p.is_null() || len < 2 {
        return None;
    }
    let n = (len as usize).min(addr::MAX);
    let mut b = [0u8; addr::MAX];
    // SAFETY: the caller promised `len` readable bytes at `p`; we read at most
    // that many into our own buffer.
    unsafe { std::ptr::copy_nonoverlapping(p.cast::<u8>(), b.as_mut_ptr(), n) };
    addr::parse(&b[..n])
}

/// Applies a decision around the real call `real` (which returns 0 on success).
fn finish(fd: c_int, next: Next, saved: c_int, real: impl FnOnce() -> c_int) -> c_int {
    match next {
        Next::Real => {
            set_errno(saved);
            real()
        }
        Next::RealThenSet(st, sa) => {
            set_errno(saved);
            let r = real();
            if r == 0 {
                let e = errno();
                match sa {
                    Some(sa) => table::set_with_addr(fd, st, &addr::encode(&sa).0),
                    None => table::set(fd, st),
                }
                set_errno(e);
            }
            r
        }
        Next::Done => {
            set_errno(saved);
            0
        }
        Next::Fail(e) => {
            set_errno(e);
            -1
        }
    }
}

/// Whether `fd` still needs an egress decision.
#[inline(always)]
fn undecided(fd: c_int) -> bool {
    matches!(
        table::state(fd),
        table::UNKNOWN | table::CANDIDATE | table::PORT0 | table::EARLY
    )
}

/// Egress decision for a send with destination `sa`; returns the errno to
/// fail with, if any.
fn send_decision(call: Call, fd: c_int, sa: SocketAddr) -> Option<c_int> {
    if INSIDE.get() {
        return None;
    }
    let saved = errno();
    match decide(|| decide::on_connect(call, fd, sa)) {
        Next::Fail(e) => Some(e),
        _ => {
            set_errno(saved);
            None
        }
    }
}

/// # Safety
/// socket(2).
#[no_mangle]
pub unsafe extern "C" fn socket(domain: c_int, ty: c_int, proto: c_int) -> c_int {
    let active = config::active() && !INSIDE.get();
    let saved = errno();
    if active {
        let early = catch_unwind(|| early::socket(domain, ty, proto))
            .ok()
            .flatten();
        if let Some(fd) = early {
            set_errno(saved);
            return fd;
        }
        set_errno(saved);
    }
    // SAFETY: forwarded unchanged.
    let fd = unsafe { sys::socket(domain, ty, proto) };
    if fd >= 0 && active {
        decide::socket_made(fd, domain, ty, proto);
        set_errno(saved);
    }
    fd
}

/// # Safety
/// setsockopt(2).
#[no_mangle]
pub unsafe extern "C" fn setsockopt(
    fd: c_int,
    level: c_int,
    name: c_int,
    val: *const c_void,
    len: socklen_t,
) -> c_int {
    // SAFETY: forwarded unchanged.
    let real = || unsafe { sys::setsockopt(fd, level, name, val, len) };
    // Only sockets our socket() made and not decided yet keep a record
    // (with no rules there are none): everything else, grafted sockets
    // included, pays this one table load.
    let mut st = table::state(fd);
    if st == table::EARLY && !early::keeps_option(level, name) {
        let saved = errno();
        match catch_unwind(|| early::ungraft(fd)) {
            Ok(Ok(())) => set_errno(saved),
            Ok(Err(e)) => {
                set_errno(e);
                return -1;
            }
            Err(_) => {
                set_errno(libc::EIO);
                return -1;
            }
        }
        st = table::CANDIDATE;
    }
    if !matches!(st, table::CANDIDATE | table::PORT0 | table::EARLY) {
        if table::is_unix(st)
            && matches!(
                level,
                libc::IPPROTO_TCP | libc::IPPROTO_IP | libc::IPPROTO_IPV6
            )
        {
            // The program thinks it holds a TCP socket; on the unix socket
            // behind it TCP_NODELAY, keepalive timers, TOS ... mean nothing.
            return 0;
        }
        return real();
    }
    let r = real();
    if r == 0 {
        // Recorded only once the kernel took it, so a refused option is
        // not read back; no system call here, so errno is untouched.
        decide::option_set(fd, level, name);
    }
    r
}

/// # Safety
/// bind(2).
#[no_mangle]
pub unsafe extern "C" fn bind(fd: c_int, a: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwarded unchanged.
    let real = || unsafe { sys::bind(fd, a, len) };
    if !config::active() || INSIDE.get() {
        return real();
    }
    // SAFETY: the caller's pointer and length, as bind(2) takes them.
    let Some(sa) = (unsafe { read_addr(a, len) }) else {
        return real();
    };
    let saved = errno();
    let next = decide(|| decide::on_bind(fd, sa));
    finish(fd, next, saved, real)
}

/// # Safety
/// listen(2).
#[no_mangle]
pub unsafe extern "C" fn listen(fd: c_int, backlog: c_int) -> c_int {
    if !config::active()
        || INSIDE.get()
        || !matches!(
            table::state(fd),
            table::UNKNOWN | table::CANDIDATE | table::PORT0 | table::EARLY
        )
    {
        return sys::listen(fd, backlog);
    }
    let saved = errno();
    let next = decide(|| decide::on_listen(fd));
    finish(fd, next, saved, || sys::listen(fd, backlog))
}

/// # Safety
/// connect(2).
#[no_mangle]
pub unsafe extern "C" fn connect(fd: c_int, a: *const sockaddr, len: socklen_t) -> c_int {
    // SAFETY: forwarded unchanged.
    let real = || unsafe { sys::connect(fd, a, len) };
    if !config::active() || !undecided(fd) || INSIDE.get() {
        return real();
    }
    // SAFETY: the caller's pointer and length, as connect(2) takes them.
    let Some(sa) = (unsafe { read_addr(a, len) }) else {
        return real();
    };
    let saved = errno();
    let next = decide(|| decide::on_connect(Call::Connect, fd, sa));
    finish(fd, next, saved, real)
}

/// # Safety
/// sendto(2).
#[no_mangle]
pub unsafe extern "C" fn sendto(
    fd: c_int,
    buf: *const c_void,
    n: size_t,
    flags: c_int,
    a: *const sockaddr,
    len: socklen_t,
) -> ssize_t {
    if !a.is_null() && config::active() && undecided(fd) {
        // SAFETY: the caller's pointer and length, as sendto(2) takes them.
        if let Some(sa) = unsafe { read_addr(a, len) } {
            if let Some(e) = send_decision(Call::Sendto, fd, sa) {
                set_errno(e);
                return -1;
            }
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { sys::sendto(fd, buf, n, flags, a, len) }
}

/// # Safety
/// sendmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmsg(fd: c_int, msg: *const msghdr, flags: c_int) -> ssize_t {
    if !msg.is_null() && config::active() && undecided(fd) {
        // SAFETY: msg is non-null and, per sendmsg(2), points at a msghdr.
        let (name, namelen) = unsafe { ((*msg).msg_name, (*msg).msg_namelen) };
        // SAFETY: msg_name/msg_namelen describe the destination, per sendmsg(2).
        if let Some(sa) = unsafe { read_addr(name.cast(), namelen) } {
            if let Some(e) = send_decision(Call::Sendmsg, fd, sa) {
                set_errno(e);
                return -1;
            }
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { sys::sendmsg(fd, msg, flags) }
}

/// # Safety
/// sendmmsg(2).
#[no_mangle]
pub unsafe extern "C" fn sendmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int {
    if !v.is_null() && config::active() && undecided(fd) {
        for i in 0..n as usize {
            // SAFETY: per sendmmsg(2), v points at n mmsghdr records.
            let (name, namelen) = unsafe {
                let h = &(*v.add(i)).msg_hdr;
                (h.msg_name, h.msg_namelen)
            };
            if name.is_null() {
                continue;
            }
            // SAFETY: msg_name/msg_namelen describe the destination.
            if let Some(sa) = unsafe { read_addr(name.cast(), namelen) } {
                if let Some(e) = send_decision(Call::Sendmmsg, fd, sa) {
                    set_errno(e);
                    return -1;
                }
            }
            break;
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { sys::sendmmsg(fd, v, n, flags) }
}

/// Writes `b` into the caller's address buffer as the kernel would:
/// at most `cap` bytes, the full length in `*len`.
///
/// # Safety
/// `a` must have `cap` writable bytes and `len` must be writable (the
/// caller's contract with the kernel, already checked non-null).
unsafe fn give_addr(a: *mut sockaddr, len: *mut socklen_t, cap: socklen_t, b: &[u8]) {
    let copy = b.len().min(cap as usize);
    // SAFETY: per this function's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(b.as_ptr(), a.cast::<u8>(), copy);
        *len = b.len() as socklen_t;
    }
}

/// A unix-backed socket's INET name (see [`decide::unix_name`]) into the
/// caller's buffer, after the real call succeeded.
///
/// # Safety
/// As [`give_addr`], `a` and `len` may be null.
unsafe fn unix_name_out(
    fd: c_int,
    st: u32,
    peer: bool,
    a: *mut sockaddr,
    len: *mut socklen_t,
    cap: socklen_t,
) {
    if a.is_null() || len.is_null() {
        return;
    }
    if let Ok(Some((b, n))) = catch_unwind(|| decide::unix_name(fd, st, peer)) {
        // SAFETY: the caller's buffer and length, non-null.
        unsafe { give_addr(a, len, cap, &b[..n]) };
    }
}

/// After a successful real getsockname/getpeername: [`unix_name_out`] when
/// `fd` is unix-backed. Whether it is (then the answer is complete).
///
/// # Safety
/// As [`give_addr`], `a` and `len` may be null.
unsafe fn unix_name_answer(
    fd: c_int,
    peer: bool,
    a: *mut sockaddr,
    len: *mut socklen_t,
    cap: socklen_t,
) -> bool {
    if !config::active() {
        return false;
    }
    let st = table::state(fd);
    if !table::is_unix(st) {
        return false;
    }
    // SAFETY: forwarded contract.
    unsafe { unix_name_out(fd, st, peer, a, len, cap) };
    true
}

/// # Safety
/// getpeername(2).
#[no_mangle]
pub unsafe extern "C" fn getpeername(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's len pointer, read before the call as the kernel does.
    let cap = if len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: forwarded unchanged.
    let r = unsafe { sys::getpeername(fd, a, len) };
    if r == 0 {
        // SAFETY: the caller's buffer, as getpeername(2) takes it.
        unsafe { unix_name_answer(fd, true, a, len, cap) };
    }
    r
}

/// # Safety
/// getsockname(2).
#[no_mangle]
pub unsafe extern "C" fn getsockname(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's len pointer, read before the call as the kernel does.
    let cap = if len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: forwarded unchanged.
    let r = unsafe { sys::getsockname(fd, a, len) };
    // SAFETY: the caller's buffer, as getsockname(2) takes it.
    if r == 0 && unsafe { unix_name_answer(fd, false, a, len, cap) } {
        return r;
    }
    if r != 0 || a.is_null() || len.is_null() || !config::getsockname_app() {
        return r;
    }
    if table::state(fd) != table::INGRESS {
        return r;
    }
    let saved = errno();
    let app = catch_unwind(|| {
        let (b, n) = sys::sys_sockname(fd, false).ok()?;
        decide::app_sockname(fd, &b[..n])
    })
    .ok()
    .flatten();
    if let Some((b, n)) = app {
        let copy = n.min(cap as usize);
        // SAFETY: the caller gave `cap` writable bytes at `a` and a writable
        // `len`, as getsockname(2) requires; we write at most `cap` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), a.cast::<u8>(), copy);
            *len = n as socklen_t;
        }
    }
    set_errno(saved);
    r
}

/// setns(2). A thread that changes namespace stops being given sockets
/// grafted as they are made for its old one.
#[no_mangle]
pub extern "C" fn setns(fd: c_int, nstype: c_int) -> c_int {
    early::netns_changed();
    sys::setns(fd, nstype)
}

/// unshare(2), as [`setns`].
#[no_mangle]
pub extern "C" fn unshare(flags: c_int) -> c_int {
    early::netns_changed();
    sys::unshare(flags)
}

/// # Safety
/// close(2).
#[no_mangle]
pub unsafe extern "C" fn close(fd: c_int) -> c_int {
    if config::active() {
        table::reset(fd);
    }
    sys::close(fd)
}

fn copied(from: c_int, r: c_int) -> c_int {
    if r >= 0 && r != from && config::active() {
        let saved = errno();
        table::copy(from, r);
        set_errno(saved);
    }
    r
}

/// # Safety
/// dup(2).
#[no_mangle]
pub unsafe extern "C" fn dup(fd: c_int) -> c_int {
    copied(fd, sys::dup(fd))
}

/// # Safety
/// dup2(2).
#[no_mangle]
pub unsafe extern "C" fn dup2(old: c_int, new: c_int) -> c_int {
    copied(old, sys::dup2(old, new))
}

/// # Safety
/// dup3(2).
#[no_mangle]
pub unsafe extern "C" fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int {
    copied(old, sys::dup3(old, new, flags))
}

/// # Safety
/// fcntl(2). Declared with one unsigned-long argument: on the supported
/// targets an int or pointer third argument arrives in the same register.
#[no_mangle]
pub unsafe extern "C" fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { sys::fcntl(fd, cmd, arg, false) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        return copied(fd, r);
    }
    r
}

/// # Safety
/// fcntl(2) (the LFS name C programs built with _FILE_OFFSET_BITS=64 call).
#[no_mangle]
pub unsafe extern "C" fn fcntl64(fd: c_int, cmd: c_int, arg: c_ulong) -> c_int {
    // SAFETY: forwarded unchanged.
    let r = unsafe { sys::fcntl(fd, cmd, arg, true) };
    if cmd == libc::F_DUPFD || cmd == libc::F_DUPFD_CLOEXEC {
        return copied(fd, r);
    }
    r
}

/// After accept on `fd` returned `r`; `a`/`len`/`cap` are the caller's
/// address buffer.
///
/// # Safety
/// `a` null or with `cap` writable bytes, `len` null or writable.
unsafe fn accepted(
    fd: c_int,
    r: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
    cap: socklen_t,
) -> c_int {
    if r >= 0 && config::active() {
        let saved = errno();
        if table::state(fd) == table::UNIX_LISTEN {
            // The program gets a TCP-looking connection: its local address
            // is the listener's, its peer a loopback address.
            table::set_with_addr(r, table::UNIX_PEER, &table::addr(fd));
            // SAFETY: the caller's buffer, as accept(2) takes it.
            unsafe { unix_name_out(r, table::UNIX_PEER, true, a, len, cap) };
        } else {
            // A connection is never grafted again: keep sends on it on the fast path.
            table::set(r, table::LOCAL);
        }
        set_errno(saved);
    }
    r
}

/// # Safety
/// accept(2).
#[no_mangle]
pub unsafe extern "C" fn accept(fd: c_int, a: *mut sockaddr, len: *mut socklen_t) -> c_int {
    // SAFETY: the caller's len pointer, read before the call as the kernel does.
    let cap = if len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: forwarded unchanged; then the caller's own buffer.
    unsafe { accepted(fd, sys::accept(fd, a, len), a, len, cap) }
}

/// # Safety
/// accept4(2).
#[no_mangle]
pub unsafe extern "C" fn accept4(
    fd: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's len pointer, read before the call as the kernel does.
    let cap = if len.is_null() { 0 } else { unsafe { *len } };
    // SAFETY: forwarded unchanged; then the caller's own buffer.
    unsafe { accepted(fd, sys::accept4(fd, a, len, flags), a, len, cap) }
}

/// What to do after a receive failed with EAGAIN ([`after_eagain`]).
enum Eagain {
    /// An answer the program can expect: return it.
    Return,
    /// A blocking socket woke without data: receive again, as TCP would
    /// have gone on waiting.
    Repeat,
    /// As `Repeat`, but a signal may have woken it and a handler without
    /// `SA_RESTART` is installed: fail with EINTR, as TCP would have.
    Interrupted,
}

/// Whether a receive that failed with EAGAIN must be repeated: the socket is
/// blocking, the call did not ask not to wait (`MSG_DONTWAIT`) and no receive
/// timeout is set, so EAGAIN is not an answer the program can expect. The
/// kernel's sockmap receive path (`tcp_bpf_recvmsg`, which spliced sockets
/// take: graftd splices grafted pairs by default) returns it after any
/// wake-up that brought no data (seen on 6.18): another thread's send on
/// the same socket freeing memory, the ACK of the socket's own FIN, and
/// every signal delivered while it waits, where TCP restarts the call
/// (`SA_RESTART`) or fails with EINTR. Which of these woke it cannot be told afterwards, so the receive
/// is repeated unless a handler without `SA_RESTART` is installed: then
/// EINTR, which such a program must expect from any blocking call. Only
/// sockets the library knows (made by this process's `socket()`, grafted,
/// or accepted) are looked at; the checks cost a few system calls (up to
/// 64 more when the program has signal handlers), paid only on that error
/// path.
#[cold]
#[inline(never)]
fn after_eagain(fd: c_int, flags: c_int) -> Eagain {
    let e = errno();
    if (e != libc::EAGAIN && e != libc::EWOULDBLOCK)
        || flags & libc::MSG_DONTWAIT != 0
        || !config::active()
        || !matches!(
            table::state(fd),
            table::INGRESS | table::EGRESS | table::LOCAL
        )
    {
        return Eagain::Return;
    }
    let blocking = matches!(sys::sys_fcntl(fd, libc::F_GETFL, 0), Ok(fl) if fl & libc::O_NONBLOCK == 0)
        && sys::sys_rcvtimeo_unset(fd);
    let what = if !blocking {
        Eagain::Return
    } else if sys::sys_interrupting_handler() {
        Eagain::Interrupted
    } else {
        Eagain::Repeat
    };
    set_errno(if matches!(what, Eagain::Interrupted) {
        libc::EINTR
    } else {
        e
    });
    what
}

/// `call`, one receive on `fd` with `flags`, repeated while it fails with
/// an EAGAIN that a blocking socket must not return ([`after_eagain`]).
#[inline(always)]
fn repeated(fd: c_int, flags: c_int, mut call: impl FnMut() -> ssize_t) -> ssize_t {
    loop {
        let r = call();
        if r >= 0 {
            return r;
        }
        match after_eagain(fd, flags) {
            Eagain::Repeat => continue,
            Eagain::Return | Eagain::Interrupted => return r,
        }
    }
}

/// # Safety
/// read(2).
#[no_mangle]
pub unsafe extern "C" fn read(fd: c_int, buf: *mut c_void, n: size_t) -> ssize_t {
    // SAFETY: forwarded unchanged.
    repeated(fd, 0, || unsafe { sys::read(fd, buf, n) })
}

/// # Safety
/// recv(2).
#[no_mangle]
pub unsafe extern "C" fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged; then the rest of the caller's buffer.
    let r = repeated(fd, flags, || unsafe { sys::recv(fd, buf, n, flags) });
    // SAFETY: `at < n`, inside the caller's buffer of n bytes.
    wait_all(fd, flags, r, n, |at| unsafe {
        sys::recv(fd, buf.cast::<u8>().add(at).cast(), n - at, flags)
    })
}

/// A receive of `n` bytes with `MSG_WAITALL` that got `r`: what the kernel
/// does for TCP (wait for all `n`, less only at EOF, an error or a signal)
/// but not for a spliced socket, whose sockmap receive returns what is
/// queued. On such a socket (one the library knows, blocking for this
/// call) the rest is received with `more(bytes so far)`, each receive
/// repeated as [`repeated`] does; what came is returned, with errno as
/// before, when one ends early.
#[inline(always)]
fn wait_all(
    fd: c_int,
    flags: c_int,
    r: ssize_t,
    n: size_t,
    more: impl FnMut(usize) -> ssize_t,
) -> ssize_t {
    if r <= 0 || flags & libc::MSG_WAITALL == 0 || r as usize >= n {
        return r;
    }
    rest_of(fd, flags, r as usize, n, more)
}

#[cold]
#[inline(never)]
fn rest_of(
    fd: c_int,
    flags: c_int,
    mut got: usize,
    n: usize,
    mut more: impl FnMut(usize) -> ssize_t,
) -> ssize_t {
    // A peek continued would copy the first bytes again: TCP waits for
    // all of them before copying, which no receive from here can do. With
    // a receive timeout, TCP's short answer may be the timeout's.
    if flags & (libc::MSG_DONTWAIT | libc::MSG_PEEK) != 0
        || !config::active()
        || !matches!(table::state(fd), table::EGRESS | table::LOCAL)
        || !sys::sys_rcvtimeo_unset(fd)
    {
        return got as ssize_t;
    }
    let saved = errno();
    while got < n {
        match repeated(fd, flags, || more(got)) {
            k if k > 0 => got += k as usize,
            _ => break,
        }
    }
    set_errno(saved);
    got as ssize_t
}

/// # Safety
/// recvfrom(2).
#[no_mangle]
pub unsafe extern "C" fn recvfrom(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    flags: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let r = repeated(fd, flags, || unsafe {
        sys::recvfrom(fd, buf, n, flags, a, len)
    });
    // SAFETY: `at < n`, inside the caller's buffer of n bytes.
    wait_all(fd, flags, r, n, |at| unsafe {
        sys::recvfrom(fd, buf.cast::<u8>().add(at).cast(), n - at, flags, a, len)
    })
}

/// # Safety
/// readv(2).
#[no_mangle]
pub unsafe extern "C" fn readv(fd: c_int, iov: *const libc::iovec, n: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged.
    repeated(fd, 0, || unsafe { sys::readv(fd, iov, n) })
}

/// # Safety
/// glibc's `__read_chk` (what `read` compiles to under `_FORTIFY_SOURCE`
/// when the buffer's size is known; it calls libc's internal read, which
/// the `read` above never sees).
#[no_mangle]
pub unsafe extern "C" fn __read_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    cap: size_t,
) -> ssize_t {
    // SAFETY: forwarded unchanged (the real one checks n against cap).
    repeated(fd, 0, || unsafe { sys::__read_chk(fd, buf, n, cap) })
}

/// # Safety
/// glibc's `__recv_chk` (fortified `recv`).
#[no_mangle]
pub unsafe extern "C" fn __recv_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    cap: size_t,
    flags: c_int,
) -> ssize_t {
    // SAFETY: forwarded unchanged (the real one checks n against cap).
    let r = repeated(fd, flags, || unsafe {
        sys::__recv_chk(fd, buf, n, cap, flags)
    });
    // SAFETY: `at < n <= cap` (checked by the first call), inside the
    // caller's buffer.
    wait_all(fd, flags, r, n, |at| unsafe {
        sys::__recv_chk(fd, buf.cast::<u8>().add(at).cast(), n - at, cap - at, flags)
    })
}

/// # Safety
/// glibc's `__recvfrom_chk` (fortified `recvfrom`).
#[no_mangle]
pub unsafe extern "C" fn __recvfrom_chk(
    fd: c_int,
    buf: *mut c_void,
    n: size_t,
    cap: size_t,
    flags: c_int,
    a: *mut sockaddr,
    len: *mut socklen_t,
) -> ssize_t {
    // SAFETY: forwarded unchanged (the real one checks n against cap).
    let r = repeated(fd, flags, || unsafe {
        sys::__recvfrom_chk(fd, buf, n, cap, flags, a, len)
    });
    // SAFETY: `at < n <= cap` (checked by the first call), inside the
    // caller's buffer.
    wait_all(fd, flags, r, n, |at| unsafe {
        sys::__recvfrom_chk(
            fd,
            buf.cast::<u8>().add(at).cast(),
            n - at,
            cap - at,
            flags,
            a,
            len,
        )
    })
}

/// # Safety
/// recvmmsg(2). Repeated only without a timeout: with one, the kernel
/// checks it only after a message arrived, and a repeat would restart it.
#[no_mangle]
pub unsafe extern "C" fn recvmmsg(
    fd: c_int,
    v: *mut libc::mmsghdr,
    n: c_uint,
    flags: c_int,
    t: *mut libc::timespec,
) -> c_int {
    if !t.is_null() {
        // SAFETY: forwarded unchanged.
        return unsafe { sys::recvmmsg(fd, v, n, flags, t) };
    }
    // SAFETY: forwarded unchanged.
    repeated(fd, flags, || unsafe {
        sys::recvmmsg(fd, v, n, flags, t) as ssize_t
    }) as c_int
}

/// # Safety
/// recvmsg(2).
#[no_mangle]
pub unsafe extern "C" fn recvmsg(fd: c_int, msg: *mut msghdr, flags: c_int) -> ssize_t {
    // SAFETY: forwarded unchanged.
    let r = repeated(fd, flags, || unsafe { sys::recvmsg(fd, msg, flags) });
    // SAFETY: the caller's msghdr, which the kernel just filled.
    if r >= 0 && !msg.is_null() && unsafe { (*msg).msg_controllen } != 0 && config::active() {
        // SAFETY: as above.
        unsafe { received_connections(msg) };
    }
    if r <= 0 || flags & libc::MSG_WAITALL == 0 || msg.is_null() {
        return r;
    }
    // SAFETY: the caller's msghdr, which the kernel just read.
    let (iov, iovlen) = unsafe { ((*msg).msg_iov, (*msg).msg_iovlen) };
    if iovlen != 1 || iov.is_null() {
        // Several buffers: not continued (a copy of the vector would be
        // needed to advance it).
        return r;
    }
    // SAFETY: the caller's one iovec.
    let (base, n) = unsafe { ((*iov).iov_base, (*iov).iov_len) };
    // SAFETY: `at < n`, inside the caller's buffer; the rest is received
    // with recv (the control data and flags came with the first part).
    wait_all(fd, flags, r, n, |at| unsafe {
        sys::recv(fd, base.cast::<u8>().add(at).cast(), n - at, flags)
    })
}

/// Bytes one `splice()` from a grafted socket moves at most (a stack
/// buffer: threads may run on small stacks).
const SPLICE_CHUNK: usize = 16 << 10;

/// # Safety
/// splice(2). From a grafted or accepted TCP socket into a pipe the bytes
/// are received and written instead ([`socket_to_pipe`]): the kernel's
/// `tcp_splice_read` takes only what TCP queued, never what a spliced peer
/// handed over, so a blocking splice would wait forever, and return 0 at
/// the peer's FIN with the data still queued.
#[no_mangle]
pub unsafe extern "C" fn splice(
    fd_in: c_int,
    off_in: *mut i64,
    fd_out: c_int,
    off_out: *mut i64,
    len: size_t,
    flags: c_uint,
) -> ssize_t {
    if off_in.is_null() && off_out.is_null() && config::active() && decide::known_tcp(fd_in) {
        if let Some(r) = socket_to_pipe(fd_in, fd_out, len, flags) {
            return r;
        }
    }
    // SAFETY: forwarded unchanged.
    unsafe { sys::splice(fd_in, off_in, fd_out, off_out, len, flags) }
}

/// `splice(fd_in, NULL, fd_out, NULL, len, flags)` from the TCP socket
/// `fd_in` into the pipe `fd_out` as a receive (the library's `recv`, so an
/// empty wake-up is repeated) and a write of what came: never more than
/// the pipe has room for, so nothing received is left unwritten. Waits for
/// room as splice does (not with SPLICE_F_NONBLOCK or a non-blocking
/// pipe); the socket's own O_NONBLOCK decides whether the receive waits,
/// as in `tcp_splice_read`. `None`: not such a pair, the real splice
/// answers.
fn socket_to_pipe(fd_in: c_int, fd_out: c_int, len: size_t, flags: c_uint) -> Option<ssize_t> {
    let room = loop {
        let room = sys::sys_pipe_room(fd_out)?;
        if room > 0 || len == 0 {
            break room;
        }
        let nonblock = flags & libc::SPLICE_F_NONBLOCK != 0
            || matches!(sys::sys_fcntl(fd_out, libc::F_GETFL, 0), Ok(fl) if fl & libc::O_NONBLOCK != 0);
        if nonblock {
            set_errno(libc::EAGAIN);
            return Some(-1);
        }
        if !sys::sys_wait_ready(fd_out, libc::POLLOUT)
            && (errno() != libc::EINTR || sys::sys_interrupting_handler())
        {
            return Some(-1);
        }
    };
    let want = len.min(room).min(SPLICE_CHUNK);
    if want == 0 {
        return Some(0);
    }
    let mut buf = [0u8; SPLICE_CHUNK];
    // SAFETY: `buf` is writable for `want` <= its length.
    let got = unsafe { recv(fd_in, buf.as_mut_ptr().cast(), want, 0) };
    if got <= 0 {
        return Some(got);
    }
    match sys::sys_write_all(fd_out, &buf[..got as usize]) {
        Ok(()) => Some(got),
        Err((0, e)) => {
            set_errno(e);
            Some(-1)
        }
        Err((n, _)) => Some(n as ssize_t),
    }
}
