//! The C boundary: the real libc functions behind the ones we interpose, and
//! the raw system calls the library uses for its own work.
//!
//! Our exported `socket`, `close`, `fcntl`, … shadow libc's inside this very
//! library too (a call from Rust code here goes through the PLT and lands on
//! our own export), so the library's own I/O never calls those names: it uses
//! `syscall(2)` directly. The real functions are looked up once, in the
//! constructor, with `dlsym(RTLD_NEXT, …)`; until then (or if a lookup fails)
//! every pass-through goes straight to the system call.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicUsize, Ordering};

use libc::{c_int, c_long, c_uint, c_ulong, c_void, mmsghdr, msghdr, size_t, sockaddr, socklen_t};

/// The real functions behind our exports, one line each: the C signature,
/// the system call that stands in for it before the constructor resolved it
/// (or when the lookup failed), and, for the calls graft's seccomp filter
/// traps, `trap SYS_nr` (made from the trampoline page when it is mapped,
/// see [`via_trampoline`]; `if COND`: only when COND holds). Generates the
/// symbol list ([`NAMES`], resolved once by [`resolve_all`]) and one
/// pass-through function per line. `unsafe` ones forward the caller's raw
/// pointers unchanged (the kernel validates them: EFAULT); `safe` ones take
/// none.
macro_rules! hooks {
    (
        symbols only: $($only:ident),*;
        $(
            $(#[$doc:meta])*
            $safety:ident fn $name:ident($($a:ident: $t:ty),*) -> $ret:ty
            $(, trap $nr:ident $(if $cond:expr)?)?
            => $fallback:expr;
        )*
    ) => {
        /// The resolved symbols, in the order of [`NAMES`].
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        #[repr(usize)]
        enum Sym {
            $($name,)*
            $($only,)*
        }

        /// NUL-terminated names for dlsym.
        const NAMES: &[&str] = &[
            $(concat!(stringify!($name), "\0"),)*
            $(concat!(stringify!($only), "\0"),)*
        ];

        $(
            hooks!(@fn $safety $(#[$doc])* $name($($a: $t),*) -> $ret {
                let _args = [$($a as i64),*];
                $(
                    if true $(&& $cond)? {
                        // SAFETY: the caller upholds this system call's
                        // contract (the function's own).
                        if let Some(r) = unsafe { via_trampoline(libc::$nr, args6(_args)) } {
                            return r as $ret;
                        }
                    }
                )?
                let f = real(Sym::$name);
                if f == 0 {
                    return $fallback;
                }
                // SAFETY: `f` is what dlsym returned for this very name,
                // whose C signature is this one; the caller's arguments are
                // passed on unchanged under its contract.
                unsafe {
                    let f = std::mem::transmute::<usize, unsafe extern "C" fn($($t),*) -> $ret>(f);
                    f($($a),*)
                }
            });
        )*
    };
    (@fn unsafe $(#[$doc:meta])* $name:ident($($a:ident: $t:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub unsafe fn $name($($a: $t),*) -> $ret $body
    };
    (@fn safe $(#[$doc:meta])* $name:ident($($a:ident: $t:ty),*) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub fn $name($($a: $t),*) -> $ret $body
    };
}

hooks! {
    // Variadic: the pass-through is [`fcntl`] below.
    symbols only: fcntl, fcntl64;
    /// # Safety
    /// Same contract as socket(2).
    unsafe fn socket(d: c_int, t: c_int, p: c_int) -> c_int
        // SAFETY: socket(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_socket, d, t, p) as c_int };
    /// # Safety
    /// Same contract as bind(2).
    unsafe fn bind(fd: c_int, a: *const sockaddr, l: socklen_t) -> c_int, trap SYS_bind
        // SAFETY: the caller's contract is bind(2)'s.
        => unsafe { libc::syscall(libc::SYS_bind, fd, a, l) as c_int };
    safe fn listen(fd: c_int, backlog: c_int) -> c_int, trap SYS_listen
        // SAFETY: listen(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_listen, fd, backlog) as c_int };
    /// # Safety
    /// Same contract as connect(2).
    unsafe fn connect(fd: c_int, a: *const sockaddr, l: socklen_t) -> c_int, trap SYS_connect
        // SAFETY: the caller's contract is connect(2)'s.
        => unsafe { libc::syscall(libc::SYS_connect, fd, a, l) as c_int };
    /// # Safety
    /// Same contract as sendto(2).
    unsafe fn sendto(fd: c_int, buf: *const c_void, n: size_t, flags: c_int, a: *const sockaddr, l: socklen_t) -> isize, trap SYS_sendto if !a.is_null()
        // SAFETY: the caller's contract is sendto(2)'s.
        => unsafe { libc::syscall(libc::SYS_sendto, fd, buf, n, flags, a, l) as isize };
    /// # Safety
    /// Same contract as sendmsg(2).
    unsafe fn sendmsg(fd: c_int, m: *const msghdr, flags: c_int) -> isize, trap SYS_sendmsg
        // SAFETY: the caller's contract is sendmsg(2)'s.
        => unsafe { libc::syscall(libc::SYS_sendmsg, fd, m, flags) as isize };
    /// # Safety
    /// Same contract as sendmmsg(2).
    unsafe fn sendmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int) -> c_int, trap SYS_sendmmsg
        // SAFETY: the caller's contract is sendmmsg(2)'s.
        => unsafe { libc::syscall(libc::SYS_sendmmsg, fd, v, n, flags) as c_int };
    /// # Safety
    /// Same contract as getsockname(2).
    unsafe fn getsockname(fd: c_int, a: *mut sockaddr, l: *mut socklen_t) -> c_int
        // SAFETY: the caller's contract is getsockname(2)'s.
        => unsafe { libc::syscall(libc::SYS_getsockname, fd, a, l) as c_int };
    safe fn close(fd: c_int) -> c_int
        // SAFETY: close(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_close, fd) as c_int };
    safe fn dup(fd: c_int) -> c_int
        // SAFETY: dup(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_dup, fd) as c_int };
    // dup2(fd, fd) is "is fd valid?", where dup3 would say EINVAL.
    safe fn dup2(old: c_int, new: c_int) -> c_int
        // SAFETY: dup3(2) takes no pointers.
        => if old == new { sys_fcntl(old, libc::F_GETFD, 0).map_or(-1, |_| old) } else { unsafe { libc::syscall(libc::SYS_dup3, old, new, 0) as c_int } };
    safe fn dup3(old: c_int, new: c_int, flags: c_int) -> c_int
        // SAFETY: dup3(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_dup3, old, new, flags) as c_int };
    /// # Safety
    /// Same contract as accept(2).
    unsafe fn accept(fd: c_int, a: *mut sockaddr, l: *mut socklen_t) -> c_int
        // SAFETY: the caller's contract is accept(2)'s, which is accept4(2)'s with no flags.
        => unsafe { libc::syscall(libc::SYS_accept4, fd, a, l, 0) as c_int };
    /// # Safety
    /// Same contract as accept4(2).
    unsafe fn accept4(fd: c_int, a: *mut sockaddr, l: *mut socklen_t, flags: c_int) -> c_int
        // SAFETY: the caller's contract is accept4(2)'s.
        => unsafe { libc::syscall(libc::SYS_accept4, fd, a, l, flags) as c_int };
    /// # Safety
    /// Same contract as setsockopt(2).
    unsafe fn setsockopt(fd: c_int, level: c_int, name: c_int, val: *const c_void, len: socklen_t) -> c_int
        // SAFETY: the caller's contract is setsockopt(2)'s.
        => unsafe { libc::syscall(libc::SYS_setsockopt, fd, level, name, val, len) as c_int };
    /// # Safety
    /// Same contract as getpeername(2).
    unsafe fn getpeername(fd: c_int, a: *mut sockaddr, l: *mut socklen_t) -> c_int
        // SAFETY: the caller's contract is getpeername(2)'s.
        => unsafe { libc::syscall(libc::SYS_getpeername, fd, a, l) as c_int };
    /// # Safety
    /// Same contract as read(2).
    unsafe fn read(fd: c_int, buf: *mut c_void, n: size_t) -> isize
        // SAFETY: the caller's contract is read(2)'s.
        => unsafe { libc::syscall(libc::SYS_read, fd, buf, n) as isize };
    /// # Safety
    /// Same contract as recv(2).
    unsafe fn recv(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int) -> isize
        // SAFETY: the caller's contract is recv(2)'s, which is recvfrom(2)'s with no address.
        => unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, std::ptr::null_mut::<sockaddr>(), std::ptr::null_mut::<socklen_t>()) as isize };
    /// # Safety
    /// Same contract as recvfrom(2).
    unsafe fn recvfrom(fd: c_int, buf: *mut c_void, n: size_t, flags: c_int, a: *mut sockaddr, l: *mut socklen_t) -> isize
        // SAFETY: the caller's contract is recvfrom(2)'s.
        => unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, a, l) as isize };
    /// # Safety
    /// Same contract as recvmsg(2).
    unsafe fn recvmsg(fd: c_int, m: *mut msghdr, flags: c_int) -> isize
        // SAFETY: the caller's contract is recvmsg(2)'s.
        => unsafe { libc::syscall(libc::SYS_recvmsg, fd, m, flags) as isize };
    /// # Safety
    /// Same contract as recvmmsg(2).
    unsafe fn recvmmsg(fd: c_int, v: *mut mmsghdr, n: c_uint, flags: c_int, t: *mut libc::timespec) -> c_int
        // SAFETY: the caller's contract is recvmmsg(2)'s.
        => unsafe { libc::syscall(libc::SYS_recvmmsg, fd, v, n, flags, t) as c_int };
    /// # Safety
    /// Same contract as readv(2).
    unsafe fn readv(fd: c_int, iov: *const libc::iovec, n: c_int) -> isize
        // SAFETY: the caller's contract is readv(2)'s.
        => unsafe { libc::syscall(libc::SYS_readv, fd, iov, n) as isize };
    /// # Safety
    /// Same contract as glibc's __read_chk (read(2) into a buffer of
    /// `cap` bytes, which `n` must not exceed).
    unsafe fn __read_chk(fd: c_int, buf: *mut c_void, n: size_t, cap: size_t) -> isize
        // SAFETY: read(2)'s contract, with the bound __read_chk checks.
        => if n > cap { chk_fail() } else { unsafe { libc::syscall(libc::SYS_read, fd, buf, n) as isize } };
    /// # Safety
    /// Same contract as glibc's __recv_chk.
    unsafe fn __recv_chk(fd: c_int, buf: *mut c_void, n: size_t, cap: size_t, flags: c_int) -> isize
        // SAFETY: recvfrom(2)'s contract with no address, and the bound.
        => if n > cap { chk_fail() } else { unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, std::ptr::null_mut::<sockaddr>(), std::ptr::null_mut::<socklen_t>()) as isize } };
    /// # Safety
    /// Same contract as glibc's __recvfrom_chk.
    unsafe fn __recvfrom_chk(fd: c_int, buf: *mut c_void, n: size_t, cap: size_t, flags: c_int, a: *mut sockaddr, l: *mut socklen_t) -> isize
        // SAFETY: recvfrom(2)'s contract, and the bound.
        => if n > cap { chk_fail() } else { unsafe { libc::syscall(libc::SYS_recvfrom, fd, buf, n, flags, a, l) as isize } };
    /// # Safety
    /// Same contract as splice(2).
    unsafe fn splice(fd_in: c_int, off_in: *mut i64, fd_out: c_int, off_out: *mut i64, len: size_t, flags: c_uint) -> isize
        // SAFETY: the caller's contract is splice(2)'s.
        => unsafe { libc::syscall(libc::SYS_splice, fd_in, off_in, fd_out, off_out, len, flags) as isize };
    /// # Safety
    /// Same contract as fdopen(3).
    unsafe fn fdopen(fd: c_int, mode: *const libc::c_char) -> *mut libc::FILE
        // SAFETY: the caller's contract is fdopen(3)'s.
        => unsafe { fdopen_unresolved(fd, mode) };
    safe fn setns(fd: c_int, nstype: c_int) -> c_int
        // SAFETY: setns(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_setns, fd, nstype) as c_int };
    safe fn unshare(flags: c_int) -> c_int
        // SAFETY: unshare(2) takes no pointers.
        => unsafe { libc::syscall(libc::SYS_unshare, flags) as c_int };
}

/// fdopen(3) before the constructor resolved it (a library constructor that
/// ran first): no system call stands in for it, so it is looked up now.
///
/// # Safety
/// fdopen(3)'s contract.
unsafe fn fdopen_unresolved(fd: c_int, mode: *const libc::c_char) -> *mut libc::FILE {
    // SAFETY: a NUL-terminated name; RTLD_NEXT skips our own export.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, c"fdopen".as_ptr()) };
    if f.is_null() {
        set_errno(libc::ENOSYS);
        return std::ptr::null_mut();
    }
    // SAFETY: libc's fdopen, whose C signature this is; the caller's
    // arguments unchanged.
    unsafe {
        let f = std::mem::transmute::<
            *mut c_void,
            unsafe extern "C" fn(c_int, *const libc::c_char) -> *mut libc::FILE,
        >(f);
        f(fd, mode)
    }
}

/// What glibc's fortified calls do when the length exceeds the buffer
/// (only reached before the constructor resolved the real one).
fn chk_fail() -> ! {
    // SAFETY: abort(3) has no preconditions.
    unsafe { libc::abort() }
}

/// Addresses of the real functions (0: not resolved, use the system call).
static REAL: [AtomicUsize; NAMES.len()] = [const { AtomicUsize::new(0) }; NAMES.len()];

/// Looks every real function up once. Called from the constructor only.
pub fn resolve_all() {
    for (slot, name) in REAL.iter().zip(NAMES) {
        // SAFETY: `name` is NUL-terminated; RTLD_NEXT has no other precondition
        // and returns NULL when the symbol is absent.
        let p = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr().cast()) };
        slot.store(p as usize, Ordering::Relaxed);
    }
}

#[inline(always)]
fn real(s: Sym) -> usize {
    REAL[s as usize].load(Ordering::Relaxed)
}

/// A trapped call's arguments, padded to the six the kernel takes.
#[inline(always)]
fn args6<const N: usize>(a: [i64; N]) -> [i64; 6] {
    const { assert!(N <= 6) };
    let mut out = [0; 6];
    out[..N].copy_from_slice(&a);
    out
}

/// The calls graft's seccomp filter traps, made from the library's
/// trampoline page (see [`crate::trampoline`]) so the filter lets them pass:
/// `Some(result)` in libc's convention (-1 and errno), `None` when the page
/// is not mapped.
///
/// # Safety
/// The same as the system call `nr` with these arguments.
#[inline]
unsafe fn via_trampoline(nr: c_long, a: [i64; 6]) -> Option<i64> {
    // SAFETY: forwarded contract.
    let r = unsafe { crate::trampoline::call(nr, a) }?;
    if (-4095..0).contains(&r) {
        set_errno(-r as c_int);
        Some(-1)
    } else {
        Some(r)
    }
}

/// The real fcntl (`wide`: the `fcntl64` symbol). The third argument is passed
/// as an unsigned long, which carries any int or pointer in the x86_64 and
/// aarch64 calling conventions.
///
/// # Safety
/// Same contract as fcntl(2) for `cmd` (the argument may be a pointer).
pub unsafe fn fcntl(fd: c_int, cmd: c_int, arg: c_ulong, wide: bool) -> c_int {
    type FcntlFn = unsafe extern "C" fn(c_int, c_int, ...) -> c_int;
    let f = match real(Sym::fcntl64) {
        f64 if wide && f64 != 0 => f64,
        _ => real(Sym::fcntl),
    };
    if f == 0 {
        // SAFETY: the caller's contract is fcntl(2)'s.
        return unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) as c_int };
    }
    // SAFETY: `f` is what dlsym returned for fcntl or fcntl64, both with
    // this C signature; the caller's arguments are passed on unchanged.
    unsafe { std::mem::transmute::<usize, FcntlFn>(f)(fd, cmd, arg) }
}

// ---- errno -----------------------------------------------------------------

#[inline(always)]
pub fn errno() -> c_int {
    // SAFETY: __errno_location returns this thread's errno slot, always valid.
    unsafe { *libc::__errno_location() }
}

#[inline(always)]
pub fn set_errno(e: c_int) {
    // SAFETY: as in `errno`.
    unsafe { *libc::__errno_location() = e }
}

// ---- raw system calls for the library's own work ---------------------------

fn check(r: c_long) -> Result<c_long, c_int> {
    if r < 0 {
        Err(errno())
    } else {
        Ok(r)
    }
}

/// socket(2), bypassing every interposer.
pub fn sys_socket(d: c_int, t: c_int, p: c_int) -> Result<OwnedFd, c_int> {
    // SAFETY: no pointers.
    let fd = check(unsafe { libc::syscall(libc::SYS_socket, d, t, p) })?;
    // SAFETY: the kernel just gave us this descriptor; nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// close(2) of a descriptor the library owns as a raw number (the cached
/// broker connection, extra SCM_RIGHTS descriptors).
pub fn sys_close(fd: RawFd) {
    // SAFETY: no pointers.
    unsafe { libc::syscall(libc::SYS_close, fd) };
}

pub fn sys_fcntl(fd: RawFd, cmd: c_int, arg: c_long) -> Result<c_int, c_int> {
    // SAFETY: only called with int-argument commands.
    check(unsafe { libc::syscall(libc::SYS_fcntl, fd, cmd, arg) }).map(|r| r as c_int)
}

pub fn sys_dup3(old: RawFd, new: RawFd, flags: c_int) -> Result<(), c_int> {
    // SAFETY: no pointers.
    check(unsafe { libc::syscall(libc::SYS_dup3, old, new, flags) }).map(|_| ())
}

/// getsockopt(2) into `buf`; the length the kernel wrote.
pub fn sys_getsockopt(fd: RawFd, level: c_int, name: c_int, buf: &mut [u8]) -> Option<usize> {
    let mut len = buf.len() as socklen_t;
    // SAFETY: buf/len describe a writable buffer of that size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_getsockopt,
            fd,
            level,
            name,
            buf.as_mut_ptr(),
            &mut len as *mut socklen_t,
        )
    };
    (r == 0).then_some((len as usize).min(buf.len()))
}

/// Whether `fd` is a socket with no receive timeout (SO_RCVTIMEO zero).
pub fn sys_rcvtimeo_unset(fd: RawFd) -> bool {
    let mut tv = [0u8; std::mem::size_of::<libc::timeval>()];
    matches!(sys_getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &mut tv),
        Some(n) if tv[..n].iter().all(|b| *b == 0))
}

pub fn sys_getsockopt_int(fd: RawFd, level: c_int, name: c_int) -> Option<c_int> {
    let mut b = [0u8; 4];
    match sys_getsockopt(fd, level, name, &mut b)? {
        4 => Some(c_int::from_ne_bytes(b)),
        _ => None,
    }
}

pub fn sys_setsockopt(fd: RawFd, level: c_int, name: c_int, val: &[u8]) -> Result<(), c_int> {
    // SAFETY: val is a readable buffer of that size.
    check(unsafe {
        libc::syscall(
            libc::SYS_setsockopt,
            fd,
            level,
            name,
            val.as_ptr(),
            val.len() as socklen_t,
        )
    })
    .map(|_| ())
}

/// SO_RCVTIMEO and SO_SNDTIMEO of `secs` seconds.
pub fn sys_set_timeouts(fd: RawFd, secs: i64) -> Result<(), c_int> {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: timeval is plain data; we view its bytes for setsockopt.
    let b = unsafe {
        std::slice::from_raw_parts(
            (&tv as *const libc::timeval).cast::<u8>(),
            std::mem::size_of::<libc::timeval>(),
        )
    };
    sys_setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, b)?;
    sys_setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDTIMEO, b)
}

/// getsockname(2)/getpeername(2) into a 128-byte buffer.
pub fn sys_sockname(fd: RawFd, peer: bool) -> Result<([u8; 128], usize), c_int> {
    let mut buf = [0u8; 128];
    let mut len: socklen_t = 128;
    let nr = if peer {
        libc::SYS_getpeername
    } else {
        libc::SYS_getsockname
    };
    // SAFETY: buf/len describe a writable 128-byte buffer.
    check(unsafe { libc::syscall(nr, fd, buf.as_mut_ptr(), &mut len as *mut socklen_t) })?;
    Ok((buf, (len as usize).min(128)))
}

pub fn sys_connect(fd: RawFd, addr: &[u8]) -> Result<(), c_int> {
    let args = [fd as i64, addr.as_ptr() as i64, addr.len() as i64, 0, 0, 0];
    // SAFETY: addr is a readable buffer of that size.
    if let Some(r) = unsafe { via_trampoline(libc::SYS_connect, args) } {
        return if r < 0 { Err(errno()) } else { Ok(()) };
    }
    // SAFETY: addr is a readable buffer of that size.
    check(unsafe {
        libc::syscall(
            libc::SYS_connect,
            fd,
            addr.as_ptr(),
            addr.len() as socklen_t,
        )
    })
    .map(|_| ())
}

/// Sleeps `ms` milliseconds (nanosleep: async-signal-safe; an interrupted
/// sleep is resumed).
pub fn sys_sleep_ms(ms: u32) {
    let mut req = libc::timespec {
        tv_sec: libc::time_t::from(ms / 1000),
        tv_nsec: libc::c_long::from(ms % 1000) * 1_000_000,
    };
    let mut rem = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    for _ in 0..64 {
        // SAFETY: req and rem are valid timespecs for the call's duration.
        let rc = unsafe { libc::nanosleep(&req, &mut rem) };
        if rc == 0 || errno() != libc::EINTR {
            return;
        }
        req = rem;
    }
}

/// Whether any signal has a handler installed without `SA_RESTART`: one
/// whose delivery makes a blocking call fail with EINTR rather than be
/// restarted. Asks the kernel for every signal (up to 64 system calls), so
/// what the program set through any path (`sigaction`, `signal`,
/// `siginterrupt`, a raw system call) counts; for cold paths only.
pub fn sys_interrupting_handler() -> bool {
    /// The kernel's `struct sigaction` on x86-64 and aarch64.
    #[repr(C)]
    struct KernelSigaction {
        handler: usize,
        flags: u64,
        restorer: usize,
        mask: u64,
    }
    // glibc's own SIGCANCEL (32) and SIGSETXID (33) interrupt nothing the
    // program waits in.
    (1..=64)
        .filter(|&s| !matches!(s, libc::SIGKILL | libc::SIGSTOP | 32 | 33))
        .any(|s| {
            let mut old = KernelSigaction {
                handler: 0,
                flags: 0,
                restorer: 0,
                mask: 0,
            };
            // SAFETY: no new action; `old` is writable and of the size
            // passed (the kernel's sigset_t is 8 bytes).
            let r = unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    s,
                    std::ptr::null::<KernelSigaction>(),
                    &mut old as *mut KernelSigaction,
                    8usize,
                )
            };
            r == 0
                && old.handler != libc::SIG_DFL
                && old.handler != libc::SIG_IGN
                && old.flags & libc::SA_RESTART as u64 == 0
        })
}

/// Calls `f` with every open descriptor of the process (from
/// `/proc/self/fd`, read with raw system calls into a stack buffer), except
/// the one the listing itself uses. Nothing when /proc is not mounted.
pub fn sys_each_open_fd(mut f: impl FnMut(RawFd)) {
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let dir = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/fd".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    let Ok(dir) = check(dir) else {
        return;
    };
    let dir = dir as RawFd;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut at = 0;
        // Each record: inode (8), offset (8), its length (2), type (1), the
        // NUL-terminated name.
        while at + 19 < n as usize {
            let len = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
            if len == 0 || at + len > n as usize {
                break;
            }
            let name = &buf[at + 19..at + len];
            let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
            if let Some(fd) = std::str::from_utf8(name)
                .ok()
                .and_then(|t| t.parse::<RawFd>().ok())
            {
                if fd != dir {
                    f(fd);
                }
            }
            at += len;
        }
    }
    sys_close(dir);
}

/// Free bytes in the pipe `fd` (its size less what it holds); `None` when
/// `fd` is not a pipe.
pub fn sys_pipe_room(fd: RawFd) -> Option<usize> {
    let size = sys_fcntl(fd, libc::F_GETPIPE_SZ, 0).ok()?;
    let mut held: c_int = 0;
    // SAFETY: FIONREAD writes one int.
    check(unsafe { libc::syscall(libc::SYS_ioctl, fd, libc::FIONREAD, &mut held as *mut c_int) })
        .ok()?;
    Some((size.max(0) as usize).saturating_sub(held.max(0) as usize))
}

/// Waits until `fd` is ready for `events` (poll(2), no timeout); false
/// when the wait failed (EINTR included; errno says).
pub fn sys_wait_ready(fd: RawFd, events: libc::c_short) -> bool {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one pollfd, writable; no timeout, no signal mask.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ppoll,
            &mut p as *mut libc::pollfd,
            1,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<libc::sigset_t>(),
            8usize,
        )
    };
    r > 0
}

/// One write(2) of `b` to `fd`: the count written.
pub fn sys_write(fd: RawFd, b: &[u8]) -> Result<usize, c_int> {
    // SAFETY: `b` is readable for its length.
    check(unsafe { libc::syscall(libc::SYS_write, fd, b.as_ptr(), b.len()) }).map(|n| n as usize)
}

/// Writes all of `b` to `fd`, waiting for room when it is non-blocking;
/// the count written before an error.
pub fn sys_write_all(fd: RawFd, mut b: &[u8]) -> Result<(), (usize, c_int)> {
    let total = b.len();
    while !b.is_empty() {
        match sys_write(fd, b) {
            Ok(n) => b = &b[n..],
            Err(libc::EAGAIN) if sys_wait_ready(fd, libc::POLLOUT) => {}
            Err(libc::EINTR) => {}
            Err(e) => return Err((total - b.len(), e)),
        }
    }
    Ok(())
}

/// Where [`sys_getpid`] keeps the pid: the first word of a page the kernel
/// zeroes in every child made without `CLONE_VM` (`MADV_WIPEONFORK`), so a
/// child of fork, of a raw clone or of anything else learns its own pid
/// again without a fork handler. Null until the constructor mapped it, or
/// on a kernel without `MADV_WIPEONFORK` (before 4.14): then every call
/// asks the kernel. A child sharing its parent's memory (`vfork`, `clone`
/// with `CLONE_VM`) shares the page and sees the parent's pid, as it shares
/// the pool's state anyway; a `vfork` child may only exec or exit.
static PID_PAGE: AtomicPtr<AtomicI32> = AtomicPtr::new(std::ptr::null_mut());

/// Maps [`PID_PAGE`] (constructor only).
pub fn cache_pid() {
    const LEN: usize = 4096;
    let Some(p) = sys_mmap(LEN) else {
        return;
    };
    // SAFETY: p is the mapping just made, LEN bytes; nobody else knows it.
    if unsafe { libc::madvise(p.cast(), LEN, libc::MADV_WIPEONFORK) } != 0 {
        // SAFETY: as above.
        unsafe { libc::munmap(p.cast(), LEN) };
        return;
    }
    PID_PAGE.store(p.cast::<AtomicI32>(), Ordering::Release);
}

/// The calling process's pid: one system call per process, not per call
/// (the pool checks it on every socket it hands out).
pub fn sys_getpid() -> i32 {
    let page = PID_PAGE.load(Ordering::Acquire);
    // SAFETY: a non-null PID_PAGE is a page-aligned, zero-filled mapping
    // that is never unmapped, whose first word is used only as this
    // AtomicI32.
    let Some(cell) = (unsafe { page.as_ref() }) else {
        return getpid_now();
    };
    match cell.load(Ordering::Relaxed) {
        0 => {
            let pid = getpid_now();
            cell.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

fn getpid_now() -> i32 {
    // SAFETY: no arguments.
    unsafe { libc::syscall(libc::SYS_getpid) as i32 }
}

/// Whether descriptor `fd` is still the socket with inode `ino` (one the
/// library keeps: the application may have closed the number, or a dup2
/// put something else there).
pub fn sys_is_socket(fd: RawFd, ino: u64) -> bool {
    fd >= 0
        && matches!(sys_fstat(fd), Some((i, mode))
            if i == ino && mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// (inode, mode) of an open descriptor.
pub fn sys_fstat(fd: RawFd) -> Option<(u64, u32)> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: st is a writable stat.
    let r = unsafe { libc::syscall(libc::SYS_fstat, fd, &mut st as *mut libc::stat) };
    (r == 0).then_some((st.st_ino, st.st_mode))
}

/// Which network namespace the socket `fd` lives in, as one number: its
/// netns cookie (one getsockopt, no path walk), or on kernels without
/// `SO_NETNS_COOKIE` the calling thread's namespace inode with the top bit
/// set (a cookie never has it: cookies count up from 1). `None` when
/// neither can be read. The same socket always gives the same key, and a
/// broker connection made by the calling thread gives the key of the
/// thread's namespace, so comparing the two tells whether the application's
/// socket belongs to the namespace the thread is in now.
pub fn sys_netns_key(fd: RawFd) -> Option<u64> {
    let mut b = [0u8; 8];
    if let Some(8) = sys_getsockopt(
        fd,
        libc::SOL_SOCKET,
        graft_core::sockopt::SO_NETNS_COOKIE,
        &mut b,
    ) {
        return Some(u64::from_ne_bytes(b));
    }
    thread_netns_ino().map(|ino| ino | 1 << 63)
}

/// The inode of `/proc/thread-self/ns/net`: the calling thread's namespace
/// (after a setns(), the new one); `None` when procfs cannot tell.
fn thread_netns_ino() -> Option<u64> {
    const PATH: &[u8] = b"/proc/thread-self/ns/net\0";
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: PATH is NUL-terminated and st is a writable stat.
    let r = unsafe {
        libc::syscall(
            libc::SYS_newfstatat,
            libc::AT_FDCWD,
            PATH.as_ptr(),
            &mut st as *mut libc::stat,
            0,
        )
    };
    (r == 0).then_some(st.st_ino)
}

/// Writes all of `b` to stderr (best effort, bounded retries).
pub fn sys_write_stderr(mut b: &[u8]) {
    for _ in 0..16 {
        if b.is_empty() {
            return;
        }
        // SAFETY: b is a readable buffer of that size.
        let r = unsafe { libc::syscall(libc::SYS_write, 2, b.as_ptr(), b.len()) };
        if r > 0 {
            b = &b[(r as usize).min(b.len())..];
        } else if r < 0 && errno() == libc::EINTR {
            continue;
        } else {
            return;
        }
    }
}

/// Sends one record (MSG_NOSIGNAL: a dead graftd is an error, not SIGPIPE).
pub fn sys_send(fd: RawFd, b: &[u8]) -> Result<usize, c_int> {
    loop {
        // SAFETY: b is a readable buffer of that size; no address.
        let r = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                fd,
                b.as_ptr(),
                b.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<sockaddr>(),
                0,
            )
        };
        match check(r) {
            Err(libc::EINTR) => continue,
            other => return other.map(|n| n as usize),
        }
    }
}

/// What [`sys_recv_fd`] received.
pub struct Received {
    pub len: usize,
    pub flags: c_int,
    /// The SCM_RIGHTS descriptors, in order; past [`MAX_FDS`] they were closed.
    pub fds: [Option<OwnedFd>; MAX_FDS],
}

/// Most descriptors one received record keeps (a socket batch).
pub const MAX_FDS: usize = graft_core::proto::broker::BATCH_MAX;

/// Receives one record and its SCM_RIGHTS descriptors (close-on-exec),
/// keeping the first [`MAX_FDS`] and closing the rest. Bounded EINTR retries; the
/// socket's SO_RCVTIMEO bounds the wait.
pub fn sys_recv_fd(fd: RawFd, buf: &mut [u8], flags: c_int) -> Result<Received, c_int> {
    // Room for one cmsg (a 16-byte header) with 2 * MAX_FDS ints (twice a
    // batch, so a longer one is still received and closed rather than
    // truncated), aligned for cmsghdr.
    let mut cbuf = [0u64; 2 + MAX_FDS];
    for _ in 0..64 {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: an all-zero msghdr is valid (no name, no iov) before we fill it.
        let mut msg: msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: msg points at live buffers of the sizes it states.
        let r = unsafe {
            libc::syscall(
                libc::SYS_recvmsg,
                fd,
                &mut msg as *mut msghdr,
                libc::MSG_CMSG_CLOEXEC | flags,
            )
        };
        let n = match check(r) {
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(n) => n as usize,
        };
        let mut out = Received {
            len: n,
            flags: msg.msg_flags,
            fds: Default::default(),
        };
        let mut kept = 0;
        // SAFETY: msg was filled by the kernel; the CMSG_* macros walk the
        // control buffer it describes and never leave it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const c_int;
                    let payload =
                        ((*c).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                    for i in 0..payload / std::mem::size_of::<c_int>() {
                        let f = std::ptr::read_unaligned(data.add(i));
                        if kept < MAX_FDS {
                            // The kernel just installed f for us; nobody else owns it.
                            out.fds[kept] = Some(OwnedFd::from_raw_fd(f));
                            kept += 1;
                        } else {
                            sys_close(f);
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        return Ok(out);
    }
    Err(libc::EINTR)
}

/// Anonymous zeroed memory straight from the kernel (no allocator: safe in
/// signal handlers and under allocator re-entrancy).
pub fn sys_mmap(size: usize) -> Option<*mut u8> {
    // SAFETY: anonymous private mapping, no file, no fixed address.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p.cast())
}

/// # Safety
/// `p`/`size` must be a mapping from [`sys_mmap`] that nothing references.
pub unsafe fn sys_munmap(p: *mut u8, size: usize) {
    // SAFETY: forwarded to the caller.
    unsafe { libc::munmap(p.cast(), size) };
}

/// Soft RLIMIT_NOFILE.
pub fn nofile_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: r is a writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur
    } else {
        1024
    }
}
